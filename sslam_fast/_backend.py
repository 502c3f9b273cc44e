"""Backend selection shared by every op.

Each public op registers the kernels it has ("reference", "triton", "cpp", "cuda") with :func:`register_op`, and
calls :func:`resolve` with the caller's ``backend`` argument and the device its tensors live on.

Rules:
- ``backend="auto"`` (the default) takes the fastest backend available for the device: on CUDA ``cuda`` > ``triton`` >
  ``reference``; on CPU ``cpp`` > ``reference``; an op may set its own order (``OpBackends.preference``). When the
  preferred backend of an op is missing (extension not built, triton not installed) it falls back and warns once per
  op and device type.
- The environment variable ``SSLAM_FAST_BACKEND`` replaces ``auto``. It is global, so an op that does not implement the
  named backend at all ignores it (with one warning); an op that implements it but cannot run it here raises.
- A backend named explicitly in the call that is unavailable raises ``RuntimeError``.
- The Triton backend runs on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``); ``auto`` never
  picks it on CPU, because the interpreter is a correctness tool, not a fast path.
- A backend that ``auto`` chose and whose first call raises (a Triton compile failure, a launch the driver refuses,
  a missing CUDA symbol) is dropped for that op and device type with one warning naming the error, and the next
  available backend runs the same call; every later ``auto`` call skips it. A backend that has run once is trusted:
  a later failure (out of memory, say) propagates. A backend named explicitly (argument or ``SSLAM_FAST_BACKEND``)
  is never dropped: its error propagates. ``auto`` marks its choice by handing the op ``"auto:<backend>"``;
  :func:`base_name` strips the mark.

Nothing here imports triton or touches CUDA at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger("sslam_fast")

BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
ENV_VAR = "SSLAM_FAST_BACKEND"


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _extension():
    """The compiled ``sslam_fast._C`` module, or None when it was not built (logged once)."""
    try:
        from sslam_fast import _C  # noqa: F401  (importing registers the C++ ops)

        return _C
    except ImportError as exc:  # pragma: no cover - depends on the build
        log.info("sslam_fast._C not available (%s); C++ kernels disabled", exc)
        return None


def extension_has(op_name: str) -> bool:
    """Whether the compiled extension registered ``torch.ops.sslam_fast.<op_name>``."""
    if _extension() is None:
        return False
    return hasattr(torch.ops.sslam_fast, op_name)


def cuda_extension_built() -> bool:
    ext = _extension()
    return bool(ext is not None and getattr(ext, "WITH_CUDA", False))


@dataclass
class OpBackends:
    """The kernels one op has, and how to tell whether each can run."""

    name: str
    kernels: dict[str, Callable] = field(default_factory=dict)
    # backend -> callable(device_type) -> bool, for backends whose availability depends on more than the device
    checks: dict[str, Callable[[str], bool]] = field(default_factory=dict)
    # device type -> backend order for auto, where an op's fastest backend differs from the default order
    preference: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def available(self, backend: str, device_type: str) -> bool:
        if backend not in self.kernels:
            return False
        if backend == "reference":
            return True
        if backend == "triton":
            ok_device = device_type == "cuda" or (device_type == "cpu" and triton_interpreter())
            return ok_device and triton_importable() and self.checks.get("triton", lambda d: True)(device_type)
        if backend == "cpp":
            return device_type == "cpu" and self.checks.get("cpp", lambda d: False)(device_type)
        if backend == "cuda":
            return device_type == "cuda" and self.checks.get("cuda", lambda d: False)(device_type)
        return False


_REGISTRY: dict[str, OpBackends] = {}
_WARNED: set[tuple[str, str, str]] = set()
AUTO_PREFIX = "auto:"
_DROPPED: dict[tuple[str, str], set[str]] = {}  # (op, device type) -> backends whose first call raised under auto
_PROVEN: set[tuple[str, str, str]] = set()  # (op, device type, backend) that completed a call


def register_op(ops: OpBackends) -> OpBackends:
    _REGISTRY[ops.name] = ops
    return ops


def _warn_once(op: str, device_type: str, message: str) -> None:
    key = (op, device_type, message)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """Return the concrete backend that runs ``op`` for tensors on ``device``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ops = _REGISTRY[op]
    device_type = torch.device(device).type
    if device_type not in _PREFERENCE:
        raise ValueError(f"{op}: unsupported device type {device_type!r} (expected cpu or cuda)")

    explicit = backend != "auto"
    if not explicit:
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not one of {BACKENDS}")
        if env != "auto":
            if env in ops.kernels:
                backend, explicit = env, True
            else:
                _warn_once(op, device_type, f"{op}: {ENV_VAR}={env} names a backend this op does not have; using auto")

    if explicit:
        if not ops.available(backend, device_type):
            raise RuntimeError(
                f"{op}: backend {backend!r} is not available for {device_type} tensors "
                f"(implemented: {sorted(ops.kernels)}; available here: {available_backends(op, device_type)})"
            )
        return backend

    b = _auto_choice(op, device_type)
    return b if b == "reference" else AUTO_PREFIX + b


def _auto_choice(op: str, device_type: str) -> str:
    """The first backend in the op's order for the device that is available and was not dropped."""
    ops = _REGISTRY[op]
    order = ops.preference.get(device_type, _PREFERENCE[device_type])
    preferred = [b for b in order if b in ops.kernels]
    dropped = _DROPPED.get((op, device_type), set())
    for b in preferred:
        if b not in dropped and ops.available(b, device_type):
            if b != preferred[0] and preferred[0] not in dropped:
                _warn_once(op, device_type, f"{op}: backend {preferred[0]!r} unavailable on {device_type}; using {b!r}")
            return b
    raise RuntimeError(f"{op}: no backend available for {device_type} tensors")  # reference is always there


def base_name(backend: str) -> str:
    """The backend name without the ``auto:`` mark of :func:`resolve`."""
    return backend[len(AUTO_PREFIX):] if backend.startswith(AUTO_PREFIX) else backend


def _device_type_of(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device.type
    return "cpu"


def _with_fallback(op: str, backend: str) -> Callable:
    """The kernel of ``backend`` for an ``auto`` choice: its first failure drops it and runs the next backend."""

    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            # Traced by dynamo (an op whose backend is plain ATen code, not an opaque custom op): no state here, or
            # every change of the bookkeeping below would be a guard failure and a recompilation. A kernel that
            # fails fails the compile, loudly.
            return _REGISTRY[op].kernels[backend](*args, **kwargs)
        device_type = _device_type_of(args)
        b = backend
        if b in _DROPPED.get((op, device_type), ()):
            b = _auto_choice(op, device_type)
        while True:
            fn = _REGISTRY[op].kernels[b]
            if b == "reference" or (op, device_type, b) in _PROVEN:
                return fn(*args, **kwargs)
            try:
                out = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure of an untried kernel means "use the next one"
                _DROPPED.setdefault((op, device_type), set()).add(b)
                nxt = _auto_choice(op, device_type)
                msg = f"{op}: backend {b!r} failed on its first {device_type} call ({type(exc).__name__}: {exc}); " \
                      f"dropped for this process, using {nxt!r}"
                log.warning(msg)
                _warn_once(op, device_type, msg)
                b = nxt
                continue
            _PROVEN.add((op, device_type, b))
            return out

    return run


def available_backends(op: str, device_type: str) -> list[str]:
    ops = _REGISTRY[op]
    return [b for b in BACKENDS[1:] if ops.available(b, device_type)]


def kernel(op: str, backend: str) -> Callable:
    """The callable of ``backend`` (as :func:`resolve` returned it) for ``op``: the kernel itself for an explicit
    choice, the kernel behind the first-call fallback for an ``auto`` one.

    The custom ops take the backend as a plain string and can be called directly (``torch.ops.sslam_fast.<op>``),
    bypassing :func:`resolve`: a name this op does not implement raises ValueError naming the op, the name and the
    valid ones (not a bare KeyError from the registry, nor one deferred to the first call under ``auto:``)."""
    kernels = _REGISTRY[op].kernels
    name = base_name(backend) if isinstance(backend, str) else backend
    if name not in kernels:
        valid = sorted(kernels)
        raise ValueError(
            f"{op}: backend {backend!r} is not one of this op's backends {valid} (or 'auto:<backend>' for one of them)"
        )
    if backend.startswith(AUTO_PREFIX):
        return _with_fallback(op, name)
    return kernels[backend]


def reset_fallbacks() -> None:
    """Forget which backends were dropped or proven (tests)."""
    _DROPPED.clear()
    _PROVEN.clear()
