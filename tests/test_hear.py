"""The HEAR 2021 API and the X-ARES encoder of ``sslam_fast.hear``: shapes for several clip lengths, timestamps
against the patch grid, equality with ``sslam_fast.extract``'s features, chunking of long clips, bad input."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

import sslam_fast.hear as hear
from sslam_fast import extract
from sslam_fast.checkpoint import save_finetuned_checkpoint, save_pretraining_checkpoint
from sslam_fast.models import AudioClassifier, ModelConfig, PretrainingModel

SR = 16000
D = 64  # ModelConfig.tiny().embed_dim


def _frames(n):
    return 1 + (n - 400) // 160


def _audio(n_sounds, seconds, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * SR))
    t = torch.arange(n, dtype=torch.float64) / SR
    rows = [0.3 * torch.sin(2 * math.pi * (200.0 + 150 * i) * t)
            + 0.05 * torch.randn(n, generator=g, dtype=torch.float64) for i in range(n_sounds)]
    return torch.stack(rows).float()


@pytest.fixture(scope="module")
def model():
    return hear.load_model(tiny=True, seed=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("hear")
    pre = PretrainingModel(ModelConfig.tiny())
    save_pretraining_checkpoint(d / "pre.pt", pre)
    return {"path": d / "pre.pt", "encoder": pre.student.eval(), "dir": d}


# --- the HEAR attributes and shapes -----------------------------------------------------------------------------------


def test_load_model_attributes(model):
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == D and model.timestamp_embedding_size == D
    assert not model.training


@pytest.mark.parametrize("target_length", [1024, "auto"])
@pytest.mark.parametrize("seconds", [0.5, 1.0, 10.0, 20.0])
def test_shapes_for_several_lengths(seconds, target_length):
    m = hear.load_model(tiny=True, target_length=target_length)
    audio = _audio(2, seconds)
    emb, ts = hear.get_timestamp_embeddings(audio, m)
    scene = hear.get_scene_embeddings(audio, m)
    T = math.ceil(_frames(audio.shape[1]) / 16)  # 0.5 s: 48 frames -> 3; 10 s: 998 -> 63; 20 s: 1998 -> 125
    assert emb.shape == (2, T, D) and ts.shape == (2, T) and scene.shape == (2, D)
    assert emb.dtype == ts.dtype == scene.dtype == torch.float32
    assert torch.isfinite(emb).all() and torch.isfinite(scene).all()
    assert not torch.allclose(emb[0], emb[1])  # two different sounds
    assert (ts[:, -1] - 87.5).max() < seconds * 1000  # the last patch starts inside the clip


def test_timestamps_are_patch_centres(model):
    for seconds in (0.5, 10.0, 20.0):
        _, ts = hear.get_timestamp_embeddings(_audio(3, seconds), model)
        T = ts.shape[1]
        # patch t holds frames 16 t .. 16 t + 15; frame i spans [10 i, 10 i + 25) ms
        frame_centres = np.arange(16 * T).reshape(T, 16) * 10.0 + 12.5
        np.testing.assert_allclose(ts[0].numpy(), frame_centres.mean(axis=1), rtol=0, atol=1e-6)
        assert torch.equal(ts[1], ts[0]) and torch.equal(ts[2], ts[0])
        np.testing.assert_allclose(np.diff(ts[0].numpy()), hear.PATCH_HOP_MS)


@pytest.mark.parametrize("target_length", [1024, 256, "auto"])
def test_timestamps_locate_an_event(target_length):
    """With the blocks removed the encoder is token-local (patch embedding + position + LayerNorm), so a burst changes
    exactly the timestamps whose patch [centre - 87.5, centre + 87.5) ms overlaps it, in the first or a later chunk."""
    m = hear.load_model(tiny=True, target_length=target_length)
    m.encoder.blocks = torch.nn.ModuleList()
    base = 1e-3 * torch.randn(1, 20 * SR, generator=torch.Generator().manual_seed(0))
    for s0 in (81000, 241000):  # 5.06 s (chunk 0 of 1024 frames), 15.06 s (chunk 1; chunk 9 of 256 frames)
        s1 = s0 + 4000
        burst = base.clone()
        burst[0, s0:s1] += 0.3 * torch.sin(2 * math.pi * 700 * torch.arange(s1 - s0) / SR)
        e0, ts = hear.get_timestamp_embeddings(base, m)
        e1, _ = hear.get_timestamp_embeddings(burst, m)
        changed = (e1 - e0).abs().amax(dim=-1)[0] > 1e-2
        b0, b1 = s0 / SR * 1000, s1 / SR * 1000
        want = (ts[0] - 87.5 < b1) & (ts[0] + 87.5 > b0)
        assert want.sum() >= 2 and torch.equal(changed, want), (changed.nonzero(), want.nonzero())


# --- equality with extract --------------------------------------------------------------------------------------------


def _extract(path, encoder, granularity, target_length):
    return next(extract.extract_features(encoder, [path], granularity=granularity, target_length=target_length))[1]


@pytest.mark.parametrize("target_length", [1024, "auto"])
def test_equals_extract_features(ckpt, target_length):
    m = hear.load_model(ckpt["path"], target_length=target_length)
    tl = None if target_length == "auto" else target_length
    for seconds in (1.0, 10.0):
        audio = _audio(2, seconds, seed=int(seconds))
        emb, _ = hear.get_timestamp_embeddings(audio, m)
        scene = hear.get_scene_embeddings(audio, m)
        for i in range(2):
            path = ckpt["dir"] / f"clip{seconds}_{i}.wav"
            sf.write(path, audio[i].numpy(), SR, subtype="FLOAT")
            utt = _extract(path, ckpt["encoder"], "utterance", tl)
            frames = _extract(path, ckpt["encoder"], "frame", tl)  # (N, D), token n = 8 t + f
            per_patch = frames.reshape(-1, 8, D).mean(axis=1)
            if target_length == 1024:
                assert frames.shape == (512, D)  # padded to upstream's 1024 frames
            T = emb.shape[1]
            assert T == math.ceil(_frames(audio.shape[1]) / 16)  # the patches holding padding only are dropped
            assert per_patch.shape[0] == (64 if target_length == 1024 else T)
            np.testing.assert_allclose(scene[i].numpy(), utt, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(emb[i].numpy(), per_patch[:T], rtol=1e-5, atol=1e-5)


def test_long_clip_first_chunk_equals_extracts_crop(ckpt):
    m = hear.load_model(ckpt["path"])
    audio = _audio(1, 20.0, seed=7)
    path = ckpt["dir"] / "twenty.wav"
    sf.write(path, audio[0].numpy(), SR, subtype="FLOAT")
    emb, _ = hear.get_timestamp_embeddings(audio, m)
    scene = hear.get_scene_embeddings(audio, m)
    first = _extract(path, ckpt["encoder"], "all", 1024)  # extract crops to the first 1024 frames, as upstream
    np.testing.assert_allclose(emb[0, :64].numpy(), first[1:].reshape(64, 8, D).mean(axis=1), rtol=1e-5, atol=1e-5)
    # the second chunk: frames 1024.. of the whole clip's fbank, padded to 1024 frames; scene = frame-weighted CLS mean
    from sslam_fast.ops import eat_features

    fb = eat_features(audio, target_length=2048)
    with torch.no_grad():
        second = ckpt["encoder"].extract_features(fb[:, :, 1024:])[0]
    F = _frames(audio.shape[1])
    assert emb.shape[1] == 125  # 64 + 61 patches: the second chunk's padding-only patches dropped
    np.testing.assert_allclose(emb[0, 64:].numpy(), second[1:].reshape(64, 8, D).mean(1)[:61].numpy(),
                               rtol=1e-5, atol=1e-5)
    want_scene = (1024 * torch.from_numpy(first[0]) + (F - 1024) * second[0]) / F
    np.testing.assert_allclose(scene[0].numpy(), want_scene.numpy(), rtol=1e-5, atol=1e-5)


def test_finetuned_checkpoint_uses_its_encoder(tmp_path):
    torch.manual_seed(2)
    clf = AudioClassifier(ModelConfig.tiny(), num_classes=5).eval()
    save_finetuned_checkpoint(tmp_path / "ft.pt", clf)
    m = hear.load_model(tmp_path / "ft.pt", target_length="auto")
    audio = _audio(1, 1.0)
    from sslam_fast.ops import eat_features

    with torch.no_grad():
        want = clf.extract_features(eat_features(audio, target_length=112))[0, 0]
    np.testing.assert_allclose(hear.get_scene_embeddings(audio, m)[0].numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_batching_does_not_change_results():
    m = hear.load_model(tiny=True, batch_size=3)  # 20 s = 2 chunks: one sound per fbank call, 3 chunks per encoder call
    audio = _audio(4, 20.0, seed=9)
    emb, _ = hear.get_timestamp_embeddings(audio, m)
    scene = hear.get_scene_embeddings(audio, m)
    for i in range(4):
        e_i, _ = hear.get_timestamp_embeddings(audio[i: i + 1], m)
        torch.testing.assert_close(emb[i: i + 1], e_i, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scene[i: i + 1], hear.get_scene_embeddings(audio[i: i + 1], m), rtol=1e-5, atol=1e-5)


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = (hear.load_model(tiny=True, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    wa, wb, wc = (m.encoder.blocks[0].attn.qkv.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


# --- X-ARES -----------------------------------------------------------------------------------------------------------


def test_xares_encoder_shape():
    enc = hear.XaresEncoder(tiny=True, seed=3)
    assert type(enc).__name__.endswith("Encoder") and isinstance(enc, torch.nn.Module)
    assert enc.sampling_rate == 16000 and enc.output_dim == D and enc.hop_size_in_ms == 160
    audio = torch.randn(2, 50000) * 0.1
    out = enc(audio)
    T = math.ceil(_frames(50000) / 16)
    assert out.shape == (2, T, D)
    assert abs(50000 / SR * 1000 / out.shape[1] - enc.hop_size_in_ms) < enc.hop_size_in_ms / 2
    torch.testing.assert_close(out, hear.get_timestamp_embeddings(audio, hear.load_model(tiny=True, seed=3))[0])
    assert enc(audio[0]).shape == (1, T, D)  # one clip without the batch axis


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,err,msg", [
    (torch.zeros(16000), ValueError, r"\(n_sounds, n_samples\).*2 dimensions"),
    (torch.zeros(1, 1, 16000), ValueError, "2 dimensions"),
    (torch.zeros(2, 16000, dtype=torch.int16), TypeError, "floating point.*int16"),
    (np.zeros((2, 16000), np.float32), TypeError, "torch.Tensor"),
    (torch.zeros(0, 16000), ValueError, "no sounds"),
    (torch.zeros(2, 399), ValueError, "399 samples.*400"),
])
def test_bad_audio_is_named(model, bad, err, msg):
    for fn in (hear.get_scene_embeddings, hear.get_timestamp_embeddings):
        with pytest.raises(err, match=msg):
            fn(bad, model)


def test_nan_audio_names_the_sound(model):
    audio = _audio(3, 1.0)
    audio[1, 500] = float("nan")
    with pytest.raises(ValueError, match=r"audio holds NaN or infinite samples \(sound\(s\) \[1\]\)"):
        hear.get_timestamp_embeddings(audio, model)
    audio[1, 500] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        hear.XaresEncoder(tiny=True)(audio)


def test_bad_model_arguments(ckpt):
    with pytest.raises(ValueError, match="model_file_path is empty"):
        hear.load_model("")
    with pytest.raises(ValueError, match="not both"):
        hear.load_model(ckpt["path"], tiny=True)
    with pytest.raises(ValueError, match="target_length"):
        hear.load_model(tiny=True, target_length=100)
    with pytest.raises(ValueError, match="positional table"):
        hear.load_model(tiny=True, target_length=768 * 16 + 16)
    with pytest.raises(ValueError, match="batch_size"):
        hear.load_model(tiny=True, batch_size=0)
    with pytest.raises(TypeError, match="load_model"):
        hear.get_scene_embeddings(_audio(1, 1.0), ckpt["encoder"])
