"""The whole EAT / SSLAM input transform in one call: ``eat_features`` (ALGORITHM §1 steps 2-6).

Resample to 16 kHz, clip-mean removal, Kaldi fbank, pad / crop to ``target_length`` frames and
``(x - mean) / (2 std)``.

Backends: ``reference`` (sslam_fast.reference.eat_features, any device) and the fused filterbank kernels of
``kaldi_fbank`` (``cpp``, ``cuda``, ``triton``: sslam_fast.ops.kaldi_fbank.fused_fbank), which take the clip mean as
the row offset and apply the normalisation and the padding in the same pass. Resampling runs before the op, for
every backend (:func:`resample_rows`).
"""

from __future__ import annotations

import math

import torch

from sslam_fast import _backend
from sslam_fast._checks import MAX_SIZE, MODEL_DTYPES, check_elements, check_positive_int, check_real
from sslam_fast.ops.kaldi_fbank import (
    FUSED_BACKENDS,
    FUSED_CHECKS,
    FUSED_PREFERENCE,
    check_features_finite,
    check_op_sizes,
    fused_fbank,
    validate_waveforms,
)
from sslam_fast.reference import eat_features as ref
from sslam_fast.reference.kaldi_fbank import EAT_SAMPLE_RATE, FrameParams

__all__ = ["eat_features"]

MEL_BINS = 128  # EAT's filterbank width
# torchaudio's resampling filter for orig -> 16 kHz is a (new, orig + 2 width) float64 matrix in the rates reduced by
# their gcd: small for every real rate (44.1 kHz: 160 x 1898), but 16000 x 1e6 (128 GB) for a rate near 1 MHz that
# shares no factor with 16000. Refused above this many elements (128 MiB of float64).
MAX_RESAMPLE_KERNEL = 1 << 24


def _check_resample_rate(sample_rate: int) -> None:
    """Refuse a rate whose torchaudio resampling filter to 16 kHz would be huge (see MAX_RESAMPLE_KERNEL)."""
    if sample_rate == EAT_SAMPLE_RATE:
        return
    g = math.gcd(sample_rate, EAT_SAMPLE_RATE)
    orig, new = sample_rate // g, EAT_SAMPLE_RATE // g
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))  # torchaudio's lowpass_filter_width=6, rolloff=0.99
    taps = new * (orig + 2 * width)
    if taps > MAX_RESAMPLE_KERNEL:
        raise ValueError(
            f"sample_rate={sample_rate}: resampling to {EAT_SAMPLE_RATE} Hz reduces to the ratio {orig}:{new}, "
            f"whose filter would have {taps} elements (limit {MAX_RESAMPLE_KERNEL}); resample to a rate sharing "
            f"more factors with {EAT_SAMPLE_RATE} first"
        )


def resample_rows(waveforms: torch.Tensor, lengths: torch.Tensor, orig_freq: int, new_freq: int):
    """``torchaudio.functional.resample`` of each row's valid part; returns the padded rows and their new lengths
    ``ceil(L * new / old)``.

    On CPU each row is resampled alone, exactly as the upstream loader does: a batched convolution rounds differently
    in the last bit, and for pure tones that moves the bands near the fp32 noise floor by ~1e-3 in the log domain.
    On CUDA the padded batch is resampled at once (samples past a length are zeroed first, the padding torchaudio adds
    around a lone row), equal to the per-row result up to rounding.
    """
    import torchaudio.functional as AF

    new_lengths = (lengths * new_freq + orig_freq - 1) // orig_freq
    if waveforms.is_cuda:
        y = AF.resample(ref.zero_tail(waveforms, lengths), orig_freq, new_freq)
        return y, new_lengths.clamp_max(y.shape[1])
    x = waveforms.to(torch.float32)
    width = -(-x.shape[1] * new_freq // orig_freq)
    y = x.new_zeros((x.shape[0], width))
    for b, n in enumerate(lengths.tolist()):
        if n > 0:
            row = AF.resample(x[b, :n], orig_freq, new_freq)
            y[b, : row.numel()] = row
    return y, new_lengths


# --- the op -----------------------------------------------------------------------------------------------------------


def _fused_kernel(backend: str):
    def run(waveforms, lengths, target_length, norm_mean, norm_std, dtype):
        x = waveforms.to(torch.float32)
        offsets = ref.clip_means(x, lengths)
        num_frames = min(FrameParams.at(EAT_SAMPLE_RATE).num_frames(x.shape[1]), target_length)
        out = fused_fbank(backend, x, lengths, offsets, EAT_SAMPLE_RATE, MEL_BINS, num_frames, target_length,
                          norm_mean, 1.0 / (2.0 * norm_std), dtype)
        return out.unsqueeze(1)

    run.__name__ = f"eat_features_{backend}"
    return run


def _validate(waveforms, lengths, target_length, norm_mean, norm_std, dtype):
    check_op_sizes(waveforms.shape[0], "target_length", target_length, sample_rate=EAT_SAMPLE_RATE,
                   num_mel_bins=MEL_BINS)


_op = _backend.define_op(
    "eat_features",
    "(Tensor waveforms, Tensor lengths, SymInt target_length, float norm_mean, float norm_std, ScalarType dtype) "
    "-> Tensor",
    fake=lambda waveforms, lengths, target_length, norm_mean, norm_std, dtype, backend: waveforms.new_empty(
        (waveforms.shape[0], 1, target_length, MEL_BINS), dtype=dtype
    ),
    kernels={"reference": ref.eat_features, **{b: _fused_kernel(b) for b in FUSED_BACKENDS}},
    checks=FUSED_CHECKS,
    preference=FUSED_PREFERENCE,
    validate=_validate,
)


def eat_features(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    sample_rate: int = 16000,
    target_length: int = 1024,
    norm_mean: float = -4.268,
    norm_std: float = 4.569,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """The EAT/SSLAM model input (ALGORITHM §1) of a batch of waveforms.

    Resamples to 16 kHz when ``sample_rate`` differs (``torchaudio.functional.resample`` semantics), removes each row's
    mean over its valid samples, computes the Kaldi fbank (128 bins), zero-pads or crops to ``target_length`` frames
    and returns ``(x - norm_mean) / (2 * norm_std)`` as (B, 1, target_length, 128) in ``dtype``. Padded frames hold
    ``-norm_mean / (2 norm_std)`` (0.46706 with the AudioSet constants), as upstream's zero padding gives.
    ``sample_rate`` lies in [1, 2**20] (and must not need a huge resampling filter), ``target_length`` in
    [1, 2**31 - 1] with B x target_length x 128 < 2**31, ``norm_mean`` finite and ``norm_std`` finite and > 0. Features
    that come out non-finite (the power of a huge waveform overflows float32) raise ValueError: a value check, as for
    ``kaldi_fbank``. ``backend``: "auto" | "reference" | "triton" | "cpp" | "cuda".
    """
    waveforms, lengths = validate_waveforms(waveforms, lengths, sample_rate)
    _check_resample_rate(sample_rate)
    check_positive_int("target_length", target_length, maximum=MAX_SIZE)
    check_elements("the features", rows=waveforms.shape[0], target_length=target_length, mel_bins=MEL_BINS)
    norm_std = check_real("norm_std", norm_std, positive=True)
    norm_mean = check_real("norm_mean", norm_mean)
    if dtype not in MODEL_DTYPES:
        raise TypeError(f"dtype must be one of {MODEL_DTYPES}, got {dtype}")
    chosen = _backend.resolve("eat_features", backend, waveforms.device)
    if sample_rate != EAT_SAMPLE_RATE:
        waveforms, lengths = resample_rows(waveforms, lengths, sample_rate, EAT_SAMPLE_RATE)
    out = _op(waveforms, lengths, target_length, norm_mean, norm_std, dtype, chosen)
    check_features_finite("eat_features", out)
    return out
