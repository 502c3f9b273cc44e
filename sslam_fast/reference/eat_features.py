"""Plain-PyTorch EAT input transform of 16 kHz rows: ALGORITHM §1 steps 3-6 in code (clip-mean removal, Kaldi fbank,
pad / crop to ``target_length`` frames, ``(x - mean) / (2 std)``), the reference backend of ``eat_features``.

Mirrors the upstream loader (``[E] data/raw_audio_dataset.py : RawAudioDataset.postprocess``); the filterbank is
sslam_fast.reference.kaldi_fbank. Resampling to 16 kHz is done by the caller (``sslam_fast.ops.eat_features``).
"""

from __future__ import annotations

import torch

from sslam_fast.reference.kaldi_fbank import EAT_SAMPLE_RATE, FrameParams, kaldi_fbank


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
