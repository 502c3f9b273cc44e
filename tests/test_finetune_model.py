"""The fine-tuning model: stochastic depth (DropPath) in the encoder blocks, the classifier head's initialisation,
``AudioClassifier.from_pretrained``, and the fine-tuned checkpoint's round trip through ``load_pretrained`` and
``python -m sslam_fast.evaluate``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn

import sslam_fast.evaluate as ev
from sslam_fast.audio import load_audio
from sslam_fast.checkpoint import (
    CheckpointError,
    load_pretrained,
    save_finetuned_checkpoint,
    save_pretraining_checkpoint,
)
from sslam_fast.checkpoint._keys import encoder_to_fairseq
from sslam_fast.metrics import mean_average_precision
from sslam_fast.models import AudioClassifier, EATEncoder, ModelConfig, PretrainingModel
from sslam_fast.models.encoder import Block, DropPath, drop_path_rates
from sslam_fast.ops import eat_features

# --- DropPath --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_path_per_sample_keep_rate_and_scale(p):
    torch.manual_seed(1)
    n = 20000
    x = torch.rand(n, 3, 5) + 0.5
    dp = DropPath(p).train()
    y = dp(x)
    zero = (y == 0).reshape(n, -1)
    kept = ~zero[:, 0]
    assert torch.equal(zero, (~kept)[:, None].expand(-1, 15))  # one draw per sample, over all its elements
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma  # Bernoulli(1 - p) keep rate
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.03  # unbiased: E[y] = x


def test_drop_path_identity_in_eval_and_at_zero():
    x = torch.randn(8, 4, 6)
    assert DropPath(0.7).eval()(x) is x
    assert DropPath(0.0).train()(x) is x
    with pytest.raises(ValueError, match="drop path probability"):
        DropPath(1.0)
    with pytest.raises(ValueError, match="drop_path_rate must lie in"):
        ModelConfig.tiny(drop_path_rate=-0.1)


def test_drop_path_reads_nothing_back():
    """One graph under ``torch.compile(fullgraph=True)``: the keep mask never goes through the host."""
    torch._dynamo.reset()
    f = torch.compile(DropPath(0.3).train(), backend="eager", fullgraph=True)
    y = f(torch.ones(64, 2, 3))
    assert set(torch.unique(y).tolist()) <= {0.0, torch.tensor(1 / 0.7).item()}


def test_drop_path_rates_linear_over_blocks():
    cfg = ModelConfig.tiny(depth=5, drop_path_rate=0.2)
    enc = EATEncoder(cfg)
    want = np.linspace(0, 0.2, 5)
    assert isinstance(enc.blocks[0].drop_path, nn.Identity)  # rate 0 for the first block
    for i in range(1, 5):
        assert isinstance(enc.blocks[i].drop_path, DropPath) and enc.blocks[i].drop_path.p == want[i]
    assert drop_path_rates(0.1, 12)[-1] == 0.1 and drop_path_rates(0.1, 12)[1] == np.linspace(0, 0.1, 12)[1]
    assert all(isinstance(b.drop_path, nn.Identity) for b in EATEncoder(ModelConfig.tiny()).blocks)
    # no parameters: the state dict (and so every checkpoint) is the same as without drop path
    assert enc.state_dict().keys() == EATEncoder(ModelConfig.tiny(depth=5)).state_dict().keys()


def test_block_drops_each_branch_per_sample():
    """Every output row is one of the four attention-kept/dropped x FFN-kept/dropped variants of upstream's post-LN
    AltBlock (``norm2(r + dp(mlp(r)))``, ``r = norm1(x + dp(attn(x)))``), scaled by 1 / keep, and all four occur."""
    torch.manual_seed(3)
    p = 0.5
    blk = Block(64, 4, 4.0, 1e-6, drop_path=p)
    x = torch.randn(64, 5, 64)
    with torch.no_grad():
        blk.train()
        y, t = blk(x)
        a = blk.attn(x)
        variants = []
        for ka in (0.0, 1 / (1 - p)):
            r = blk.norm1(x + ka * a)
            f = blk.mlp(r)
            for kf in (0.0, 1 / (1 - p)):
                variants.append(blk.norm2(r + kf * f))
    hits = torch.stack([(y - v).abs().amax(dim=(1, 2)) < 1e-5 for v in variants])  # (4, B)
    assert bool(hits.any(0).all()), "a row matches no drop-path variant"
    assert bool(hits.any(1).all()), "some variant never occurred in 64 samples"


def test_classifier_eval_is_exact_and_train_differs():
    """In eval mode a drop-path model computes exactly the rate-0 model (the golden path); in training it does not."""
    torch.manual_seed(0)
    plain = AudioClassifier(ModelConfig.tiny(), num_classes=7)
    dp = AudioClassifier(ModelConfig.tiny(drop_path_rate=0.5), num_classes=7)
    dp.load_state_dict(plain.state_dict())
    x = torch.randn(6, 1, 64, 128)
    with torch.no_grad():
        assert torch.equal(dp.eval()(x), plain.eval()(x))
        assert torch.equal(plain.train()(x), plain.eval()(x))  # no other randomness in training
        torch.manual_seed(5)
        assert not torch.equal(dp.train()(x), plain.eval()(x))


# --- the classifier head and from_pretrained -------------------------------------------------------------------------


def test_head_init_trunc_normal_zero_bias():
    torch.manual_seed(0)
    clf = AudioClassifier(ModelConfig.tiny(), num_classes=400)
    w = clf.head.weight.detach()
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert float(w.abs().max()) < 0.15  # a normal's tail, not nn.Linear's uniform(+-1/8)
    assert torch.equal(clf.head.bias, torch.zeros(400))
    assert torch.equal(clf.fc_norm.weight, torch.ones(64)) and torch.equal(clf.fc_norm.bias, torch.zeros(64))
    assert clf.fc_norm.eps == 1e-6
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        AudioClassifier(ModelConfig.tiny(), num_classes=0)


def _hf_file(path, encoder: EATEncoder):
    """An HF pre-trained port of ``encoder`` (``model.`` + upstream names without the modality prefix)."""
    from safetensors.torch import save_file

    rename = {"local_encoder.proj": "local_encoder.proj", "context_encoder.norm": "pre_norm"}
    sd = {}
    for k, v in encoder_to_fairseq(encoder.state_dict()).items():
        k = k.replace("modality_encoders.IMAGE.", "")
        for a, b in rename.items():
            k = k.replace(a, b)
        sd["model." + k] = v.detach().contiguous()
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ft_model")
    pre = PretrainingModel(ModelConfig.tiny())
    ft = AudioClassifier(ModelConfig.tiny(), num_classes=3)
    return {"pre": save_pretraining_checkpoint(d / "pre.pt", pre), "student": pre.student,
            "ft": save_finetuned_checkpoint(d / "ft.pt", ft), "ft_model": ft,
            "hf": _hf_file(d / "model.safetensors", pre.student), "dir": d}


@pytest.mark.parametrize("kind", ["pre", "ft", "hf"])
def test_from_pretrained_loads_the_encoder_with_a_fresh_head(pretrained, kind):
    source = pretrained["ft_model"].encoder if kind == "ft" else pretrained["student"]
    torch.manual_seed(11)
    heads = {"num_heads": 4} if kind == "hf" else {}  # an HF port has no cfg: the head count is an override
    clf = AudioClassifier.from_pretrained(pretrained[kind], 50, drop_path_rate=0.1, **heads)
    assert isinstance(clf, AudioClassifier) and clf.training and clf.head.out_features == 50
    assert clf.cfg.drop_path_rate == 0.1 and clf.cfg.embed_dim == 64 and clf.cfg.num_heads == 4
    assert isinstance(clf.encoder.blocks[1].drop_path, DropPath) and clf.encoder.blocks[1].drop_path.p == 0.1
    want = source.state_dict()
    for k, v in clf.encoder.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert torch.equal(clf.head.bias, torch.zeros(50)) and clf.head.weight.std().item() < 0.03
    assert torch.equal(clf.fc_norm.weight, torch.ones(64))
    # the same encoder as load_pretrained gives
    loaded = load_pretrained(pretrained[kind], **heads)
    loaded = loaded.encoder if isinstance(loaded, AudioClassifier) else loaded
    x = torch.randn(2, 1, 32, 128)
    with torch.no_grad():
        assert torch.equal(clf.eval().extract_features(x), loaded.extract_features(x))


def test_from_pretrained_errors(pretrained, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pt"):
        AudioClassifier.from_pretrained(bad, 5)
    with pytest.raises(ValueError, match="drop_path_rate must lie in"):
        AudioClassifier.from_pretrained(pretrained["pre"], 5, drop_path_rate=1.0)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        AudioClassifier.from_pretrained(pretrained["pre"], 0)


# --- the fine-tuned checkpoint: load_pretrained and evaluate ---------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(pretrained):
    """A 'fine-tuned' classifier (drop path on, head moved off its init) saved in fairseq's fine-tuned layout."""
    torch.manual_seed(2)
    clf = AudioClassifier.from_pretrained(pretrained["pre"], 4, drop_path_rate=0.2)
    with torch.no_grad():
        clf.head.weight.normal_(0.0, 1.0)
        clf.head.bias.copy_(torch.linspace(-0.5, 0.5, 4))
        clf.fc_norm.weight.add_(0.1)
    path = save_finetuned_checkpoint(pretrained["dir"] / "finetuned.pt", clf, num_updates=123)
    return clf.eval(), path


def test_finetuned_checkpoint_round_trip_identical_logits(finetuned):
    clf, path = finetuned
    back = load_pretrained(path)
    assert isinstance(back, AudioClassifier) and not back.training and back.head.out_features == 4
    for k, v in clf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.randn(3, 1, 256, 128)
    with torch.no_grad():
        assert torch.equal(back(x), clf(x))


MIDS = ["/m/a", "/m/b", "/m/c", "/m/d"]


def test_evaluate_reads_the_finetuned_checkpoint(finetuned, tmp_path, capsys):
    clf, path = finetuned
    rng = np.random.default_rng(0)
    audio = tmp_path / "audio"
    audio.mkdir()
    clips = {}
    for i in range(6):
        t = np.arange(16000 * 2) / 16000
        y = 0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(audio / f"c{i}.wav", y.astype(np.float32), 16000)
        clips[f"c{i}.wav"] = [MIDS[i % 4]] + ([MIDS[(i + 1) % 4]] if i % 2 else [])
    man = tmp_path / "eval.tsv"
    man.write_text(f"{audio}\n" + "".join(f"{n}\t32000\t{','.join(m)}\n" for n, m in clips.items()))
    labels = tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f"{i},{m},C{i}\n" for i, m in enumerate(MIDS)))
    rc = ev.main(["--checkpoint", str(path), "--manifest", str(man), "--labels", str(labels), "--batch-size", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    got = float(re.search(r"mAP (\S+) over 4 classes with positives, 6 clips", out).group(1))
    scores = []
    with torch.no_grad():
        for name in clips:
            wave, sr = load_audio(audio / name)
            scores.append(torch.sigmoid(clf(eat_features(wave[None], sample_rate=sr, target_length=1024)))[0].numpy())
    y = np.array([[int(m in clips[n]) for m in MIDS] for n in clips])
    want, _ = mean_average_precision(np.stack(scores), y)
    assert got == pytest.approx(want, abs=2e-6)
    assert 0.0 < want < 1.0  # the scores rank the clips: a wrong model or label column would move it
