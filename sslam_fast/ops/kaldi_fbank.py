"""The Kaldi-compatible log-mel filterbank of a padded batch: ``kaldi_fbank`` (ALGORITHM §1 step 4), and the fused
filterbank backends it shares with ``eat_features`` (sslam_fast.ops.eat_features).

``kaldi_fbank`` equals ``torchaudio.compliance.kaldi.fbank`` with EAT's arguments, row by row.

Backends: ``reference`` (sslam_fast.reference.kaldi_fbank, any device), ``cpp`` (csrc/kaldi_fbank.cpp: OpenMP framing,
torch's FFT, sparse mel, fused log and normalisation), ``cuda`` (csrc/cuda/kaldi_fbank.cu: cuFFT, exact fp32) and
``triton`` (kernels/kaldi_fbank.py: one fused kernel per tile of frames with the real DFT as ``tl.dot``; CUDA, or CPU
under ``TRITON_INTERPRET=1``). The three fused ones compute ``(log-mel - shift) * scale`` of ``x - offset`` per row
in one call (:func:`fused_fbank`): ``kaldi_fbank`` runs them with offset 0, shift 0 and scale 1.
"""

from __future__ import annotations

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
from sslam_fast.reference import kaldi_fbank as ref

__all__ = ["kaldi_fbank"]

# Size limits of the arguments (see sslam_fast._checks for the general ones). The sample rate sizes the frames, the
# FFT and the mel matrix (n_fft = 32768 at the limit, above the 768 kHz of the fastest audio interfaces); the mel
# filters, the (M, n_fft / 2 + 1) matrix and the output width (Kaldi set-ups use 23 to 128, EAT 128).
MAX_SAMPLE_RATE = 1 << 20
MAX_MEL_BINS = 4096

# --- the fused backends (kaldi_fbank and eat_features) ----------------------------------------------------------------

FUSED_BACKENDS = ("cpp", "cuda", "triton")
FUSED_CHECKS = {
    "cpp": _backend.compiled_available("fbank"),
    "cuda": lambda device_type: _backend.cuda_extension_built() and _backend.extension_has("fbank"),
}
# The fused Triton kernel reads the waveform once and writes the output once; the CUDA path writes frames and a
# complex spectrum in between (cuFFT), so Triton is preferred on the GPU.
FUSED_PREFERENCE = {"cuda": ("triton", "cuda", "reference")}

# sslam_fast_C::fbank: the C++ kernel on CPU tensors, the CUDA one on GPU tensors (float32 output).
_compiled_fbank = _backend.compiled("fbank")
_triton_fbank = _backend.triton_kernel("kaldi_fbank", "fbank_triton")

if _backend.extension_has("fbank"):

    @torch.library.register_fake("sslam_fast_C::fbank")
    def _(waveforms, lengths, offsets, window, mel_banks, frame_length, frame_shift, n_fft, num_frames, out_frames,
          shift, scale):
        return waveforms.new_empty((waveforms.shape[0], out_frames, mel_banks.shape[0]))


def fused_fbank(backend: str, waveforms: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor,
                sample_rate: int, num_mel_bins: int, num_frames: int, out_frames: int, shift: float, scale: float,
                out_dtype: torch.dtype) -> torch.Tensor:
    """(B, out_frames, num_mel_bins) ``(log-mel of x - offset - shift) * scale`` in ``out_dtype`` by the fused kernel
    of ``backend`` ("cpp", "cuda" or "triton"): row b's own frames below ``num_frames``, ``(0 - shift) * scale`` past
    them. ``waveforms`` (B, N) float32, ``offsets`` (B,) float32 (subtracted from every sample of a row first)."""
    p = ref.FrameParams.at(sample_rate)
    dev = waveforms.device
    window = ref.hanning(p.frame_length, dev)
    banks = ref.mel_banks(num_mel_bins, p.n_fft, sample_rate, dev)
    args = (waveforms.contiguous(), lengths, offsets, window, banks, p.frame_length, p.frame_shift, p.n_fft,
            num_frames, out_frames, shift, scale)
    if backend == "triton":
        return _triton_fbank(*args, out_dtype)
    return _compiled_fbank(*args).to(out_dtype)


# --- checks shared with eat_features ----------------------------------------------------------------------------------


def check_op_sizes(rows: int, frames_name: str, frames: int, *, sample_rate: int, num_mel_bins: int) -> None:
    """The int arguments of the custom ops in range (ValueError naming the argument; ints only, no tensor read): a
    direct call of the op checks them too, before the window, the mel matrix and the output are allocated from them."""
    for name, value, low, high in (
        ("sample_rate", sample_rate, 200, MAX_SAMPLE_RATE),
        ("num_mel_bins", num_mel_bins, 4, MAX_MEL_BINS),
        (frames_name, frames, 0, MAX_SIZE),
    ):
        if not low <= value <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    check_elements("the filterbank", rows=rows, **{frames_name: frames}, num_mel_bins=num_mel_bins)


def validate_waveforms(waveforms, lengths, sample_rate):
    """The public functions' waveforms (float, or int16 PCM scaled as soundfile's float32 read does; returned as
    float32), lengths (int64 on the waveforms' device) and sample rate."""
    check_tensor("waveforms", waveforms, ndim=2, dtypes=FLOAT_DTYPES + (torch.int16,))
    check_positive_int("sample_rate", sample_rate, maximum=MAX_SAMPLE_RATE)
    lengths = check_lengths(lengths, waveforms.shape[0], waveforms.shape[1], waveforms.device)
    if waveforms.dtype == torch.int16:
        return waveforms.to(torch.float32) / 32768.0, lengths
    check_finite("waveforms", waveforms)
    return waveforms.to(torch.float32), lengths  # every backend computes in float32


def check_features_finite(op: str, out: torch.Tensor) -> None:
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


# --- the op -----------------------------------------------------------------------------------------------------------


def _fused_kernel(backend: str):
    def run(waveforms, lengths, num_frames, sample_rate, num_mel_bins):
        zeros = waveforms.new_zeros(waveforms.shape[0])
        return fused_fbank(backend, waveforms, lengths, zeros, sample_rate, num_mel_bins, num_frames, num_frames,
                           0.0, 1.0, torch.float32)

    run.__name__ = f"kaldi_fbank_{backend}"
    return run


def _validate(waveforms, lengths, num_frames, sample_rate, num_mel_bins):
    check_op_sizes(waveforms.shape[0], "num_frames", num_frames, sample_rate=sample_rate, num_mel_bins=num_mel_bins)


_op = _backend.define_op(
    "kaldi_fbank",
    "(Tensor waveforms, Tensor lengths, SymInt num_frames, SymInt sample_rate, SymInt num_mel_bins) -> Tensor",
    fake=lambda waveforms, lengths, num_frames, sample_rate, num_mel_bins, backend: waveforms.new_empty(
        (waveforms.shape[0], num_frames, num_mel_bins), dtype=torch.float32
    ),
    kernels={"reference": ref.kaldi_fbank, **{b: _fused_kernel(b) for b in FUSED_BACKENDS}},
    checks=FUSED_CHECKS,
    preference=FUSED_PREFERENCE,
    validate=_validate,
)


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
        waveforms: (B, N) float (computed in float32) or int16 PCM (scaled by 1/32768).
        lengths: (B,) int valid samples per row; None means every row has N.
        sample_rate: Hz, in [200, 2**20]; 25 ms frames every 10 ms, FFT size the next power of two.
        num_mel_bins: mel filters, in [4, 4096].
        backend: "auto" | "reference" | "triton" | "cpp" | "cuda" (see ``sslam_fast._backend``).

    Returns:
        (B, T, num_mel_bins) float32; row b equals ``torchaudio.compliance.kaldi.fbank(waveforms[b, :lengths[b]][None],
        htk_compat=True, sample_frequency=sample_rate, use_energy=False, window_type='hanning',
        num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10)``. T is the longest row's frame count; frames past a
        row's own count are 0. A row shorter than one frame (where torchaudio raises) has no frames. Non-finite
        features of a finite input (its power overflows float32) raise ValueError (a value check).
    """
    waveforms, lengths = validate_waveforms(waveforms, lengths, sample_rate)
    check_positive_int("num_mel_bins", num_mel_bins)
    if not 4 <= num_mel_bins <= MAX_MEL_BINS:
        raise ValueError(f"num_mel_bins must lie in [4, {MAX_MEL_BINS}], got {num_mel_bins}")
    if sample_rate < 200:
        raise ValueError(f"sample_rate must be at least 200 Hz for a 25 ms frame, got {sample_rate}")
    chosen = _backend.resolve("kaldi_fbank", backend, waveforms.device)
    p = ref.FrameParams.at(sample_rate)
    longest = int(lengths.max()) if lengths.numel() else 0
    num_frames = p.num_frames(longest)
    check_elements("the filterbank", rows=waveforms.shape[0], frames=num_frames, num_mel_bins=num_mel_bins)
    out = _op(waveforms, lengths, num_frames, sample_rate, num_mel_bins, chosen)
    check_features_finite("kaldi_fbank", out)
    return out
