"""eat_features, every backend, against the upstream loader's per-clip pipeline (resample, clip mean, torchaudio's
Kaldi fbank, pad / crop, normalisation)."""

from __future__ import annotations

import pytest
import torch
from fbank_oracle import (
    DATA,
    TOL,
    TONAL,
    assert_close_logmel,
    batch_of,
    check_overflowing_features_raise,
    exact_eat,
    row_size,
    signals,
    upstream_eat,
)

from sslam_fast import _backend
from sslam_fast.ops import eat_features
from sslam_fast.reference import kaldi_fbank as ref


def cpu_backends():
    return _backend.available_backends("eat_features", "cpu")


@pytest.mark.parametrize("backend", cpu_backends())
def test_eat_features_matches_upstream_pipeline(backend):
    n = row_size(backend)
    sig = signals(n)
    # target_length below and above the longest row's frame count; one row shorter than a frame.
    names = ["noise", "chirp", "clipped", "near_silence"]
    rows = [sig["noise"] + 0.05, sig["chirp"][: n - 1000], sig["clipped"][:350], sig["near_silence"]]
    x, lengths = batch_of(rows)
    frames = ref.FrameParams.at(16000).num_frames(n)
    for target in (frames - 7, frames + 9):
        got = eat_features(x, lengths, target_length=target, backend=backend)
        assert got.shape == (4, 1, target, 128) and got.dtype == torch.float32
        for i, r in enumerate(rows):
            want = upstream_eat(r, 16000, target)
            exact = exact_eat(r, 16000, target) if names[i] in TONAL else None
            assert_close_logmel(got[i, 0], want, backend, f"row {i} ({names[i]}), target {target}", exact)
        pad = torch.tensor((0 + 4.268) / (2 * 4.569))
        assert torch.allclose(got[2, 0], pad.expand(target, 128)), "a row with no frames is all padding (0.46706)"


@pytest.mark.parametrize("backend", cpu_backends())
def test_eat_features_resamples_like_torchaudio(backend):
    sr = 32000
    n = 2 * row_size(backend)
    rows = [signals(n, sr)["tone"], signals(n, sr)["noise"][: n - 3001]]
    x, lengths = batch_of(rows)
    got = eat_features(x, lengths, sample_rate=sr, target_length=40, backend=backend)
    for i, r in enumerate(rows):
        exact = exact_eat(r, sr, 40) if i == 0 else None  # row 0 is a pure tone
        assert_close_logmel(got[i, 0], upstream_eat(r, sr, 40), backend, f"resampled row {i}", exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eat_features_output_dtype(dtype):
    x = signals(8000)["noise"][None]
    got = eat_features(x, target_length=64, dtype=dtype, backend="reference")
    want = eat_features(x, target_length=64, backend="reference")
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype))


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data recordings not present")
@pytest.mark.parametrize("backend", cpu_backends())
def test_real_recordings(backend):
    sf = pytest.importorskip("soundfile")
    clips = []
    for name in ("sslam_test_32k.wav", "sslam_infer_32k.wav", "librispeech_16k.flac"):
        audio, sr = sf.read(str(DATA / name), dtype="float32")
        audio = torch.from_numpy(audio)
        if audio.dim() == 2:
            audio = audio.mean(dim=1)
        clips.append((audio, sr))
    if backend == "triton":  # interpreter time: a 0.6 s excerpt of each
        clips = [(a[int(sr * 2.0): int(sr * 2.6)], sr) for a, sr in clips]
    for audio, sr in clips:
        target = 1024 if backend != "triton" else 64
        got = eat_features(audio[None], sample_rate=sr, target_length=target, backend=backend)
        assert_close_logmel(got[0, 0], upstream_eat(audio, sr, target), backend, f"recording at {sr} Hz")


def test_cpp_and_reference_agree_on_a_full_batch():
    if "cpp" not in cpu_backends():
        pytest.skip("C++ extension not built")
    x = torch.randn(4, 160000) * 0.1
    lengths = torch.tensor([160000, 159999, 100000, 399])
    a = eat_features(x, lengths, backend="cpp")
    b = eat_features(x, lengths, backend="reference")
    assert (a - b).abs().max() <= 1e-4


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,needle",
    [
        (lambda: eat_features(torch.zeros(800)), ValueError, "waveforms"),
        (lambda: eat_features(torch.zeros(2, 800), torch.tensor([800, 801])), ValueError, "lengths"),
        (lambda: eat_features(torch.zeros(1, 800), target_length=0), ValueError, "target_length"),
        (lambda: eat_features(torch.zeros(1, 800), norm_std=0.0), ValueError, "norm_std"),
        (lambda: eat_features(torch.zeros(1, 800), sample_rate=0), ValueError, "sample_rate"),
        (lambda: eat_features(torch.zeros(1, 800), dtype=torch.int64), TypeError, "dtype"),
        (lambda: eat_features(torch.zeros(1, 800), backend="fast"), ValueError, "backend"),
    ],
)
def test_bad_input_is_named(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"norm_std": float("inf")}, "norm_std"),
        ({"norm_std": float("nan")}, "norm_std"),
        ({"norm_std": -4.569}, "norm_std"),
        ({"norm_mean": float("nan")}, "norm_mean"),
        ({"norm_mean": float("inf")}, "norm_mean"),
        ({"norm_mean": -float("inf")}, "norm_mean"),
    ],
)
def test_eat_features_refuses_non_finite_normalisation(kwargs, needle):
    # accepted, norm_std=inf would give all-zero features and norm_mean=nan all-NaN ones, silently
    with pytest.raises(ValueError, match=needle):
        eat_features(torch.zeros(1, 800), **kwargs)


@pytest.mark.parametrize("backend", cpu_backends())
def test_overflowing_features_of_finite_input_raise(backend):
    check_overflowing_features_raise(eat_features, backend)


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda: eat_features(torch.zeros(1, 800), target_length=2**31), "target_length"),
        (lambda: eat_features(torch.zeros(4, 800), target_length=2**22), "target_length"),  # 2**31 output elements
        (lambda: eat_features(torch.zeros(1, 800), sample_rate=2**63 - 1), "sample_rate"),
        # under the rate cap, but shares no factor with 16 kHz: a 16000 x 1e6 resampling filter
        (lambda: eat_features(torch.zeros(1, 800), sample_rate=1_000_003), "sample_rate"),
        (lambda: torch.ops.sslam_fast.eat_features(torch.zeros(1, 800), torch.tensor([800]), 2**40, 0.0, 1.0,
                                                   torch.float32, "reference"), "target_length"),
    ],
)
def test_huge_sizes_are_refused_before_allocating(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_rate_limits_accept_real_rates():
    x = torch.randn(1, 4410) * 0.1
    for sr in (8000, 11025, 22050, 44100, 48000, 96000, 192000):
        assert eat_features(x, sample_rate=sr, target_length=8, backend="reference").shape == (1, 1, 8, 128)


def test_env_backend_is_honoured(monkeypatch):
    monkeypatch.setenv("SSLAM_FAST_BACKEND", "reference")
    assert _backend.base_name(_backend.resolve("eat_features", "auto", "cpu")) == "reference"


# --- op framework ----------------------------------------------------------------------------------------------------


def test_opcheck_and_compile():
    x = signals(4000)["noise"].reshape(2, 2000)
    lengths = torch.tensor([2000, 1500])
    torch.library.opcheck(
        torch.ops.sslam_fast.eat_features.default, (x, lengths, 16, -4.268, 4.569, torch.float32, "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )

    def f(w, n):
        return eat_features(w, n, target_length=16, backend="reference") * 2

    compiled = torch.compile(f, backend="eager", fullgraph=False)
    assert torch.equal(compiled(x, lengths), f(x, lengths))


@pytest.mark.cuda
def test_cuda_backends_match_reference():
    x = torch.randn(96, 160000, device="cuda") * 0.1
    lengths = torch.randint(100, 160001, (96,), device="cuda")
    want = eat_features(x.cpu(), lengths.cpu(), backend="reference")
    for backend in _backend.available_backends("eat_features", "cuda"):
        if backend == "reference":
            continue
        got = eat_features(x, lengths, backend=backend).cpu()
        assert_close_logmel(got, want, backend if backend in TOL else "triton", f"cuda {backend}")
