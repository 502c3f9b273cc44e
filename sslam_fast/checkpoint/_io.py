"""Reading checkpoint files safely and writing them atomically.

Reading never runs code from the file unless the caller says it trusts it:
1. safetensors files are plain tensors (no pickle at all);
2. torch/pickle files go through ``torch.load(weights_only=True)`` with an allow-list of the plain, non-executable types
   that fairseq files hold (``OrderedDict``, numpy scalars and dtypes in ``extra_state`` metrics, numpy arrays);
3. a file that needs more (an ``argparse.Namespace`` or a pickled OmegaConf ``DictConfig`` in ``cfg``/``args``) is read
   by a restricted unpickler that resolves only those classes, to inert stand-ins converted to plain dicts afterwards;
4. anything else (a ``__reduce__`` naming ``os.system``, an unknown class) is refused with :class:`CheckpointError`
   unless ``trust_checkpoint=True``, which falls back to ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import builtins
import os
import pickle
import tempfile
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A file or dict that is not a usable EAT/SSLAM checkpoint; the message says why."""


# --------------------------------------------------------------------------------------------------------------------
# allow-lists


def _numpy_safe_globals() -> list:
    """numpy types a fairseq ``extra_state`` holds (metric values as numpy scalars, the odd array), under both the
    numpy >= 2 module names and the numpy 1.x names (``numpy.core.*``) that files written by older installs carry."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of the project
        return []
    core = getattr(np, "_core", None) or np.core
    multiarray = core.multiarray
    out: list = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(multiarray, name)
        out += [fn, (fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtype instances of these classes
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


def safe_globals() -> list:
    """The allow-list for ``torch.load(weights_only=True)``: plain data types only, nothing callable with effects."""
    return [OrderedDict, *_numpy_safe_globals()]


# --------------------------------------------------------------------------------------------------------------------
# restricted unpickler for cfg objects that are not plain (argparse.Namespace, OmegaConf containers)


class _Stub:
    """Inert stand-in for an allowed non-plain class: records constructor args and pickled state, runs nothing."""

    _qualname = ""

    def __init__(self, *args, **kwargs):
        self._args, self._state = args, None

    def __setstate__(self, state):
        self._state = state

    def __setitem__(self, key, value):  # SETITEM on a dict subclass stand-in
        if not isinstance(self._state, dict):
            self._state = {}
        self._state.setdefault("__items__", {})[key] = value

    def append(self, value):  # APPEND on a list subclass stand-in
        if not isinstance(self._state, dict):
            self._state = {}
        self._state.setdefault("__list__", []).append(value)


def _stub_class(qualname: str) -> type:
    return type("Stub", (_Stub,), {"_qualname": qualname})


_STUB_MODULES = ("omegaconf",)  # every class of these packages becomes a stub
_STUB_NAMES = {"argparse.Namespace"}
_PLAIN_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool", "bytes", "complex",
                   "object", "slice"}


def _restricted_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {}
    try:  # torch's own weights-only allow-list (tensor rebuilders, dtypes, storages): private but long-standing
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed.update(_get_allowed_globals())
    except Exception:  # pragma: no cover - fall back to the rebuilders torch.save emits
        import torch._utils as tu

        for name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
            allowed[f"torch._utils.{name}"] = getattr(tu, name)
    for item in safe_globals():
        obj, name = item if isinstance(item, tuple) else (item, f"{item.__module__}.{item.__qualname__}")
        allowed[name] = obj
    allowed["copyreg._reconstructor"] = _safe_reconstructor
    allowed["copy_reg._reconstructor"] = _safe_reconstructor
    allowed["typing.Any"] = Any
    for name in _PLAIN_BUILTINS:
        allowed[f"builtins.{name}"] = allowed[f"__builtin__.{name}"] = getattr(builtins, name)
    return allowed


def _safe_reconstructor(cls, base, state):
    # protocol 0/1 objects: only our stubs may be instantiated this way
    if not (isinstance(cls, type) and issubclass(cls, _Stub)):
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
    obj = cls()
    if state is not None:
        obj.__setstate__(state)
    return obj


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _build_allowed(inst: Any) -> bool:
    # like torch's weights-only unpickler, BUILD (which may setattr on its target) only on inert data objects
    if isinstance(inst, (_Stub, OrderedDict)) or type(inst) in (torch.Tensor, torch.nn.Parameter):
        return True
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(inst, np.dtype)


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcode table can be narrowed; this path is a rare fallback, so speed is moot)."""

    _allowed: dict[str, Any] | None = None
    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_build(self):
        if not _build_allowed(self.stack[-2]):
            raise _RefusedGlobal(f"BUILD on {type(self.stack[-2]).__module__}.{type(self.stack[-2]).__qualname__}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _restricted_globals()
        if full in _RestrictedUnpickler._allowed:
            return _RestrictedUnpickler._allowed[full]
        if full in _STUB_NAMES or module.split(".")[0] in _STUB_MODULES:
            return _stub_class(full)
        raise _RefusedGlobal(full)


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) subclasses ``pickle_module.Unpickler`` and routes find_class through it.
_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=_restricted_load,
                                           __name__="sslam_fast_restricted_pickle")


def _plain(obj: Any) -> Any:
    """Convert stubs (Namespace, OmegaConf nodes/containers) to plain dicts/lists/values, recursively."""
    if isinstance(obj, _Stub):
        state = obj._state
        if obj._qualname == "argparse.Namespace":
            return {k: _plain(v) for k, v in (state or {}).items()}
        if isinstance(state, dict):
            if "_content" in state:  # DictConfig / ListConfig
                return _plain(state["_content"])
            if "_val" in state:  # a value node (AnyNode, StringNode, ...)
                return _plain(state["_val"])
            if "__items__" in state:
                return {k: _plain(v) for k, v in state["__items__"].items()}
            if "__list__" in state:
                return [_plain(v) for v in state["__list__"]]
        return None
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _plain(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------------------------------
# reading


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def _corrupt(path, err: BaseException | None = None) -> CheckpointError:
    why = f" ({type(err).__name__}: {str(err)[:200]})" if err is not None else ""
    return CheckpointError(f"corrupt or truncated checkpoint: {path}{why}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - listed in requirements.txt
        raise CheckpointError(f"{path} is a safetensors file but the `safetensors` package is not installed") from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise _corrupt(path, e) from None


def _torch_load(path: Path, **kwargs):
    return torch.load(str(path), map_location="cpu", **kwargs)


def read_checkpoint_file(path: str | os.PathLike, trust_checkpoint: bool = False) -> Any:
    """Read a checkpoint file into Python objects (tensors on CPU) without running code from it.

    Returns a dict of tensors for safetensors files and the unpickled object for torch files. Raises
    :class:`CheckpointError` for missing, corrupt, truncated or unsafe files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise _corrupt(path, EOFError("empty file"))
    if _is_safetensors(head):
        return _load_safetensors(path)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(f"corrupt or truncated checkpoint: {path} (not a torch zip, a pickle or safetensors)")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" not in msg and "GLOBAL" not in msg and "Unsupported operand" not in msg:
            raise _corrupt(path, e) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        raise _corrupt(path, e) from None
    # Second pass: the restricted unpickler (Namespace / OmegaConf stand-ins); still never runs code from the file.
    try:
        return _plain(_torch_load(path, weights_only=False, pickle_module=_restricted_pickle))
    except _RefusedGlobal as e:
        refused = str(e)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            IndexError, TypeError, AttributeError) as e:
        if not trust_checkpoint:
            raise _corrupt(path, e) from None
        refused = str(e)
    if not trust_checkpoint:
        raise CheckpointError(
            f"refusing to unpickle {path}: it needs the global {refused}, which is not a plain data type and could run "
            "code. "
            "Pass trust_checkpoint=True only if you trust where this file came from."
        )
    try:
        return _torch_load(path, weights_only=False)
    except Exception as e:
        raise _corrupt(path, e) from None


# --------------------------------------------------------------------------------------------------------------------
# writing


def atomic_torch_save(obj_or_factory: Any | Callable[[], Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the destination folder, fsync, then ``os.replace``: a reader sees either the
    old file or the complete new one, and a failure midway (building the state or writing it) leaves the old file
    intact and no temp file behind. ``obj_or_factory`` may be a zero-argument callable, called inside the guard."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            obj = obj_or_factory() if callable(obj_or_factory) else obj_or_factory
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    return path
