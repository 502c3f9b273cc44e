"""Plain-PyTorch Kaldi filterbank and EAT input transform: ALGORITHM §1 in code, the CPU fallback, the test oracle.

Mirrors ``torchaudio.compliance.kaldi.fbank`` (``_get_window``, ``get_mel_banks``) with the arguments EAT/SSLAM use
(``[E] data/raw_audio_dataset.py : RawAudioDataset.postprocess``, ``feature_extract/feature_extract.py``):
``htk_compat=True, sample_frequency=16000, use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0,
frame_shift=10`` and defaults otherwise. Each step is the same float32 operation torchaudio performs, applied to a
batch of rows at once, so the values agree with the per-clip loop to float32 rounding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

EPS = torch.finfo(torch.float32).eps  # 1.1920929e-07: torchaudio's log floor
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
EAT_SAMPLE_RATE = 16000


@dataclass(frozen=True)
class FrameParams:
    """Frame geometry at a sample rate: 25 ms frames every 10 ms, FFT size the next power of two."""

    frame_length: int
    frame_shift: int
    n_fft: int

    @staticmethod
    def at(sample_rate: int) -> FrameParams:
        length = int(sample_rate * FRAME_LENGTH_MS * 0.001)
        shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
        return FrameParams(length, shift, 1 << (length - 1).bit_length())

    def num_frames(self, num_samples: int) -> int:
        """Frames of a row with ``num_samples`` samples (``snip_edges=True``); 0 when shorter than one frame."""
        if num_samples < self.frame_length:
            return 0
        return 1 + (num_samples - self.frame_length) // self.frame_shift


def _mel(freq):
    return 1127.0 * (1.0 + freq / 700.0).log()


@functools.lru_cache(maxsize=16)
def _mel_banks_cpu(num_bins: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    if num_bins <= 3:
        raise ValueError(f"num_mel_bins must be at least 4, got {num_bins}")
    nyquist = 0.5 * sample_rate
    # Scalar band edges in float64 (python floats), grids in float32, as get_mel_banks computes them.
    mel_lo = 1127.0 * math.log(1.0 + LOW_FREQ / 700.0)
    mel_hi = 1127.0 * math.log(1.0 + nyquist / 700.0)
    delta = (mel_hi - mel_lo) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_lo + b * delta
    center = mel_lo + (b + 1.0) * delta
    right = mel_lo + (b + 2.0) * delta
    mel = _mel((sample_rate / n_fft) * torch.arange(n_fft / 2)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    # The Nyquist bin gets weight 0 (torchaudio pads one zero column).
    return torch.nn.functional.pad(banks, (0, 1)).contiguous()


@functools.lru_cache(maxsize=32)
def _on_device(make, args: tuple, device: str) -> torch.Tensor:
    """One copy of a constant operand per device: a copy at every call would be a blocking host-to-device transfer
    on a GPU (and would defeat the Triton kernel's operand cache, keyed on the tensor)."""
    return make(*args).to(device)


def _device_key(device) -> str | None:
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def mel_banks(num_bins: int = 128, n_fft: int = 512, sample_rate: int = EAT_SAMPLE_RATE, device=None) -> torch.Tensor:
    """(num_bins, n_fft // 2 + 1) float32 Kaldi triangular mel filters, equal to torchaudio's ``get_mel_banks``.
    Cached per device: treat the result as read-only."""
    key = _device_key(device)
    if key is None or key == "cpu":
        return _mel_banks_cpu(num_bins, n_fft, sample_rate)
    return _on_device(_mel_banks_cpu, (num_bins, n_fft, sample_rate), key)


@functools.lru_cache(maxsize=16)
def _window_cpu(length: int) -> torch.Tensor:
    return torch.hann_window(length, periodic=False, dtype=torch.float32)  # Kaldi 'hanning' is the symmetric Hann


def hanning(length: int, device=None) -> torch.Tensor:
    """Kaldi's symmetric Hann window, float32; cached per device: treat the result as read-only."""
    key = _device_key(device)
    if key is None or key == "cpu":
        return _window_cpu(length)
    return _on_device(_window_cpu, (length,), key)


def frame_counts(lengths: torch.Tensor, params: FrameParams) -> torch.Tensor:
    """Per-row frame counts (int64) for per-row sample counts."""
    n = (lengths - params.frame_length).div(params.frame_shift, rounding_mode="floor") + 1
    return torch.where(lengths >= params.frame_length, n, torch.zeros_like(n))


def kaldi_fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor,
    num_frames: int,
    sample_rate: int = EAT_SAMPLE_RATE,
    num_mel_bins: int = 128,
) -> torch.Tensor:
    """Batched Kaldi log-mel filterbank.

    Args:
        waveforms: (B, N) float; row b holds ``lengths[b]`` valid samples.
        lengths: (B,) int64 valid samples per row.
        num_frames: T, the output frame count (normally the longest row's).
        sample_rate, num_mel_bins: as torchaudio's ``sample_frequency`` and ``num_mel_bins``.

    Returns:
        (B, T, num_mel_bins) float32. Frames past a row's own count are 0.
    """
    p = FrameParams.at(sample_rate)
    x = waveforms.to(torch.float32)
    B, N = x.shape
    out = x.new_zeros((B, num_frames, num_mel_bins))
    if num_frames == 0 or B == 0:
        return out
    frames = x.unfold(1, p.frame_length, p.frame_shift)[:, :num_frames]  # (B, T, L), a view
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove_dc_offset
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[-1] := x[0] (replicate pad)
    frames = frames - PREEMPHASIS * prev
    frames = frames * hanning(p.frame_length, x.device)
    power = torch.fft.rfft(frames, n=p.n_fft).abs().pow(2)  # (B, T, n_fft/2 + 1)
    mel = torch.matmul(power, mel_banks(num_mel_bins, p.n_fft, sample_rate, x.device).T)
    logmel = torch.clamp_min(mel, EPS).log()
    valid = torch.arange(num_frames, device=x.device) < frame_counts(lengths, p).unsqueeze(1)
    return torch.where(valid.unsqueeze(-1), logmel, out)


def zero_tail(waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Float32 rows with every sample past the row's length set to 0 (for batched work that reads the padding)."""
    x = waveforms.to(torch.float32)
    valid = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(1)
    return torch.where(valid, x, torch.zeros_like(x))


def clip_means(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) float32 mean of each row over its valid samples (0 for an empty row).

    On CPU each row's mean is ``x[b, :L].mean()``, the very reduction upstream runs on the clip, so the subtraction
    gives bit-identical samples. That matters: bins whose energy sits near the float32 FFT noise floor (pure tones,
    chirps) move by up to ~1e-2 in the log domain when the FFT input changes by one ulp. On CUDA one batched masked
    sum is used instead (no per-row launches); it can differ from upstream by an ulp.
    """
    x = x.to(torch.float32)
    if x.is_cuda:
        return zero_tail(x, lengths).sum(dim=1) / lengths.clamp_min(1).to(torch.float32)
    means = torch.zeros(x.shape[0], dtype=torch.float32)
    for b, n in enumerate(lengths.tolist()):
        if n > 0:
            means[b] = x[b, :n].mean()
    return means


def remove_clip_mean(waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x - mean(x)`` over each row's valid samples (ALGORITHM §1.3). Samples past a row's length never enter a
    frame."""
    x = waveforms.to(torch.float32)
    return x - clip_means(x, lengths).unsqueeze(1)


def normalise_and_pad(
    logmel: torch.Tensor, target_length: int, norm_mean: float, norm_std: float, dtype: torch.dtype
) -> torch.Tensor:
    """Zero-pad or crop (B, T, F) log-mels to ``target_length`` frames, then ``(x - mean) / (2 std)``: (B, 1, T', F)."""
    T = logmel.shape[1]
    if T >= target_length:
        logmel = logmel[:, :target_length]
    else:
        logmel = torch.nn.functional.pad(logmel, (0, 0, 0, target_length - T))
    return ((logmel - norm_mean) / (norm_std * 2)).unsqueeze(1).to(dtype)


def eat_features(
    waveforms16k: torch.Tensor,
    lengths: torch.Tensor,
    target_length: int = 1024,
    norm_mean: float = -4.268,
    norm_std: float = 4.569,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """EAT input transform of 16 kHz rows (resampling is done by the caller): (B, 1, target_length, 128)."""
    x = remove_clip_mean(waveforms16k, lengths)
    p = FrameParams.at(EAT_SAMPLE_RATE)
    T = min(p.num_frames(x.shape[1]), target_length)
    logmel = kaldi_fbank(x, lengths, T, EAT_SAMPLE_RATE, 128)
    return normalise_and_pad(logmel, target_length, norm_mean, norm_std, dtype)
