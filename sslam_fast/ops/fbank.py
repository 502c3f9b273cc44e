"""Kaldi-compatible log-mel filterbanks and the whole EAT input transform, as dispatching custom ops.

``kaldi_fbank`` equals ``torchaudio.compliance.kaldi.fbank`` with EAT's arguments, row by row, on a padded batch.
``eat_features`` is ALGORITHM §1 steps 2-6 in one call: resample to 16 kHz, clip-mean removal, fbank, pad/crop to
``target_length`` frames and ``(x - mean) / (2 std)``.

Backends: ``reference`` (plain PyTorch, any device), ``cpp`` (``sslam_fast._C``: OpenMP framing, torch's FFT, sparse
mel, fused log and normalisation), ``triton`` (one fused kernel per tile of frames with the real DFT as ``tl.dot``;
CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
import numbers

import torch

from sslam_fast import _backend
from sslam_fast._checks import (
    FLOAT_DTYPES,
    MAX_SIZE,
    check_elements,
    check_finite,
    check_lengths,
    check_positive_int,
    check_tensor,
    value_checks_enabled,
)
from sslam_fast.reference import fbank as ref

__all__ = ["kaldi_fbank", "eat_features"]

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Size limits of the arguments (see sslam_fast._checks for the general ones). The sample rate sizes the frames, the
# FFT and the mel matrix (n_fft = 32768 at the limit, above the 768 kHz of the fastest audio interfaces); the mel
# filters, the (M, n_fft / 2 + 1) matrix and the output width (Kaldi set-ups use 23 to 128, EAT 128).
MAX_SAMPLE_RATE = 1 << 20
MAX_MEL_BINS = 4096
# torchaudio's resampling filter for orig -> 16 kHz is a (new, orig + 2 width) float64 matrix in the rates reduced by
# their gcd: small for every real rate (44.1 kHz: 160 x 1898), but 16000 x 1e6 (128 GB) for a rate near 1 MHz that
# shares no factor with 16000. Refused above this many elements (128 MiB of float64).
MAX_RESAMPLE_KERNEL = 1 << 24


def _fused_kernel(waveforms, lengths, offsets, window, banks, p, num_frames, out_frames, shift, scale, out_dtype):
    """``sslam_fast._C``'s fbank_fused: the C++ kernel on CPU tensors, the CUDA one (cuFFT, exact fp32) on GPU."""
    out = torch.ops.sslam_fast.fbank_fused(
        waveforms, lengths, offsets, window, banks, p.frame_length, p.frame_shift, p.n_fft, num_frames, out_frames,
        shift, scale,
    )
    return out.to(out_dtype)


def _triton_kernel(waveforms, lengths, offsets, window, banks, p, num_frames, out_frames, shift, scale, out_dtype):
    from sslam_fast.kernels.fbank import fbank_triton

    return fbank_triton(
        waveforms, lengths, offsets, window, banks, p.frame_length, p.frame_shift, p.n_fft, num_frames, out_frames,
        shift, scale, out_dtype,
    )


def _reference_kernel(waveforms, lengths, offsets, window, banks, p, num_frames, out_frames, shift, scale, out_dtype):
    x = waveforms - offsets.unsqueeze(1)
    T = min(num_frames, out_frames)
    logmel = ref.kaldi_fbank(x, lengths, T, _rate_of(p), banks.shape[0])
    logmel = torch.nn.functional.pad(logmel, (0, 0, 0, out_frames - T))
    return ((logmel - shift) * scale).to(out_dtype)


def _rate_of(p: ref.FrameParams) -> int:
    return p.frame_shift * 100  # 10 ms shift


_FBANK = _backend.register_op(
    _backend.OpBackends(
        "fbank",
        kernels={"reference": _reference_kernel, "cpp": _fused_kernel, "triton": _triton_kernel, "cuda": _fused_kernel},
        checks={
            "cpp": lambda d: _backend.extension_has("fbank_fused"),
            "cuda": lambda d: _backend.cuda_extension_built() and _backend.extension_has("fbank_fused"),
        },
        # The fused Triton kernel reads the waveform once and writes the output once; the CUDA path writes frames
        # and a complex spectrum in between (cuFFT), so Triton is preferred on the GPU.
        preference={"cuda": ("triton", "cuda", "reference")},
    )
)


def _run(backend, waveforms, lengths, offsets, sample_rate, num_mel_bins, num_frames, out_frames, shift, scale, dtype):
    p = ref.FrameParams.at(sample_rate)
    dev = waveforms.device
    window = ref.hanning(p.frame_length, dev)
    banks = ref.mel_banks(num_mel_bins, p.n_fft, sample_rate, dev)
    fn = _backend.kernel("fbank", backend)
    return fn(waveforms.contiguous(), lengths, offsets, window, banks, p, num_frames, out_frames, shift, scale, dtype)


def _check_op_sizes(rows: int, frames_name: str, frames: int, *, sample_rate: int, num_mel_bins: int) -> None:
    """The int arguments of the custom ops in range (ValueError naming the argument; ints only, no tensor read)."""
    for name, value, low, high in (
        ("sample_rate", sample_rate, 200, MAX_SAMPLE_RATE),
        ("num_mel_bins", num_mel_bins, 4, MAX_MEL_BINS),
        (frames_name, frames, 0, MAX_SIZE),
    ):
        if not low <= value <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    check_elements("the filterbank", rows=rows, **{frames_name: frames}, num_mel_bins=num_mel_bins)


# --- custom ops -------------------------------------------------------------------------------------------------------


@torch.library.custom_op("sslam_fast::kaldi_fbank", mutates_args=())
def _kaldi_fbank_op(
    waveforms: torch.Tensor, lengths: torch.Tensor, num_frames: int, sample_rate: int, num_mel_bins: int, backend: str
) -> torch.Tensor:
    # Callable directly (torch.ops.sslam_fast.kaldi_fbank): the sizes are checked here too, before the window, the mel
    # matrix and the output are allocated from them.
    _check_op_sizes(waveforms.shape[0], "num_frames", num_frames, sample_rate=sample_rate, num_mel_bins=num_mel_bins)
    zeros = waveforms.new_zeros(waveforms.shape[0])
    if _backend.base_name(backend) == "reference":  # the spec in code, without the offset/normalisation plumbing
        return ref.kaldi_fbank(waveforms, lengths, num_frames, sample_rate, num_mel_bins)
    return _run(backend, waveforms, lengths, zeros, sample_rate, num_mel_bins, num_frames, num_frames, 0.0, 1.0,
                torch.float32)


@_kaldi_fbank_op.register_fake
def _(waveforms, lengths, num_frames, sample_rate, num_mel_bins, backend):
    return waveforms.new_empty((waveforms.shape[0], num_frames, num_mel_bins), dtype=torch.float32)


@torch.library.custom_op("sslam_fast::eat_features", mutates_args=())
def _eat_features_op(
    waveforms: torch.Tensor,
    lengths: torch.Tensor,
    target_length: int,
    norm_mean: float,
    norm_std: float,
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    _check_op_sizes(
        waveforms.shape[0], "target_length", target_length, sample_rate=ref.EAT_SAMPLE_RATE, num_mel_bins=128
    )
    if _backend.base_name(backend) == "reference":
        return ref.eat_features(waveforms, lengths, target_length, norm_mean, norm_std, dtype)
    x = waveforms.to(torch.float32)
    offsets = ref.clip_means(x, lengths)
    p = ref.FrameParams.at(ref.EAT_SAMPLE_RATE)
    num_frames = min(p.num_frames(x.shape[1]), target_length)
    out = _run(backend, x, lengths, offsets, ref.EAT_SAMPLE_RATE, 128, num_frames, target_length, norm_mean,
               1.0 / (2.0 * norm_std), dtype)
    return out.unsqueeze(1)


@_eat_features_op.register_fake
def _(waveforms, lengths, target_length, norm_mean, norm_std, dtype, backend):
    return waveforms.new_empty((waveforms.shape[0], 1, target_length, 128), dtype=dtype)


# --- public functions -------------------------------------------------------------------------------------------------


def _validate_waveforms(waveforms, lengths, sample_rate):
    check_tensor("waveforms", waveforms, ndim=2, dtypes=FLOAT_DTYPES + (torch.int16,))
    check_positive_int("sample_rate", sample_rate, maximum=MAX_SAMPLE_RATE)
    lengths = check_lengths(lengths, waveforms.shape[0], waveforms.shape[1], waveforms.device)
    if waveforms.dtype == torch.int16:  # 16-bit PCM, scaled as soundfile's float32 read does
        waveforms = waveforms.to(torch.float32) / 32768.0
    else:
        check_finite("waveforms", waveforms)
    return waveforms, lengths


def kaldi_fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    backend: str = "auto",
) -> torch.Tensor:
    """Kaldi log-mel filterbank of a batch of rows.

    Args:
        waveforms: (B, N) float (or int16 PCM, scaled by 1/32768).
        lengths: (B,) int valid samples per row; None means every row has N.
        sample_rate: Hz, in [200, 2**20]; 25 ms frames every 10 ms, FFT size the next power of two.
        num_mel_bins: mel filters, in [4, 4096].
        backend: "auto" | "reference" | "triton" | "cpp" (see ``sslam_fast._backend``).

    Returns:
        (B, T, num_mel_bins) float32; row b equals ``torchaudio.compliance.kaldi.fbank(waveforms[b, :lengths[b]][None],
        htk_compat=True, sample_frequency=sample_rate, use_energy=False, window_type='hanning',
        num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10)``. T is the longest row's frame count; frames past a
        row's own count are 0. A row shorter than one frame (where torchaudio raises) has no frames. Non-finite
        features of a finite input (its power overflows float32) raise ValueError (a value check).
    """
    waveforms, lengths = _validate_waveforms(waveforms, lengths, sample_rate)
    check_positive_int("num_mel_bins", num_mel_bins)
    if not 4 <= num_mel_bins <= MAX_MEL_BINS:
        raise ValueError(f"num_mel_bins must lie in [4, {MAX_MEL_BINS}], got {num_mel_bins}")
    if sample_rate < 200:
        raise ValueError(f"sample_rate must be at least 200 Hz for a 25 ms frame, got {sample_rate}")
    chosen = _backend.resolve("fbank", backend, waveforms.device)
    p = ref.FrameParams.at(sample_rate)
    longest = int(lengths.max()) if lengths.numel() else 0
    num_frames = p.num_frames(longest)
    check_elements("the filterbank", rows=waveforms.shape[0], frames=num_frames, num_mel_bins=num_mel_bins)
    out = _kaldi_fbank_op(waveforms, lengths, num_frames, sample_rate, num_mel_bins, chosen)
    _check_features_finite("kaldi_fbank", out)
    return out


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_resample_rate(sample_rate: int) -> None:
    """Refuse a rate whose torchaudio resampling filter to 16 kHz would be huge (see MAX_RESAMPLE_KERNEL)."""
    if sample_rate == ref.EAT_SAMPLE_RATE:
        return
    g = math.gcd(sample_rate, ref.EAT_SAMPLE_RATE)
    orig, new = sample_rate // g, ref.EAT_SAMPLE_RATE // g
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))  # torchaudio's lowpass_filter_width=6, rolloff=0.99
    taps = new * (orig + 2 * width)
    if taps > MAX_RESAMPLE_KERNEL:
        raise ValueError(
            f"sample_rate={sample_rate}: resampling to {ref.EAT_SAMPLE_RATE} Hz reduces to the ratio {orig}:{new}, "
            f"whose filter would have {taps} elements (limit {MAX_RESAMPLE_KERNEL}); resample to a rate sharing "
            f"more factors with {ref.EAT_SAMPLE_RATE} first"
        )


def _check_features_finite(op: str, out: torch.Tensor) -> None:
    """A value check (a host sync on a GPU, skipped when value checks are off): the input was checked finite, but the
    power spectrum of a huge finite waveform (|x| ~ 1e20 and more) overflows float32, and the features come out
    inf or NaN. Raise instead of handing them on."""
    if not value_checks_enabled() or not out.numel():
        return
    if bool(torch.isfinite(out.sum(dtype=torch.float32))) or bool(torch.isfinite(out).all()):
        return
    n_nan, n_inf = int(torch.isnan(out).sum()), int(torch.isinf(out).sum())
    raise ValueError(
        f"{op}: the features are not finite ({n_nan} NaN, {n_inf} Inf) although the waveforms are: their power "
        f"overflows float32; scale the waveforms to a sane range (e.g. [-1, 1])"
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
    ``kaldi_fbank``.
    """
    waveforms, lengths = _validate_waveforms(waveforms, lengths, sample_rate)
    _check_resample_rate(sample_rate)
    check_positive_int("target_length", target_length, maximum=MAX_SIZE)
    check_elements("the features", rows=waveforms.shape[0], target_length=target_length, mel_bins=128)
    if isinstance(norm_std, bool) or not isinstance(norm_std, numbers.Real):
        raise ValueError(f"norm_std must be a positive number, got {norm_std!r}")
    if not (math.isfinite(norm_std) and norm_std > 0):
        raise ValueError(f"norm_std must be finite and positive, got {norm_std!r}")
    norm_mean = _check_real("norm_mean", norm_mean)
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dtype must be one of {_OUT_DTYPES}, got {dtype}")
    chosen = _backend.resolve("fbank", backend, waveforms.device)
    if sample_rate != ref.EAT_SAMPLE_RATE:
        waveforms, lengths = resample_rows(waveforms, lengths, sample_rate, ref.EAT_SAMPLE_RATE)
    out = _eat_features_op(waveforms, lengths, target_length, norm_mean, float(norm_std), dtype, chosen)
    _check_features_finite("eat_features", out)
    return out
