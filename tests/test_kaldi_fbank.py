"""kaldi_fbank, every backend, against torchaudio's per-clip Kaldi fbank (the upstream loader)."""

from __future__ import annotations

import math

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi
from fbank_oracle import (
    TONAL,
    assert_close_logmel,
    batch_of,
    check_overflowing_features_raise,
    exact_fbank,
    exact_logmel,
    row_size,
    signals,
    upstream_fbank,
)

from sslam_fast import _backend
from sslam_fast.ops import kaldi_fbank
from sslam_fast.reference import kaldi_fbank as ref


def cpu_backends():
    return _backend.available_backends("kaldi_fbank", "cpu")


@pytest.mark.parametrize("backend", cpu_backends())
def test_kaldi_fbank_matches_torchaudio_on_generated_signals(backend):
    n = row_size(backend)
    sig = signals(n)
    # Mixed lengths: full, odd, exactly one frame, shorter than one frame, one frame plus a partial shift.
    names = ["noise", "tone", "chirp", "near_silence", "clipped", "dc_offset"]
    rows = [sig["noise"], sig["tone"][: n - 777], sig["chirp"][:400], sig["near_silence"][:300],
            sig["clipped"][: 400 + 159], sig["dc_offset"][: n // 2 + 3]]
    x, lengths = batch_of(rows)
    got = kaldi_fbank(x, lengths, backend=backend)
    assert got.dtype == torch.float32
    assert got.shape == (len(rows), ref.FrameParams.at(16000).num_frames(n), 128)
    for i, r in enumerate(rows):
        if r.numel() < 400:
            assert torch.all(got[i] == 0), "a row shorter than one frame has no frames"
            continue
        want = upstream_fbank(r)
        exact = exact_fbank(r) if names[i] in TONAL else None
        assert_close_logmel(got[i, : want.shape[0]], want, backend, f"row {i} ({names[i]})", exact)
        assert torch.all(got[i, want.shape[0]:] == 0), "frames past a row's own count must be 0"


@pytest.mark.parametrize("backend", cpu_backends())
def test_all_zero_mel_filter_gives_log_eps(backend):
    x = signals(row_size(backend))["noise"][None]
    got = kaldi_fbank(x, backend=backend)
    # At 128 bins, filter 3 covers no FFT bin: its energy is exactly 0, so the output is log(eps).
    assert torch.all(ref.mel_banks()[3] == 0)
    assert torch.all(got[0, :, 3] == torch.tensor(ref.EPS).log()), got[0, :, 3]
    assert math.isclose(float(got[0, 0, 3]), -15.9424, abs_tol=1e-4)


def test_mel_banks_equal_torchaudio():
    for bins, nfft, sr in [(128, 512, 16000), (80, 512, 16000), (64, 1024, 32000)]:
        want, _ = kaldi.get_mel_banks(bins, nfft, float(sr), 20.0, 0.0, 100.0, -500.0, 1.0)
        assert torch.equal(ref.mel_banks(bins, nfft, sr)[:, :-1], want)
        assert torch.all(ref.mel_banks(bins, nfft, sr)[:, -1] == 0)


@pytest.mark.parametrize("num_mel_bins,sample_rate", [(80, 16000), (64, 8000)])
def test_kaldi_fbank_other_bins_and_rates(num_mel_bins, sample_rate):
    rows = [signals(6000, sample_rate)["chirp"], signals(6000, sample_rate)["noise"][:4321]]
    x, lengths = batch_of(rows)
    for backend in cpu_backends():
        if backend == "triton" and num_mel_bins != 80:
            continue  # interpreter time; the 80-bin case covers a non-power-of-two bin count
        got = kaldi_fbank(x, lengths, sample_rate=sample_rate, num_mel_bins=num_mel_bins, backend=backend)
        for i, r in enumerate(rows):
            want = upstream_fbank(r, sample_rate, num_mel_bins)
            p = ref.FrameParams.at(sample_rate)
            exact = None
            if i == 0:  # a pure sweep
                banks = ref.mel_banks(num_mel_bins, p.n_fft, sample_rate)
                exact = exact_logmel(r[None], torch.tensor([r.numel()]), want.shape[0], banks, p)[0]
            assert_close_logmel(got[i, : want.shape[0]], want, backend, f"{num_mel_bins} bins at {sample_rate} Hz",
                                exact)


def test_int16_input_is_scaled_like_soundfile():
    x = (signals(8000)["tone"] * 20000).round().to(torch.int16)[None]
    got = kaldi_fbank(x, backend="reference")
    want = upstream_fbank(x[0].float() / 32768.0)
    assert_close_logmel(got[0], want, "reference", "int16")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_compute_in_float32(backend, dtype):
    """Every backend takes any float waveform and computes on its float32 value (float32 features)."""
    x = (0.1 * signals(4000)["noise"]).to(dtype)[None]
    got = kaldi_fbank(x, backend=backend)
    assert got.dtype == torch.float32
    assert torch.equal(got, kaldi_fbank(x.float(), backend=backend))


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,needle",
    [
        (lambda: kaldi_fbank(torch.zeros(800)), ValueError, "waveforms"),
        (lambda: kaldi_fbank(torch.zeros(1, 1, 800)), ValueError, "waveforms"),
        (lambda: kaldi_fbank([[0.0] * 800]), TypeError, "waveforms"),
        (lambda: kaldi_fbank(torch.zeros(1, 800, dtype=torch.int32)), TypeError, "waveforms"),
        (lambda: kaldi_fbank(torch.full((1, 800), float("nan"))), ValueError, "waveforms"),
        (lambda: kaldi_fbank(torch.tensor([[0.0, float("inf")] * 400])), ValueError, "waveforms"),
        (lambda: kaldi_fbank(torch.zeros(2, 800), torch.tensor([800, 801])), ValueError, "lengths"),
        (lambda: kaldi_fbank(torch.zeros(2, 800), torch.tensor([-1, 800])), ValueError, "lengths"),
        (lambda: kaldi_fbank(torch.zeros(2, 800), torch.tensor([800])), ValueError, "lengths"),
        (lambda: kaldi_fbank(torch.zeros(2, 800), torch.tensor([800.0, 800.0])), TypeError, "lengths"),
        (lambda: kaldi_fbank(torch.zeros(1, 800), sample_rate=0), ValueError, "sample_rate"),
        (lambda: kaldi_fbank(torch.zeros(1, 800), sample_rate=-16000), ValueError, "sample_rate"),
        (lambda: kaldi_fbank(torch.zeros(1, 800), sample_rate=16000.0), TypeError, "sample_rate"),
        (lambda: kaldi_fbank(torch.zeros(1, 800), num_mel_bins=3), ValueError, "num_mel_bins"),
        (lambda: kaldi_fbank(torch.zeros(1, 800), backend="fast"), ValueError, "backend"),
    ],
)
def test_bad_input_is_named(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


@pytest.mark.parametrize("backend", cpu_backends())
def test_overflowing_features_of_finite_input_raise(backend):
    check_overflowing_features_raise(kaldi_fbank, backend)


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda: kaldi_fbank(torch.zeros(1, 800), sample_rate=2**31), "sample_rate"),
        (lambda: kaldi_fbank(torch.zeros(1, 800), sample_rate=(1 << 20) + 1), "sample_rate"),
        (lambda: kaldi_fbank(torch.zeros(1, 800), num_mel_bins=4097), "num_mel_bins"),
        (lambda: torch.ops.sslam_fast.kaldi_fbank(torch.zeros(1, 800), torch.tensor([800]), 2**40, 16000, 128,
                                                  "reference"), "num_frames"),
    ],
)
def test_huge_sizes_are_refused_before_allocating(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_unavailable_explicit_backend_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        kaldi_fbank(torch.zeros(1, 800), backend="cuda")


def test_env_backend_is_honoured(monkeypatch):
    monkeypatch.setenv("SSLAM_FAST_BACKEND", "reference")
    assert _backend.base_name(_backend.resolve("kaldi_fbank", "auto", "cpu")) == "reference"
    monkeypatch.setenv("SSLAM_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SSLAM_FAST_BACKEND"):
        _backend.resolve("kaldi_fbank", "auto", "cpu")


# --- op framework ----------------------------------------------------------------------------------------------------


def test_opcheck():
    x = signals(4000)["noise"].reshape(2, 2000)
    lengths = torch.tensor([2000, 1500])
    torch.library.opcheck(
        torch.ops.sslam_fast.kaldi_fbank.default, (x, lengths, 11, 16000, 128, "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )
