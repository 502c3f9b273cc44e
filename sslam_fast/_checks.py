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
import math
import numbers
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
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the model's activations and parameters can be
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


# Size limits. Every int that sizes a buffer is refused above MAX_SIZE, and every output an op sizes from its int
# arguments (rather than from its input tensors) is refused above MAX_ELEMENTS, before anything is allocated: an
# absurd size (a typo, a wrapped negative, 2**63 - 1) then raises a ValueError naming the argument instead of failing
# in the allocator, being killed for memory, or looping for hours. int32 is the natural line: the kernels index a row
# or a grid with int32 (the Triton kernels' offsets, the C++ mask kernel's token lists), and 2**31 elements (8 GiB of
# float32) is far beyond any batch this package is meant for (an EAT batch of features is 12 x 1024 x 128 = 1.6M).
# The C++ ops enforce the same limits (csrc/checks.h).
MAX_SIZE = 2**31 - 1
MAX_ELEMENTS = 2**31 - 1


def check_positive_int(name: str, value, *, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_elements(what: str, **factors: int) -> int:
    """Raise ValueError when the product of ``factors`` (name=value, the sizes that make ``what``) exceeds
    :data:`MAX_ELEMENTS`; return the product. Python ints do not overflow, so the product is exact."""
    n = 1
    for v in factors.values():
        n *= int(v)
    if n > MAX_ELEMENTS:
        named = " x ".join(f"{k}={v}" for k, v in factors.items())
        raise ValueError(f"{what} would have {named} = {n} elements, more than the limit of {MAX_ELEMENTS} (2**31 - 1)")
    return n


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


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_real(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
               positive: bool = False) -> float:
    """A finite real number (not a bool), optionally ``> 0`` or within ``[minimum, maximum]``; returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    lo = -math.inf if minimum is None else minimum
    hi = math.inf if maximum is None else maximum
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}], got {value}")
    return value


def check_device(device) -> torch.device:
    """A cpu or cuda device (None: cpu); a bare ``cuda`` becomes the current CUDA device."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, a torch.device or None, got {type(device).__name__}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_generator(generator, device_type: str | None = None) -> None:
    """None or a ``torch.Generator`` (on ``device_type`` when given)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if device_type is not None and generator.device.type != device_type:
        raise ValueError(f"generator must be a {device_type} torch.Generator, got one on {generator.device}")
