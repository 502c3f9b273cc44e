"""Checkpoint formats (ALGORITHM §8): fairseq pre-training / fine-tuned files and HF safetensors ports, built from
random
weights with the exact upstream names and shapes, loaded without fairseq; safe unpickling; atomic fairseq-layout saves.
"""

import argparse
import dataclasses
import io
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from sslam_fast.checkpoint import (
    CheckpointError,
    detect_format,
    infer_config,
    load_pretrained,
    load_pretraining,
    map_state_dict,
    read_checkpoint_file,
)
from sslam_fast.models import AudioClassifier, EATEncoder, ModelConfig, PretrainingModel
from sslam_fast.reference import model as refm

IMG = "modality_encoders.IMAGE."
PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")

# --------------------------------------------------------------------------------------------------------------------
# upstream layouts, written out from ALGORITHM §8 independently of the package's tables


def student_shapes(D=64, depth=2, rows=6144, hidden=None, dec_layers=2, groups=4, decoder=True):
    hidden = hidden or 4 * D
    s = {
        IMG + "local_encoder.proj.weight": (D, 1, 16, 16),
        IMG + "local_encoder.proj.bias": (D,),
        IMG + "fixed_positional_encoder.positions": (1, rows, D),
        IMG + "extra_tokens": (1, 1, D),
        IMG + "context_encoder.norm.weight": (D,),
        IMG + "context_encoder.norm.bias": (D,),
    }
    if decoder:
        for i in range(dec_layers):
            s[f"{IMG}decoder.blocks.{i}.0.weight"] = (D, D // groups, 3, 3)
            s[f"{IMG}decoder.blocks.{i}.0.bias"] = (D,)
        s[IMG + "decoder.proj.weight"] = (D, D)
        s[IMG + "decoder.proj.bias"] = (D,)
    per = {"norm1": [(D,)] * 2, "attn.qkv": [(3 * D, D), (3 * D,)], "attn.proj": [(D, D), (D,)], "norm2": [(D,)] * 2,
           "mlp.fc1": [(hidden, D), (hidden,)], "mlp.fc2": [(D, hidden), (D,)]}
    for i in range(depth):
        for m in PARTS:
            s[f"blocks.{i}.{m}.weight"], s[f"blocks.{i}.{m}.bias"] = per[m]
    return s


def rand(shapes, gen, device="cpu"):
    return {k: torch.randn(v, generator=gen, device=device) if device == "cpu" else torch.empty(v, device=device)
            for k, v in shapes.items()}


def fairseq_pretrain(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    model = rand(student_shapes(**kw), g)
    model["_ema"] = rand(student_shapes(decoder=False, **kw), g)
    return {
        "args": None,
        "cfg": {"model": {"_name": "data2vec_multi", "num_heads": 4, "clone_batch": 4, "average_top_k_layers": 2},
                "task": {"_name": "mae_image_pretraining", "target_length": 256}},
        "model": model,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FP16Optimizer",
                               "lr_scheduler_state": {"best": None}, "num_updates": 4321}],
        "task_state": {},
        # fairseq metrics hold numpy scalars
        "extra_state": {"metrics": {"train": [(0, "loss", "AverageMeter", {"val": np.float64(1.5), "sum": 3.0,
                                                                            "count": np.int64(2), "round": 3})]},
                        "previous_training_time": np.float64(12.5), "best": np.float32(0.25)},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}],
                                 "loss_scale": 128.0},
    }


def fairseq_finetune(seed=1, num_classes=527, **kw):
    g = torch.Generator().manual_seed(seed)
    sd = {"model." + k: v for k, v in rand(student_shapes(decoder=False, **kw), g).items()}
    D = sd["model." + IMG + "extra_tokens"].shape[-1]
    sd.update(rand({"fc_norm.weight": (D,), "fc_norm.bias": (D,), "head.weight": (num_classes, D),
                    "head.bias": (num_classes,)}, g))
    return {"cfg": {"model": {"_name": "mae_image_classification", "pretrained_model_args": {
        "model": {"num_heads": 4}, "task": {"target_length": 256}}}}, "model": sd, "criterion": None,
        "optimizer_history": [{"num_updates": 7, "optimizer_name": "x", "lr_scheduler_state": {}}]}


def hf_port(seed=2, positions=True, head=None, **kw):
    g = torch.Generator().manual_seed(seed)
    names = {"local_encoder.proj": "local_encoder.proj", "context_encoder.norm": "pre_norm"}
    sd = {}
    for k, v in rand(student_shapes(decoder=False, **kw), g).items():
        k = k.replace(IMG, "")
        for a, b in names.items():
            k = k.replace(a, b)
        sd["model." + k] = v.contiguous()
    if not positions:
        del sd["model.fixed_positional_encoder.positions"]
    if head is not None:
        D = sd["model.extra_tokens"].shape[-1]
        sd.update(rand({f"{head}fc_norm.weight": (D,), f"{head}fc_norm.bias": (D,), f"{head}head.weight": (527, D),
                        f"{head}head.bias": (527,)}, g))
    return sd


def written_out_sincos(D, time_patches, W=8):
    """ALGORITHM §2.1 written out directly: row 8t+f; [sin f w, cos f w, sin t w, cos t w], w_k = 10000^(-k/(D/4))."""
    q = D // 4
    w = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    t = torch.arange(time_patches, dtype=torch.float64).repeat_interleave(W)[:, None] * w
    f = torch.arange(W, dtype=torch.float64).repeat(time_patches)[:, None] * w
    return torch.cat([f.sin(), f.cos(), t.sin(), t.cos()], 1).float()[None]


def enc_expect(sd, prefix=""):
    """EATEncoder state dict expected from fairseq-named tensors."""
    ren = {"local_encoder.proj.": "patch_embed.", "fixed_positional_encoder.positions": "pos_embed",
           "extra_tokens": "cls_token", "context_encoder.norm.": "input_norm."}
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix) or "decoder." in k or k == "_ema":
            continue
        k = k[len(prefix):].replace(IMG, "")
        for a, b in ren.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def assert_sd_equal(module_sd, expect):
    assert set(module_sd) == set(expect)
    for k, v in expect.items():
        assert torch.equal(module_sd[k].float(), v.float()), k


# --------------------------------------------------------------------------------------------------------------------
# base-size layout


def test_base_key_list_matches_algorithm():
    """The names/shapes we write for the released base model are exactly ALGORITHM §8's, and they map back to base()."""
    with torch.device("meta"):
        model = PretrainingModel(ModelConfig.base())
    from sslam_fast.checkpoint._keys import decoder_to_fairseq, encoder_to_fairseq

    written = {**encoder_to_fairseq(model.student.state_dict()), **decoder_to_fairseq(model.decoder.state_dict())}
    spec = student_shapes(D=768, depth=12, rows=6144, hidden=3072, dec_layers=6, groups=16)
    assert {k: tuple(v.shape) for k, v in written.items()} == spec
    assert spec[IMG + "decoder.blocks.0.0.weight"] == (768, 48, 3, 3)
    assert spec["blocks.0.attn.qkv.weight"] == (2304, 768)
    assert len(spec) == 6 + 6 * 2 + 2 + 12 * 12
    sd = rand(spec, None, device="meta")
    sd["_ema"] = rand(student_shapes(D=768, depth=12, hidden=3072, decoder=False), None, device="meta")
    maps = map_state_dict(sd, "fairseq_pretrain")
    cfg = infer_config({}, maps)
    want = ModelConfig.base()
    assert dataclasses.replace(cfg, clones=want.clones) == want  # clones come from the cfg / stage, not shapes


# --------------------------------------------------------------------------------------------------------------------
# loading each format


def test_fairseq_pretrain_load(tmp_path):
    ckpt = fairseq_pretrain()
    path = tmp_path / "checkpoint_last.pt"
    torch.save(ckpt, path)
    assert detect_format(path) == "fairseq_pretrain" and detect_format(ckpt) == "fairseq_pretrain"
    model = load_pretraining(path, stage="sslam", clones=8)
    assert isinstance(model, PretrainingModel) and model.num_updates == 4321
    assert model.cfg.stage == "sslam" and model.cfg.clones == 8 and model.cfg.num_heads == 4
    assert model.cfg.grid == (16, 8) and model.cfg.max_time_patches == 768 and model.cfg.decoder_groups == 4
    assert_sd_equal(model.student.state_dict(), enc_expect(ckpt["model"]))
    assert_sd_equal(model.teacher.state_dict(), enc_expect(ckpt["model"]["_ema"]))
    dec = {k.replace(IMG + "decoder.", ""): v for k, v in ckpt["model"].items() if "decoder." in k}
    assert_sd_equal(model.decoder.state_dict(), dec)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert load_pretraining(path).cfg.clones == 4  # stage eat: the file's clone_batch

    enc = load_pretrained(path)
    assert isinstance(enc, EATEncoder) and not enc.training
    assert_sd_equal(enc.state_dict(), enc_expect(ckpt["model"]))
    x = torch.randn(2, 1, 48, 128)
    with torch.no_grad():
        out = enc.extract_features(x)
        assert out.shape == (2, 1 + 3 * 8, 64)
        torch.testing.assert_close(out, model.student.extract_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["model.", ""], ids=["head-model-prefix", "head-no-prefix"])
def test_finetune_and_hf_classifier_load(tmp_path, prefix):
    ckpt = fairseq_finetune()
    torch.save(ckpt, tmp_path / "ft.pt")
    assert detect_format(tmp_path / "ft.pt") == "fairseq_finetune"
    clf = load_pretrained(tmp_path / "ft.pt")
    assert isinstance(clf, AudioClassifier) and clf.head.weight.shape == (527, 64) and clf.cfg.num_heads == 4
    expect = {"encoder." + k: v for k, v in enc_expect(ckpt["model"], "model.").items()}
    expect.update({k: ckpt["model"][k] for k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")})
    assert_sd_equal(clf.state_dict(), expect)
    with torch.no_grad():
        assert clf(torch.randn(1, 1, 32, 128)).shape == (1, 527)
        assert clf.extract_features(torch.randn(1, 1, 32, 128)).shape == (1, 17, 64)

    from safetensors.torch import save_file

    sd = hf_port(head=prefix)
    save_file(sd, tmp_path / "model.safetensors")
    assert detect_format(tmp_path / "model.safetensors") == "hf_safetensors"
    clf = load_pretrained(tmp_path / "model.safetensors")
    assert isinstance(clf, AudioClassifier)
    assert torch.equal(clf.head.weight, sd[prefix + "head.weight"])
    assert torch.equal(clf.encoder.input_norm.bias, sd["model.pre_norm.bias"])
    assert torch.equal(clf.encoder.blocks[1].mlp.fc2.weight, sd["model.blocks.1.mlp.fc2.weight"])


@pytest.mark.parametrize("positions", [True, False], ids=["with-positions", "computed-positions"])
def test_hf_pretrain_load(tmp_path, positions):
    from safetensors.torch import save_file

    sd = hf_port(positions=positions)
    save_file(sd, tmp_path / "model.safetensors")
    enc = load_pretrained(tmp_path / "model.safetensors")
    assert isinstance(enc, EATEncoder)
    assert torch.equal(enc.patch_embed.weight, sd["model.local_encoder.proj.weight"])
    assert torch.equal(enc.cls_token, sd["model.extra_tokens"])
    assert torch.equal(enc.input_norm.weight, sd["model.pre_norm.weight"])
    for i in range(2):
        for m in PARTS:
            assert torch.equal(enc.state_dict()[f"blocks.{i}.{m}.weight"], sd[f"model.blocks.{i}.{m}.weight"])
    want = sd["model.fixed_positional_encoder.positions"] if positions else written_out_sincos(64, 768)
    torch.testing.assert_close(enc.pos_embed.data, want, rtol=0, atol=1e-6)
    assert enc.extract_features(torch.randn(1, 1, 16, 128)).shape == (1, 9, 64)


# --------------------------------------------------------------------------------------------------------------------
# incomplete / foreign / corrupt / unsafe inputs


_BUILD = {"fairseq_pretrain": lambda: fairseq_pretrain()["model"],
          "fairseq_finetune": lambda: fairseq_finetune()["model"], "hf_safetensors": lambda: hf_port(head="model.")}
_DROP = [("fairseq_pretrain", "blocks.1.mlp.fc1.bias"), ("fairseq_pretrain", IMG + "decoder.proj.weight"),
         ("fairseq_pretrain", "_ema"), ("fairseq_finetune", "head.bias"),
         ("fairseq_finetune", "model." + IMG + "context_encoder.norm.weight"),
         ("hf_safetensors", "model.blocks.0.attn.qkv.weight"), ("hf_safetensors", "model.fc_norm.bias")]


@pytest.mark.parametrize("fmt,key", _DROP, ids=[f"{f}-{k.replace(IMG, '')}" for f, k in _DROP])
def test_missing_and_unexpected_keys_listed(fmt, key):
    sd = _BUILD[fmt]()
    assert map_state_dict(sd, fmt)  # complete: maps
    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): .*" + key):
        map_state_dict(missing, fmt)
    extra = dict(sd)
    extra["blocks.0.attn.rel_pos_bias" if fmt == "fairseq_pretrain" else "model.something_else.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): (blocks.0.attn.rel_pos_bias|model.something)"):
        map_state_dict(extra, fmt)


def test_extra_teacher_key_and_wrong_shapes():
    ckpt = fairseq_pretrain()
    ckpt["model"]["_ema"] = dict(ckpt["model"]["_ema"], **{IMG + "decoder.proj.weight": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): _ema\.modality_encoders\.IMAGE\.decoder\.proj"):
        map_state_dict(ckpt, "fairseq_pretrain")
    ckpt = fairseq_pretrain()
    ckpt["model"]["blocks.0.attn.qkv.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight \(100, 64\) \(expected \(192, 64\)\)"):
        map_state_dict(ckpt, "fairseq_pretrain")
    with pytest.raises(CheckpointError, match="fmt must be one of"):
        map_state_dict(ckpt, "timm")


def test_wrong_kinds_of_file(tmp_path):
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint: expected a dict.*Tensor"):
        load_pretrained(tmp_path / "tensor.pt")
    resnet = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}
    torch.save(resnet, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="not an EAT/SSLAM checkpoint.*conv1.weight"):
        detect_format(tmp_path / "resnet.pt")
    torch.save({"model": resnet, "cfg": {}}, tmp_path / "other_fairseq.pt")
    with pytest.raises(CheckpointError, match="fairseq-style checkpoint whose model keys"):
        load_pretrained(tmp_path / "other_fairseq.pt")
    good = tmp_path / "good.pt"
    torch.save(fairseq_pretrain(), good)
    data = good.read_bytes()
    for name, blob in [("truncated.pt", data[: len(data) // 2]), ("head.pt", data[:100]),
                       ("random.bin", np.random.default_rng(0).bytes(4096)), ("empty.pt", b""),
                       ("pickle_trunc.pt", pickle.dumps({"a": list(range(100))}, protocol=2)[:40])]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint: .*" + name):
            detect_format(tmp_path / name)
    from safetensors.torch import save_file

    save_file(hf_port(), tmp_path / "m.safetensors")
    blob = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint: .*trunc.safetensors"):
        load_pretrained(tmp_path / "trunc.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nope.pt")
    torch.save(fairseq_finetune(), tmp_path / "ft.pt")
    with pytest.raises(CheckpointError, match="needs a fairseq pre-training checkpoint"):
        load_pretraining(tmp_path / "ft.pt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch-zip", "torch-legacy"])
def test_malicious_pickle_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    obj = {"model": fairseq_pretrain()["model"], "cfg": _Evil(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch-zip":
        torch.save(obj, path)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    raw = tmp_path / "evil.pkl"  # a bare pickle, not torch.save's layout: refused too, without running it
    raw.write_bytes(pickle.dumps({"cfg": _Evil(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pkl|corrupt or truncated"):
        load_pretrained(raw)
    refused = r"refusing to unpickle .*global (posix|nt|os)\.system, .*trust_checkpoint=True"
    with pytest.raises(CheckpointError, match=refused):
        load_pretrained(path)
    with pytest.raises(CheckpointError):
        detect_format(path)
    assert not marker.exists()
    # the explicit opt-in really is unrestricted unpickling (this is why it is opt-in)
    read_checkpoint_file(path, trust_checkpoint=True)
    assert marker.exists()


def test_restricted_unpickler_refuses_setattr_on_allowed_functions(tmp_path):
    """BUILD with slot state would setattr on its target: only inert data objects may be BUILD targets."""
    import torch._utils

    before = torch._utils._rebuild_tensor_v2.__defaults__
    # GLOBAL torch._utils._rebuild_tensor_v2; (None, {"__defaults__": (1,)}); BUILD; STOP
    blob = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b."
    (tmp_path / "b.pt").write_bytes(blob)
    with pytest.raises(CheckpointError):  # torch's weights-only pass refuses it first
        read_checkpoint_file(tmp_path / "b.pt")
    from sslam_fast.checkpoint._io import _RefusedGlobal, _RestrictedUnpickler

    with pytest.raises(_RefusedGlobal, match="BUILD on builtins.function"):  # and so does our fallback
        _RestrictedUnpickler(io.BytesIO(blob)).load()
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before


def test_namespace_omegaconf_and_numpy1_names_load_without_trust(tmp_path, monkeypatch):
    ckpt = fairseq_pretrain()
    ckpt["args"] = argparse.Namespace(arch="data2vec_multi", lr=[5e-4], nested=argparse.Namespace(x=1))
    # a stand-in for a pickled OmegaConf DictConfig (the package is not installed here): same module and state layout
    mods = {n: types.ModuleType(n) for n in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes")}
    DictConfig = type("DictConfig", (), {"__module__": "omegaconf.dictconfig"})
    AnyNode = type("AnyNode", (), {"__module__": "omegaconf.nodes"})
    mods["omegaconf.dictconfig"].DictConfig, mods["omegaconf.nodes"].AnyNode = DictConfig, AnyNode
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)

    def node(v):
        n = AnyNode()
        n.__dict__.update(_val=v, _parent=None, _metadata=None)
        return n

    inner = DictConfig()
    inner.__dict__.update(_content={"num_heads": node(4), "clone_batch": node(4)}, _parent=None, _metadata=None)
    outer = DictConfig()
    outer.__dict__.update(_content={"model": inner, "task": {"target_length": node(256)}}, _parent=None)
    ckpt["cfg"] = outer
    path = tmp_path / "legacy.pt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    for n in mods:  # reading needs no omegaconf
        monkeypatch.delitem(sys.modules, n)
    # numpy 1.x wrote its scalars as numpy.core.multiarray.scalar
    blob = path.read_bytes()
    assert b"numpy._core.multiarray\nscalar" in blob
    path.write_bytes(blob.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    obj = read_checkpoint_file(path)
    assert obj["args"] == {"arch": "data2vec_multi", "lr": [5e-4], "nested": {"x": 1}}
    assert obj["cfg"] == {"model": {"num_heads": 4, "clone_batch": 4}, "task": {"target_length": 256}}
    assert obj["extra_state"]["previous_training_time"] == 12.5
    model = load_pretraining(path)
    assert model.cfg.num_heads == 4 and model.cfg.grid == (16, 8) and model.num_updates == 4321


@pytest.mark.cuda
def test_base_size_load_and_features_cuda(tmp_path):
    """Real SSLAM shapes: a base-size fairseq file -> encoder on the GPU, (1, 513, 768) features matching the CPU."""
    ckpt = fairseq_pretrain(D=768, depth=12, hidden=3072, dec_layers=6, groups=16)
    ckpt["cfg"] = {"model": {"num_heads": 12, "clone_batch": 16}, "task": {"target_length": 1024}}
    with torch.no_grad():  # keep activations sane with random weights
        for k, v in ckpt["model"].items():
            if k != "_ema" and v.dim() >= 2 and "positions" not in k and "extra_tokens" not in k:
                v.mul_(1 / math.sqrt(v[0].numel()))
    torch.save(ckpt, tmp_path / "base.pt")
    enc = load_pretrained(tmp_path / "base.pt")
    x = torch.randn(1, 1, 1024, 128)
    with torch.no_grad():
        ref = refm.extract_features(enc, x)  # the upstream-structured forward on the CPU
        out = enc.cuda().extract_features(x.cuda())
    assert out.shape == (1, 513, 768)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)
    model = load_pretraining(tmp_path / "base.pt", stage="sslam", clones=8)
    assert model.cfg == dataclasses.replace(ModelConfig.base(), stage="sslam", clones=8)
