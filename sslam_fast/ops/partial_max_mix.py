"""SSLAM's partial max-mix of log-mels as a dispatching custom op, and its window sampler (ALGORITHM §5.1).

``partial_max_mix``: row i of the mix is ``max(x[i], x[i-1])`` (cyclic partner) outside two unmixed windows of
``window_frames`` frames and ``x[i]`` inside them; with ``concat=True`` it returns the stage-2 model input
``cat([x, x_mix])`` in one pass. ``sample_mix_windows`` draws the windows with upstream's distribution;
``windows_tensor`` checks them and puts them on the device.

Backends: ``reference`` (``sslam_fast.reference.partial_max_mix``, any device) and ``triton``
(kernels/partial_max_mix.py; CUDA, or CPU under ``TRITON_INTERPRET=1``). The op acts on model inputs, so it has no
backward.
"""

from __future__ import annotations

import random

import torch

from sslam_fast import _backend
from sslam_fast._checks import (
    INT_DTYPES,
    MAX_SIZE,
    MODEL_DTYPES,
    check_positive_int,
    check_tensor,
    is_int,
    value_checks_enabled,
)
from sslam_fast.reference import partial_max_mix as ref

__all__ = ["partial_max_mix", "sample_mix_windows", "windows_tensor"]


def _validate(spec: torch.Tensor, windows: torch.Tensor, window_frames: int, concat: bool) -> None:
    """What the kernels index by (metadata only), so that a direct call of the op cannot read out of bounds."""
    check_tensor("spec", spec, ndim=4)
    check_tensor("windows", windows, dtypes=INT_DTYPES, device=spec.device)
    if windows.numel() != 2:
        raise ValueError(f"windows must hold 2 frame offsets (s1, s2), got shape {tuple(windows.shape)}")


def _fake(spec, windows, window_frames, concat, backend):
    rows = 2 * spec.shape[0] if concat else spec.shape[0]
    return spec.new_empty((rows, *spec.shape[1:]))


_op = _backend.define_op(
    "partial_max_mix",
    "(Tensor spec, Tensor windows, int window_frames, bool concat) -> Tensor",
    fake=_fake,
    kernels={
        "reference": ref.partial_max_mix_tensor,
        "triton": _backend.triton_kernel("partial_max_mix", "partial_max_mix_triton"),
    },
    validate=_validate,
)


def windows_tensor(windows, window_frames: int, num_frames: int, device: torch.device) -> torch.Tensor:
    """(s1, s2) as a (2,) int64 tensor on ``device``, checked: both windows inside [0, T) and s1 + W <= s2 (they may
    touch, never overlap).

    Python ints are checked on the host and copied without waiting (``non_blocking``). A tensor is checked for shape
    and dtype always and for its values when value checks are on (``sslam_fast._checks``): reading them is a host sync
    on a GPU. A tensor on another device than ``device`` is copied over."""
    if isinstance(windows, torch.Tensor):
        if windows.dtype not in INT_DTYPES:
            raise TypeError(f"windows must hold integers, got a {str(windows.dtype).replace('torch.', '')} tensor")
        if windows.numel() != 2:
            raise ValueError(f"windows must hold 2 frame offsets (s1, s2), got shape {tuple(windows.shape)}")
        if value_checks_enabled():
            _check_window_values(windows.reshape(-1).tolist(), window_frames, num_frames)
        return windows.reshape(2).to(device=device, dtype=torch.int64, non_blocking=True)
    s1, s2 = _check_window_values(windows, window_frames, num_frames)
    host = torch.tensor([s1, s2], dtype=torch.int64)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()  # a non-blocking copy from pinned memory never waits for the device
    return host.to(device, non_blocking=True)


def _check_window_values(windows, window_frames: int, num_frames: int) -> tuple[int, int]:
    if not isinstance(windows, (tuple, list)) or len(windows) != 2:
        raise TypeError(f"windows must be a pair (s1, s2) of ints or a 2-element int tensor, got {windows!r}")
    s1, s2 = windows
    if not (is_int(s1) and is_int(s2)):
        raise TypeError(f"windows must hold ints, got ({type(s1).__name__}, {type(s2).__name__})")
    s1, s2, W = int(s1), int(s2), window_frames
    if s1 < 0:
        raise ValueError(f"windows: s1 must be >= 0, got s1={s1}")
    if s1 + W > s2:
        raise ValueError(
            f"windows must not overlap and must be ordered (s1 + window_frames <= s2), got s1={s1}, "
            f"s2={s2}, window_frames={W}"
        )
    if s2 + W > num_frames:
        raise ValueError(f"windows: the second window [{s2}, {s2 + W}) must end within the {num_frames} frames of spec")
    return s1, s2


def partial_max_mix(
    spec: torch.Tensor,
    windows,
    *,
    window_frames: int = ref.WINDOW_FRAMES,
    concat: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """SSLAM's partially mixed spectrogram (ALGORITHM §5.1).

    Args:
        spec: (B, 1, T, F) float32 / float16 / bfloat16, the normalised log-mel batch.
        windows: (s1, s2), Python ints or a 2-element int tensor: frame offsets of the two unmixed windows
            ``[s1, s1 + W)`` and ``[s2, s2 + W)``; ``0 <= s1``, ``s1 + W <= s2``, ``s2 + W <= T``. A tensor on
            spec's device is used as it is (nothing is read back to the host unless value checks are on), so
            ``torch.compile`` treats new windows as new data, not as new constants.
            ``sample_mix_windows`` draws them as upstream does.
        window_frames: W (240 upstream), >= 0.
        concat: return ``cat([spec, mix])``, the (2B, 1, T, F) stage-2 input, written in one pass.
        backend: "auto" | "reference" | "triton" (see ``sslam_fast._backend``).

    Returns:
        (B, 1, T, F), or (2B, 1, T, F) with ``concat``, in spec's dtype. Row i of the mix is
        ``max(spec[i], spec[(i - 1) mod B])`` outside both windows and ``spec[i]`` inside them. B = 1 mixes a row with
        itself (the mix equals spec). No gradient.
    """
    check_tensor("spec", spec, ndim=4, dtypes=MODEL_DTYPES)
    if spec.shape[1] != 1:
        raise ValueError(f"spec must have shape (B, 1, T, F), got {tuple(spec.shape)}")
    if not is_int(window_frames):
        raise TypeError(f"window_frames must be an int, got {type(window_frames).__name__}")
    if window_frames < 0:
        raise ValueError(f"window_frames must be >= 0, got {window_frames}")
    if not isinstance(concat, bool):
        raise TypeError(f"concat must be a bool, got {type(concat).__name__}")
    win = windows_tensor(windows, int(window_frames), spec.shape[2], spec.device)
    chosen = _backend.resolve("partial_max_mix", backend, spec.device)
    return _op(spec, win, int(window_frames), concat, chosen)


def sample_mix_windows(
    generator: torch.Generator | random.Random | None = None,
    *,
    num_frames: int = ref.NUM_FRAMES,
    window_frames: int = ref.WINDOW_FRAMES,
    step: int = ref.WINDOW_STEP,
) -> tuple[int, int]:
    """Draw the two unmixed windows (s1, s2) with upstream's distribution (ALGORITHM §5.1).

    s1 is uniform over ``range(0, num_frames // 2, step)``, then s2 uniform over
    ``range(s1 + window_frames, num_frames - window_frames - 1, step)``; for the defaults s1 in {0, 16, ..., 496}
    (32 values) and s2 in {s1 + 240, ..., 768}. Upstream draws with Python's unseeded ``random``; this draws with
    ``generator``: a ``random.Random`` (``randrange``, no tensor at all: what the trainer uses), a
    ``torch.Generator`` (``torch.randint``) or None (the default CPU torch generator), so a seeded generator
    reproduces the draws. Raises ValueError when the arguments leave some s1 without a valid s2.
    """
    if generator is not None and not isinstance(generator, (torch.Generator, random.Random)):
        raise TypeError(f"generator must be a torch.Generator, a random.Random or None, got {type(generator).__name__}")
    check_positive_int("num_frames", num_frames, maximum=MAX_SIZE)
    check_positive_int("window_frames", window_frames, maximum=MAX_SIZE)
    check_positive_int("step", step, maximum=MAX_SIZE)
    s1_choices, s2_choices_for = ref.mix_window_choices(num_frames, window_frames, step)
    if len(s1_choices) == 0:
        raise ValueError(f"num_frames={num_frames} leaves no window start s1 in range(0, num_frames // 2, step)")
    if len(s2_choices_for(s1_choices[-1])) == 0:  # the largest s1 has the fewest s2 choices
        raise ValueError(
            f"num_frames={num_frames}, window_frames={window_frames}, step={step} leave no valid s2 for "
            f"s1={s1_choices[-1]} (need s1 + window_frames < num_frames - window_frames - 1)"
        )
    if isinstance(generator, random.Random):
        draw = generator.randrange
    else:
        device = generator.device if generator is not None else "cpu"

        def draw(n: int) -> int:
            return int(torch.randint(n, (1,), generator=generator, device=device))

    s1 = s1_choices[draw(len(s1_choices))]
    s2_choices = s2_choices_for(s1)
    return s1, s2_choices[draw(len(s2_choices))]
