"""Plain-PyTorch Kaldi filterbank: ALGORITHM §1 step 4 in code, the reference backend of ``kaldi_fbank``, the test
oracle (the rest of the EAT input transform: sslam_fast.reference.eat_features).

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
