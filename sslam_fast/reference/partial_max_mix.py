"""SSLAM's partial max-mix of log-mels in plain PyTorch (ALGORITHM §5.1): the definition, the CPU fallback, the test
oracle.

``partial_max_mix`` mirrors ``[S] Pre-Training/SSLAM_Stage2/models/EAT_pretraining.py : Data2VecMultiModel.forward``
(the block that mixes the spectrograms): the batch is rolled by one clip (``partner(i) = i - 1``, cyclically),
the rolled copy is set to ``-inf`` in two unmixed windows of ``window_frames`` frames, and the mix is the element-wise
``torch.max`` of the normalised log-mel with that copy; the model input is then ``cat([x, x_mix])``.
``partial_max_mix_tensor`` is the same with the window offsets in a device tensor.

``mix_window_choices`` is the window distribution of the same function: upstream draws ``idx_1`` with
``random.choice(range(0, 501, 16))`` and ``idx_2`` with ``random.choice(range(idx_1 + 240, 1023 - 240, 16))``.
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


def partial_max_mix_tensor(
    spec: torch.Tensor, windows: torch.Tensor, window_frames: int = WINDOW_FRAMES, concat: bool = False
) -> torch.Tensor:
    """:func:`partial_max_mix` with (s1, s2) as a (2,) int tensor on spec's device.

    The window frames are chosen by comparisons instead of slices, so no value is read back to the host (a GPU sync)
    and ``torch.compile`` sees the windows as data; the same elements are set to ``-inf``, so the result is the same
    bit for bit.
    """
    t = torch.arange(spec.shape[2], device=spec.device)
    s1, s2 = windows[0], windows[1]
    in_win = ((t >= s1) & (t < s1 + window_frames)) | ((t >= s2) & (t < s2 + window_frames))
    roll1 = torch.roll(spec, shifts=1, dims=0).masked_fill(in_win.view(1, 1, -1, 1), float("-inf"))
    mix = torch.max(spec, roll1)
    return torch.cat([spec, mix], dim=0) if concat else mix
