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
    """Whether the compiled extension registered ``torch.ops.sslam_fast_C.<op_name>``."""
    if _extension() is None:
        return False
    return hasattr(torch.ops.sslam_fast_C, op_name)


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
        if isinstance(a, torch.device):  # an op without tensor inputs (inverse_block_mask) names its device
            return a.type
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


# --- the op contract --------------------------------------------------------------------------------------------------

NAMESPACE = "sslam_fast"
COMPILED_NAMESPACE = "sslam_fast_C"  # the C++ / CUDA ops of sslam_fast._C (csrc/), one schema per op


def compiled(op_name: str) -> Callable:
    """The C++ / CUDA kernel ``torch.ops.sslam_fast_C.<op_name>`` as a backend callable (looked up at call time, so
    defining an op never imports the extension)."""

    def run(*args):
        return getattr(torch.ops.sslam_fast_C, op_name)(*args)

    run.__name__ = f"{COMPILED_NAMESPACE}.{op_name}"
    run.compiled_op = op_name
    return run


def compiled_available(op_name: str) -> Callable[[str], bool]:
    """An availability check for :func:`compiled` backends: the extension is built and registered ``op_name``."""
    return lambda device_type: extension_has(op_name)


def triton_kernel(module: str, function: str) -> Callable:
    """The launcher ``function`` of ``sslam_fast.kernels.<module>`` as a backend callable, imported on first call
    (triton is imported only when a Triton backend runs)."""

    def run(*args):
        return getattr(importlib.import_module(f"sslam_fast.kernels.{module}"), function)(*args)

    run.__name__ = f"kernels.{module}.{function}"
    return run


def always(device_type: str) -> bool:
    """Availability check of a backend made of ATen calls: always there."""
    return True


@dataclass
class Backward:
    """The backward of an op, itself a custom op ``<name>_backward`` run by the backend that ran the forward.

    schema: the backward op's arguments and results, without the trailing backend string (added here).
    fake: the backward op's fake kernel (same arguments, with the backend string last).
    kernels: backend name -> the backward kernel (same backends as the forward).
    save: ``save(ctx, inputs, output)``: what the forward keeps for the backward (``inputs`` without the backend).
    grads: ``grads(ctx, run_backward, *grad_outputs)`` -> one gradient (or None) per forward input other than the
        backend; ``run_backward(*args)`` calls the backward op with the forward's backend appended.
    checks: availability checks of the backward kernels, where they differ from the forward's.
    validate: checks of the backward op's arguments (it can be called directly too), metadata only.
    """

    schema: str
    fake: Callable
    kernels: dict[str, Callable]
    save: Callable
    grads: Callable
    checks: dict[str, Callable[[str], bool]] | None = None
    validate: Callable | None = None


def _with_backend(schema: str) -> str:
    args, sep, results = schema.partition("->")
    args = args.strip()
    if not (sep and args.startswith("(") and args.endswith(")")):
        raise ValueError(f"schema must look like '(args) -> results', got {schema!r}")
    inner = args[1:-1].strip()
    return f"({inner + ', ' if inner else ''}str backend) -> {results.strip()}"


_DEFINED: dict[str, object] = {}


def _custom_op(name: str, schema: str, kernels: dict[str, Callable], fake: Callable, validate: Callable | None):
    """``sslam_fast::<name>(<schema args>, str backend)``: runs ``validate`` (the checks a direct call of
    ``torch.ops.sslam_fast.<name>`` needs, metadata only), then the backend's kernel."""

    def impl(*args):
        *inputs, backend = args
        if validate is not None:
            validate(*inputs)
        return kernel(name, backend)(*inputs)

    impl.__name__ = name
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=_with_backend(schema))
    op.register_fake(fake)
    # A compiled kernel registered under the op's own name has the op's schema without the backend (csrc/): it gets
    # the same fake, so FakeTensor and opcheck can trace it by itself too.
    for backend, fn in kernels.items():
        if getattr(fn, "compiled_op", None) == name and extension_has(name):
            torch.library.register_fake(f"{COMPILED_NAMESPACE}::{name}")(
                lambda *args, _b=backend: fake(*args, _b)
            )
            break
    return op


def _arg_names(schema: str) -> list[str]:
    """The argument names of a schema string ``(Tensor x, int n=1, *, str b) -> ...``."""
    inner = schema.partition("->")[0].strip()[1:-1]
    return [a.split("=")[0].split()[-1] for a in inner.split(",") if a.strip() and a.strip() != "*"]


def _autocast_kernel(op, device_type: str, positions: set[int] | None):
    """Under autocast, run ``op`` with its floating inputs (those at ``positions``; None: all of them) cast to the
    autocast dtype and autocast off inside (what ``torch.amp.custom_fwd(cast_inputs=...)`` does for an autograd
    Function); the casts stay in the autograd graph, so fp32 parameters receive fp32 gradients."""

    def run(*args):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(i, a):
            if (positions is None or i in positions) and isinstance(a, torch.Tensor) and a.is_floating_point() \
                    and a.device.type == device_type:
                return a.to(dtype)
            return a

        with torch.autocast(device_type, enabled=False):
            return op(*(cast(i, a) for i, a in enumerate(args)))

    return run


def define_op(
    name: str,
    schema: str,
    *,
    fake: Callable,
    kernels: dict[str, Callable],
    checks: dict[str, Callable[[str], bool]] | None = None,
    preference: dict[str, tuple[str, ...]] | None = None,
    validate: Callable | None = None,
    backward: Backward | None = None,
    autocast: bool | tuple[str, ...] = False,
):
    """Declare the op ``sslam_fast::<name>``: every op of ``sslam_fast.ops`` is made here, the same way.

    Args:
        name: the op's name; ``torch.ops.sslam_fast.<name>``, and its backward ``<name>_backward``.
        schema: its arguments and results without the backend, e.g. ``"(Tensor x, int n) -> Tensor"``. The op takes
            the backend string (from :func:`resolve`) as its last argument.
        fake: the fake (meta) kernel: the output's shape, dtype and strides from the inputs' (backend last; a
            backend whose output layout differs can be told apart by it).
        kernels: backend name ("reference", "cpp", "cuda", "triton") -> the kernel, called with the op's arguments
            without the backend. "reference" is required: the plain-PyTorch definition.
        checks: backend name -> ``check(device_type) -> bool`` for backends whose availability depends on more than
            the device (a compiled kernel: :func:`compiled_available`; ATen code: :func:`always`).
        preference: device type -> backend order for ``auto`` where it differs from the default.
        validate: checks of the op's arguments run inside the op before the kernel (metadata only: the op can be
            called directly, bypassing the public function's checks).
        backward: the op's :class:`Backward`; None for an op without gradients.
        autocast: under CPU / CUDA autocast, cast the floating inputs (True: all; a tuple: the arguments of these
            names) to the autocast dtype and run the op with autocast off.

    Returns:
        The custom op (call it with the op's arguments and the resolved backend).
    """
    if name in _DEFINED:
        raise ValueError(f"op {name!r} is already defined")
    if "reference" not in kernels:
        raise ValueError(f"op {name!r} needs a 'reference' kernel")
    unknown = set(kernels) - set(BACKENDS[1:])
    if unknown:
        raise ValueError(f"op {name!r}: unknown backends {sorted(unknown)} (expected some of {BACKENDS[1:]})")
    register_op(OpBackends(name, dict(kernels), dict(checks or {}), dict(preference or {})))
    op = _custom_op(name, schema, kernels, fake, validate)
    if backward is not None:
        if set(backward.kernels) != set(kernels):
            raise ValueError(f"op {name!r}: the backward's backends {sorted(backward.kernels)} differ from the "
                             f"forward's {sorted(kernels)}")
        bwd_name = f"{name}_backward"
        register_op(OpBackends(bwd_name, dict(backward.kernels), dict(backward.checks or checks or {}),
                               dict(preference or {})))
        bwd_op = _custom_op(bwd_name, backward.schema, backward.kernels, backward.fake, backward.validate)

        def setup_context(ctx, inputs, output):
            ctx.backend = inputs[-1]
            backward.save(ctx, inputs[:-1], output)

        def run_backward(ctx, *grad_outputs):
            grads = backward.grads(ctx, lambda *args: bwd_op(*args, ctx.backend), *grad_outputs)
            return (*grads, None)

        op.register_autograd(run_backward, setup_context=setup_context)
        _DEFINED[bwd_name] = bwd_op
    if autocast:
        positions = None
        if autocast is not True:
            names = _arg_names(schema)
            unknown = set(autocast) - set(names)
            if unknown:
                raise ValueError(f"op {name!r}: autocast names {sorted(unknown)} that are not arguments of {schema!r}")
            positions = {names.index(a) for a in autocast}
        for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
            torch.library.impl(f"{NAMESPACE}::{name}", key)(_autocast_kernel(op, device_type, positions))
    _DEFINED[name] = op
    return op


def defined_ops() -> dict[str, object]:
    """Every op made by :func:`define_op` (forward and backward), by name."""
    return dict(_DEFINED)
