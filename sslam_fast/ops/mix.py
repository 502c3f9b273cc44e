"""SSLAM mixing as dispatching custom ops: the partial max-mix of log-mels, its window sampler, SNR mixing of waveforms.

``partial_max_mix`` is ALGORITHM §5.1: row i of the mix is ``max(x[i], x[i-1])`` (cyclic partner) outside two unmixed
windows of ``window_frames`` frames and ``x[i]`` inside them; with ``concat=True`` it returns the stage-2 model input
``cat([x, x_mix])`` in one pass. ``sample_mix_windows`` draws the windows with upstream's distribution.
``mix_waveforms`` adds a partner waveform at a requested SNR.

Backends: ``reference`` (plain PyTorch, any device) and ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``). The
ops act on model inputs, so they have no backward.
"""

from __future__ import annotations

import math
import numbers
import random

import torch

from sslam_fast import _backend
from sslam_fast._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    MAX_SIZE,
    check_finite,
    check_positive_int,
    check_tensor,
    value_checks_enabled,
)
from sslam_fast.reference import mix as ref

__all__ = ["mix_waveforms", "partial_max_mix", "sample_mix_windows", "windows_tensor"]

_SPEC_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- backends ---------------------------------------------------------------------------------------------------------


def _partial_max_mix_reference(spec, windows, window_frames, concat):
    """``ref.partial_max_mix`` with (s1, s2) as a device tensor: the window rows are chosen by comparisons instead of
    slices, so no value is read back to the host (the same elements are set to -inf)."""
    t = torch.arange(spec.shape[2], device=spec.device)
    s1, s2 = windows[0], windows[1]
    in_win = ((t >= s1) & (t < s1 + window_frames)) | ((t >= s2) & (t < s2 + window_frames))
    roll1 = torch.roll(spec, shifts=1, dims=0).masked_fill(in_win.view(1, 1, -1, 1), float("-inf"))
    mix = torch.max(spec, roll1)
    return torch.cat([spec, mix], dim=0) if concat else mix


def _partial_max_mix_triton(spec, windows, window_frames, concat):
    from sslam_fast.kernels.mix import partial_max_mix_triton

    return partial_max_mix_triton(spec, windows, window_frames, concat)


def _mix_waveforms_reference(a, b, snr_row, snr_scalar):
    if snr_row is None:
        snr_row = torch.full((a.shape[0],), snr_scalar, dtype=torch.float32, device=a.device)
    return ref.mix_waveforms(a, b, snr_row)


def _mix_waveforms_triton(a, b, snr_row, snr_scalar):
    from sslam_fast.kernels.mix import mix_waveforms_triton

    return mix_waveforms_triton(a, b, snr_row, snr_scalar)


_backend.register_op(
    _backend.OpBackends(
        "partial_max_mix", kernels={"reference": _partial_max_mix_reference, "triton": _partial_max_mix_triton}
    )
)
_backend.register_op(
    _backend.OpBackends(
        "mix_waveforms", kernels={"reference": _mix_waveforms_reference, "triton": _mix_waveforms_triton}
    )
)


# --- custom ops -------------------------------------------------------------------------------------------------------


@torch.library.custom_op("sslam_fast::partial_max_mix", mutates_args=())
def _partial_max_mix_op(
    spec: torch.Tensor, windows: torch.Tensor, window_frames: int, concat: bool, backend: str
) -> torch.Tensor:
    return _backend.kernel("partial_max_mix", backend)(spec, windows, window_frames, concat)


@_partial_max_mix_op.register_fake
def _(spec, windows, window_frames, concat, backend):
    rows = 2 * spec.shape[0] if concat else spec.shape[0]
    return spec.new_empty((rows, *spec.shape[1:]))


@torch.library.custom_op("sslam_fast::mix_waveforms", mutates_args=())
def _mix_waveforms_op(
    a: torch.Tensor, b: torch.Tensor, snr_db: torch.Tensor | None, snr_scalar: float, backend: str
) -> torch.Tensor:
    return _backend.kernel("mix_waveforms", backend)(a, b, snr_db, snr_scalar)


@_mix_waveforms_op.register_fake
def _(a, b, snr_db, snr_scalar, backend):
    return torch.empty_like(a)


# --- validation -------------------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


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
    if not (_is_int(s1) and _is_int(s2)):
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


# |snr_db| beyond this is refused. The gain is 10^(-snr/20) times the level ratio: at -1000 dB it is 1e50, beyond
# float32 (the mix is inf / NaN), at +1000 dB 1e-50, i.e. 0 (the mix is a, silently). 200 dB (a power ratio of 1e20)
# is far outside any augmentation (SSLAM mixes at 0 dB) and keeps the gain well inside float32.
MAX_ABS_SNR_DB = 200.0


def _check_snr(snr_db, a: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Either (per-row (B,) tensor, 0.0) or (None, scalar)."""
    if isinstance(snr_db, torch.Tensor):
        check_tensor("snr_db", snr_db, ndim=(0, 1), dtypes=FLOAT_DTYPES, device=a.device)
        if snr_db.dim() == 1 and snr_db.shape[0] != a.shape[0]:
            raise ValueError(f"snr_db must have one entry per row ({a.shape[0]}), got {snr_db.shape[0]}")
        check_finite("snr_db", snr_db)
        if snr_db.numel() and value_checks_enabled():  # reading the values is a host sync on a GPU
            worst = float(snr_db.abs().max())
            if worst > MAX_ABS_SNR_DB:
                raise ValueError(f"snr_db must lie in [-{MAX_ABS_SNR_DB}, {MAX_ABS_SNR_DB}] dB, got |snr_db| = {worst}")
        return snr_db.reshape(-1).expand(a.shape[0]).contiguous(), 0.0
    if isinstance(snr_db, bool) or not isinstance(snr_db, numbers.Real):
        raise TypeError(f"snr_db must be a float or a (B,) float tensor, got {type(snr_db).__name__}")
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be finite, got {snr_db}")
    if abs(snr_db) > MAX_ABS_SNR_DB:
        raise ValueError(f"snr_db must lie in [-{MAX_ABS_SNR_DB}, {MAX_ABS_SNR_DB}] dB, got {snr_db}")
    return None, float(snr_db)


# --- public functions -------------------------------------------------------------------------------------------------


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
    check_tensor("spec", spec, ndim=4, dtypes=_SPEC_DTYPES)
    if spec.shape[1] != 1:
        raise ValueError(f"spec must have shape (B, 1, T, F), got {tuple(spec.shape)}")
    if not _is_int(window_frames):
        raise TypeError(f"window_frames must be an int, got {type(window_frames).__name__}")
    if window_frames < 0:
        raise ValueError(f"window_frames must be >= 0, got {window_frames}")
    if not isinstance(concat, bool):
        raise TypeError(f"concat must be a bool, got {type(concat).__name__}")
    win = windows_tensor(windows, int(window_frames), spec.shape[2], spec.device)
    chosen = _backend.resolve("partial_max_mix", backend, spec.device)
    return _partial_max_mix_op(spec, win, int(window_frames), concat, chosen)


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


def mix_waveforms(a: torch.Tensor, b: torch.Tensor, snr_db, *, backend: str = "auto") -> torch.Tensor:
    """Mix waveform pairs at a given SNR: ``a + g b`` with ``g = sqrt(P_a / (P_b 10^(snr_db/10)))`` per row.

    Args:
        a, b: (B, N) float (float32 / float16 / bfloat16 / float64), same dtype and device, finite.
        snr_db: float, or a (B,) (or 0-dim) float tensor on a's device: the SNR in dB of a over the scaled b, in
            [-200, 200] (a tensor's range is a value check).
        backend: "auto" | "reference" | "triton".

    Returns:
        (B, N) in a's dtype. P is the mean square of a row, computed in fp32, and the sum ``a + g b`` is formed in fp32.
        A silent b (P_b == 0) or a silent a gives g = 0, so the row equals a. A mix that overflows the dtype raises
        ValueError (a value check). No gradient.
    """
    check_tensor("a", a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("b", b, ndim=2, dtypes=FLOAT_DTYPES, device=a.device)
    if b.dtype != a.dtype:
        raise TypeError(f"b must have a's dtype ({a.dtype}), got {b.dtype}")
    if b.shape != a.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    check_finite("a", a)
    check_finite("b", b)
    snr_row, snr_scalar = _check_snr(snr_db, a)
    chosen = _backend.resolve("mix_waveforms", backend, a.device)
    out = _mix_waveforms_op(a, b, snr_row, snr_scalar, chosen)
    # Within the SNR range the gain is finite, but g b (b brought to a's level times 10^(-snr_db / 20)) can still
    # overflow the dtype: float16 tops out at 65504. A value check, so the trainer's steady state does not sync on it.
    if value_checks_enabled() and out.numel() and not bool(torch.isfinite(out.sum(dtype=torch.float32))):
        if not bool(torch.isfinite(out).all()):
            dtype = str(a.dtype).replace("torch.", "")
            raise ValueError(
                f"mix_waveforms: the mix is not finite: b scaled for snr_db overflows {dtype}; use a higher snr_db, "
                "quieter waveforms or a wider dtype"
            )
    return out
