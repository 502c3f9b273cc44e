"""Oracles and signals shared by the filterbank tests (kaldi_fbank, eat_features and their kernels).

A float64 oracle for the log-mel: the exact DFT and mel of the very same fp32 frames the reference builds. Pure tones
and sweeps put most mel bands 100-150 dB under the peak, where the fp32 rounding of any DFT dominates: there torch's
fp32 rFFT (torchaudio, the reference) is itself 4e-5 to 1.2e-4 mean abs away from the exact result. A kernel with a
different fp32 DFT is judged on such signals by being at least as close to this oracle as torchaudio.

Also torchaudio's per-clip pipeline (the upstream loader), the test signals and the tolerances of the backends.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sslam_fast.reference import kaldi_fbank as ref

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KALDI_ARGS = dict(htk_compat=True, use_energy=False, window_type="hanning", dither=0.0, frame_shift=10)

# Reference and C++: max abs 1e-4 on the log-mel. Triton (real DFT as tl.dot): max abs 5e-3 and mean abs 1e-5.
TOL = {"reference": (1e-4, None), "cpp": (1e-4, None), "triton": (5e-3, 1e-5)}
TONAL = {"tone", "chirp"}  # pure tones and sweeps: ill-conditioned in fp32 (see exact_logmel)


def exact_logmel(x: torch.Tensor, lengths: torch.Tensor, num_frames: int, banks: torch.Tensor,
                 p: ref.FrameParams | None = None) -> torch.Tensor:
    """(B, num_frames, M) float64: framing, DC removal, pre-emphasis and window in fp32 (as the reference), then the
    DFT, mel and log in float64. Frames past a row's count are 0."""
    p = p or ref.FrameParams.at(16000)
    fr = x.float().unfold(1, p.frame_length, p.frame_shift)[:, :num_frames]
    fr = fr - fr.mean(dim=-1, keepdim=True)
    prev = torch.cat([fr[..., :1], fr[..., :-1]], dim=-1)
    fr = (fr - ref.PREEMPHASIS * prev) * ref.hanning(p.frame_length)
    power = torch.fft.rfft(fr.double(), n=p.n_fft).abs().pow(2)
    logmel = (power @ banks.double().T).clamp_min(ref.EPS).log()
    valid = torch.arange(num_frames) < ref.frame_counts(lengths, p).unsqueeze(1)
    return torch.where(valid.unsqueeze(-1), logmel, torch.zeros((), dtype=torch.float64))


def upstream_fbank(row: torch.Tensor, sample_rate=16000, num_mel_bins=128) -> torch.Tensor:
    import torchaudio.compliance.kaldi as kaldi

    return kaldi.fbank(row[None].float(), sample_frequency=sample_rate, num_mel_bins=num_mel_bins, **KALDI_ARGS)


def upstream_eat(row: torch.Tensor, sample_rate: int, target_length: int, mean=-4.268, std=4.569) -> torch.Tensor:
    """ALGORITHM §1 steps 2-6 for one clip, exactly as the upstream dataset and inference scripts do them."""
    import torchaudio.functional as AF

    x = row.float()
    if sample_rate != 16000:
        x = AF.resample(x, sample_rate, 16000)
    x = x - x.mean()
    if x.numel() < 400:
        fb = torch.zeros(0, 128)  # torchaudio raises here; the ops define it as no frames
    else:
        fb = upstream_fbank(x)
    n = fb.shape[0]
    fb = torch.nn.functional.pad(fb, (0, 0, 0, target_length - n)) if n < target_length else fb[:target_length]
    return (fb - mean) / (std * 2)


def exact_fbank(row: torch.Tensor) -> torch.Tensor:
    """float64 oracle of one 16 kHz row, (T, 128)."""
    p = ref.FrameParams.at(16000)
    n = torch.tensor([row.numel()])
    return exact_logmel(row[None].float(), n, p.num_frames(row.numel()), ref.mel_banks())[0]


def exact_eat(row: torch.Tensor, sample_rate: int, target_length: int) -> torch.Tensor:
    """float64 oracle of ``upstream_eat`` (the same fp32 resampling and mean removal, then the exact fbank)."""
    import torchaudio.functional as AF

    x = row.float()
    if sample_rate != 16000:
        x = AF.resample(x, sample_rate, 16000)
    fb = exact_fbank(x - x.mean())
    n = fb.shape[0]
    fb = torch.nn.functional.pad(fb, (0, 0, 0, target_length - n)) if n < target_length else fb[:target_length]
    return (fb + 4.268) / (4.569 * 2)


def signals(n: int, sr: int = 16000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    t = torch.arange(n) / sr
    chirp_phase = 2 * math.pi * (100 * t + 0.5 * (7000 - 100) / (n / sr) * t**2)
    return {
        "noise": 0.3 * torch.randn(n, generator=g),
        "tone": 0.5 * torch.sin(2 * math.pi * 440.0 * t) + 0.2 * torch.sin(2 * math.pi * 3001.0 * t),
        "chirp": 0.4 * torch.sin(chirp_phase),
        "near_silence": 1e-6 * torch.randn(n, generator=g),
        "clipped": torch.clamp(3.0 * torch.sign(torch.sin(2 * math.pi * 97.0 * t)), -1.0, 1.0),
        "dc_offset": 0.8 + 0.01 * torch.randn(n, generator=g),
    }


def batch_of(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.int64)
    x = torch.zeros(len(rows), int(lengths.max()))
    for i, r in enumerate(rows):
        x[i, : r.numel()] = r
    return x, lengths


def row_size(backend: str) -> int:
    # The Triton interpreter runs ~2 M elements/s: keep its rows short.
    return 16000 if backend != "triton" else 5200


def assert_close_logmel(got: torch.Tensor, want: torch.Tensor, backend: str, what: str, exact=None):
    """The backends' tolerances (TOL) against torchaudio (``want``).

    For the Triton DFT on pure tones and sweeps, ``exact`` (the float64 oracle) is given: torchaudio's fp32 rFFT is
    itself up to ~5e-3 max and ~1e-4 mean away from the exact result there (see exact_logmel), so the kernel is held
    to the max bound against the exact result and to a mean error at most 1.5x torchaudio's own.
    """
    max_tol, mean_tol = TOL[backend]
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if exact is not None and mean_tol is not None:
        err_got = (got.double() - exact).abs()
        err_torchaudio = (want.double() - exact).abs().mean()
        assert err_got.max() <= max_tol, f"{what} [{backend}]: max abs error vs exact {err_got.max():.3g}"
        assert err_got.mean() <= 1.5 * err_torchaudio + mean_tol, (
            f"{what} [{backend}]: mean abs error vs exact {err_got.mean():.3g}, torchaudio's {err_torchaudio:.3g}"
        )
        return
    err = (got.float() - want.float()).abs()
    assert err.max() <= max_tol, f"{what} [{backend}]: max abs error {err.max():.3g} > {max_tol}"
    if mean_tol is not None:
        assert err.mean() <= mean_tol, f"{what} [{backend}]: mean abs error {err.mean():.3g} > {mean_tol}"


def check_overflowing_features_raise(fn, backend: str) -> None:
    """A finite but huge waveform (1e30) passes the input check, but its power spectrum overflows float32 and the
    features come out inf / NaN. A value check raises; with value checks off (the trainer's steady state, no host
    sync) the op returns them as they are."""
    import pytest

    from sslam_fast._checks import value_checks

    x = signals(row_size(backend))["noise"][None] * 1e30
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="features are not finite"):
        fn(x, backend=backend)
    with value_checks(False):
        out = fn(x, backend=backend)
    assert not torch.isfinite(out).all()
    assert torch.isfinite(fn(x * 1e-30, backend=backend)).all()
