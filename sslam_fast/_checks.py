"""Argument validation shared by the ops: every failure names the argument and what was expected.

Two kinds of check:

- structural checks (type, shape, dtype, device) read only tensor metadata and always run;
- value checks (finite input, lengths in range, ids in range, equal kept counts) read tensor *values*, which on a GPU
  is a device-to-host copy that waits for every queued kernel (a host sync). They run when :func:`value_checks_enabled`
  says so: by default yes, so a direct call of an op validates its input; the trainer runs them on its first step and
  turns them off for the steady state with :func:`value_checks`. ``SSLAM_FAST_CHECK=1`` forces them on everywhere
  (debugging), ``SSLAM_FAST_CHECK=0`` off everywhere. Inside a ``torch.compile`` region they never run (a
  data-dependent branch cannot be traced); callers run them eagerly before the compiled call.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator

import torch

CHECK_ENV_VAR = "SSLAM_FAST_CHECK"
_STATE = threading.local()


def _env_setting() -> bool | None:
    value = os.environ.get(CHECK_ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{CHECK_ENV_VAR}={value!r} must be 1 or 0")


def value_checks_enabled() -> bool:
    """Whether value checks (the ones that read tensor values: a host sync on a GPU) run now."""
    if torch.compiler.is_compiling():
        return False
    env = _env_setting()
    if env is not None:
        return env
    return getattr(_STATE, "enabled", True)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn value checks on or off in this thread for the ``with`` block (``SSLAM_FAST_CHECK`` still wins)."""
    previous = getattr(_STATE, "enabled", True)
    _STATE.enabled = bool(enabled)
    try:
        yield
    finally:
        _STATE.enabled = previous

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(
    name: str,
    x,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device} but must be on {device} like the other inputs")
    return x


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ValueError when a floating tensor holds NaN or Inf (one reduction; a device sync on CUDA). A value check:
    skipped when :func:`value_checks_enabled` is False.

    A finite sum proves every element finite (NaN or Inf anywhere makes the sum NaN or Inf) at the cost of one
    reduction; only a non-finite sum (a bad element, or a sum that overflowed) takes the exact elementwise test.
    """
    if not x.is_floating_point() or not x.numel() or not value_checks_enabled():
        return
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_lengths(lengths, batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Validate per-row sample counts; return them as int64 on ``device`` (None means every row is full). The range
    check of the values is a value check."""
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.int64, device=device)
    if isinstance(lengths, (list, tuple)):
        lengths = torch.tensor(lengths, dtype=torch.int64)
    check_tensor("lengths", lengths, ndim=1, dtypes=INT_DTYPES)
    if lengths.shape[0] != batch:
        raise ValueError(f"lengths must have one entry per row ({batch}), got {lengths.shape[0]}")
    if lengths.device != torch.device(device):
        raise ValueError(f"lengths is on {lengths.device} but waveforms are on {device}")
    if batch and value_checks_enabled():
        lo, hi = (int(v) for v in torch.aminmax(lengths))
        if lo < 0 or hi > max_len:
            raise ValueError(f"lengths must lie in [0, {max_len}] (the waveform width), got values in [{lo}, {hi}]")
    return lengths.to(torch.int64)
