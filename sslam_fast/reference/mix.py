"""Plain-PyTorch SSLAM mixing: the spec (ALGORITHM §5.1) in code, the CPU fallback, the test oracle.

``partial_max_mix`` mirrors ``[S] Pre-Training/SSLAM_Stage2/models/EAT_pretraining.py : Data2VecMultiModel.forward``
("MIXING SPECTS"): the batch is rolled by one clip (``partner(i) = i - 1``, cyclically), the rolled copy is set to
``-inf`` in two unmixed windows of ``window_frames`` frames, and the mix is the element-wise ``torch.max`` of the
normalised log-mel with that copy; the model input is then ``cat([x, x_mix])``.

``mix_window_choices`` is the window distribution of the same function: upstream draws ``idx_1`` with
``random.choice(range(0, 501, 16))`` and ``idx_2`` with ``random.choice(range(idx_1 + 240, 1023 - 240, 16))``.

``mix_waveforms`` (additive mixing of waveform pairs at a given SNR) has no upstream counterpart in SSLAM; it follows
the usual convention (as ``torchaudio.functional.add_noise``): the mix ``a + g b`` has power ratio ``snr_db`` of a
over the scaled b.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WINDOW_FRAMES = 240  # no_mix_region_size upstream: 15 time patches = 2.4 s
WINDOW_STEP = 16  # window starts are multiples of the patch height
NUM_FRAMES = 1024  # EAT target_length


def mix_window_choices(
    num_frames: int = NUM_FRAMES, window_frames: int = WINDOW_FRAMES, step: int = WINDOW_STEP
) -> tuple[range, Callable[[int], range]]:
    """The candidate window starts: ``(s1_choices, s2_choices_for)``, where ``s2_choices_for(s1)`` is a ``range``.

    For the defaults: s1 in ``range(0, 512, 16)`` = {0, ..., 496} (upstream writes ``range(0, 501, 16)``, the same
    32 values) and s2 in ``range(s1 + 240, 783, 16)`` (max 768). Both are drawn uniformly, s2 given s1.
    """
    s1_choices = range(0, num_frames // 2, step)

    def s2_choices_for(s1: int) -> range:
        return range(s1 + window_frames, num_frames - window_frames - 1, step)

    return s1_choices, s2_choices_for


def partial_max_mix(
    spec: torch.Tensor, s1: int, s2: int, window_frames: int = WINDOW_FRAMES, concat: bool = False
) -> torch.Tensor:
    """SSLAM partially mixed spectrogram, exactly as upstream computes it.

    Args:
        spec: (B, 1, T, F) float normalised log-mel (fp32 / fp16 / bf16).
        s1, s2: frame offsets of the two unmixed windows ``[s1, s1 + W)`` and ``[s2, s2 + W)``.
        window_frames: W.
        concat: return ``cat([spec, mix])`` (2B, 1, T, F) instead of the mix alone.

    Returns:
        (B or 2B, 1, T, F) in spec's dtype. Row i of the mix is ``max(spec[i], spec[i - 1 mod B])`` outside the windows
        and ``spec[i]`` inside them (NaN propagates as ``torch.max`` does).
    """
    roll1 = torch.roll(spec, shifts=1, dims=0)  # a copy: roll1[i] = spec[i - 1], roll1[0] = spec[B - 1]
    for start in (s1, s2):
        roll1[:, :, start : start + window_frames, :] = float("-inf")  # no mixing there: max(x, -inf) = x
    mix = torch.max(spec, roll1)
    return torch.cat([spec, mix], dim=0) if concat else mix


def mix_gains(a: torch.Tensor, b: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 gains ``g = sqrt(P_a / (P_b 10^(snr/10)))``, P the mean square of a row in fp32; 0 when P_b == 0.

    Written as ``sqrt(P_a) / (sqrt(P_b) 10^(snr/20))`` (the same value) so that a tiny but non-zero P_b does not
    overflow the ratio P_a / P_b in fp32.
    """
    pa = a.to(torch.float32).square().mean(dim=1) if a.shape[1] else a.new_zeros(a.shape[0], dtype=torch.float32)
    pb = b.to(torch.float32).square().mean(dim=1) if b.shape[1] else b.new_zeros(b.shape[0], dtype=torch.float32)
    amp = torch.pow(10.0, snr_db.to(torch.float32) / 20.0)
    g = pa.sqrt() / (pb.sqrt() * amp)
    return torch.where(pb > 0, g, torch.zeros_like(g))


def mix_waveforms(a: torch.Tensor, b: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
    """``a + g b`` row by row (computed in fp32, returned in a's dtype) so that the mix has SNR ``snr_db`` of a over b.

    Args:
        a, b: (B, N) float, same dtype and device.
        snr_db: (B,) float, per-row SNR in dB.

    A silent b (P_b == 0) or a silent a gives g = 0, so the result is a.
    """
    g = mix_gains(a, b, snr_db)
    return (a.to(torch.float32) + g.unsqueeze(1) * b.to(torch.float32)).to(a.dtype)
