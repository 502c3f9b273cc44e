"""Reading checkpoint files safely and writing them atomically.

Reading never runs code from the file unless the caller says it trusts it:
1. safetensors files are plain tensors (no pickle at all);
2. torch/pickle files go through ``torch.load(weights_only=True)`` with an allow-list of the plain, non-executable types
   that fairseq files hold (``OrderedDict``, numpy scalars and dtypes in ``extra_state`` metrics, numpy arrays);
3. a file that needs more (an ``argparse.Namespace`` or a pickled OmegaConf ``DictConfig`` in ``cfg``/``args``) is read
   by a restricted unpickler that resolves only those classes, to inert stand-ins converted to plain dicts afterwards;
4. anything else (a ``__reduce__`` naming ``os.system``, an unknown class) is refused with :class:`CheckpointError`
   unless ``trust_checkpoint=True``, which falls back to ``torch.load(weights_only=False)``.

Integrity: torch's zip reader does not verify the per-record CRC, so bytes damaged inside a tensor of an otherwise valid
archive load silently (NaN weights, or plausible wrong values). Files written by :func:`atomic_torch_save` callers in
this package carry a per-tensor CRC-32 in ``extra_state["sslam_fast_checksum"]`` (:func:`tensor_checksums`), checked by
:func:`read_checkpoint_file`; files without one (upstream's releases) load as before, with nothing to check.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
import tempfile
import types
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A file or dict that is not a usable EAT/SSLAM checkpoint; the message says why."""


class CorruptCheckpointError(CheckpointError):
    """The file's bytes are damaged: empty, truncated, not a readable archive, or a tensor that does not match the
    checksum written with it. Distinct from a readable file of the wrong kind, so that a resume can fall back to an
    older checkpoint for this (the disk lost data) but not for that (a user error to report)."""


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
    # one line: the file name and the first line of the reader's complaint (torch's can span several)
    text = " ".join(str(err).split()) if err is not None else ""
    text = text if len(text) <= 200 else text[:200] + " ..."
    why = f" ({type(err).__name__}: {text})" if err is not None else ""
    return CorruptCheckpointError(f"corrupt or truncated checkpoint: {path}{why}")


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


def read_checkpoint_file(path: str | os.PathLike, trust_checkpoint: bool = False,
                         verify_checksum: bool = True) -> Any:
    """Read a checkpoint file into Python objects (tensors on CPU) without running code from it.

    Returns a dict of tensors for safetensors files and the unpickled object for torch files. Raises
    :class:`CheckpointError` for missing, corrupt, truncated or unsafe files (:class:`CorruptCheckpointError` for
    damaged bytes, including a tensor that does not match the checksum the file was written with; ``verify_checksum=
    False`` skips that check, e.g. to salvage what is left of a damaged file).
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
        raise CorruptCheckpointError(f"corrupt or truncated checkpoint: {path} (not a torch zip, a pickle or "
                                     "safetensors)")
    obj = _read_torch_file(path, trust_checkpoint)
    if verify_checksum:
        verify_checksums(obj, path)
    return obj


def _read_torch_file(path: Path, trust_checkpoint: bool) -> Any:
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
# tensor checksums

CHECKSUM_KEY = "sslam_fast_checksum"  # in ``extra_state``: {"algorithm": "crc32", "tensors": {name: crc}}
_CHECKSUM_ALGORITHM = "crc32"


def _named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint with its path (``model/_ema/blocks.0.norm1.weight``, ``last_optimizer_state/state/
    3/exp_avg``), in the object's own key order, which ``torch.save`` / ``torch.load`` preserve. The checksum record
    itself is skipped."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            if prefix == "extra_state" and k == CHECKSUM_KEY:
                continue
            yield from _named_tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _named_tensors(v, f"{prefix}/{i}" if prefix else str(i))


def _tensor_crc(t: torch.Tensor) -> int | None:
    """CRC-32 of a tensor's dtype, shape and element bytes (None for layouts without plain bytes: sparse, quantized,
    meta, which this package never writes)."""
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        return None
    t = t.detach().cpu().contiguous()
    crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def tensor_checksums(obj: Any) -> dict:
    """The checksum record of a checkpoint dict (see :data:`CHECKSUM_KEY`): the CRC-32 of every tensor in it, by path.
    CRC-32 is enough here: it is for damage on disk, not for tampering, and zlib's runs at memory speed."""
    tensors = {}
    for name, t in _named_tensors(obj):
        crc = _tensor_crc(t)
        if crc is not None:
            tensors[name] = crc
    return {"algorithm": _CHECKSUM_ALGORITHM, "tensors": tensors}


def verify_checksums(obj: Any, path: str | os.PathLike = "<checkpoint>") -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` and the first tensor (in the file's key order) whose bytes
    differ from the checksum recorded when the file was written. Nothing to check (no record, e.g. upstream's files,
    or an algorithm this version does not know) passes; so do tensors the record does not list, or listed tensors
    the object no longer holds (a user may strip ``last_optimizer_state`` from a file and re-save it: that is an
    edit, not damage)."""
    extra = obj.get("extra_state") if isinstance(obj, Mapping) else None
    record = extra.get(CHECKSUM_KEY) if isinstance(extra, Mapping) else None
    if not isinstance(record, Mapping) or record.get("algorithm") != _CHECKSUM_ALGORITHM:
        return
    expected = record.get("tensors")
    if not isinstance(expected, Mapping):
        return
    for name, t in _named_tensors(obj):
        want = expected.get(name)
        if want is None:
            continue
        got = _tensor_crc(t)
        if got is not None and got != want:
            raise CorruptCheckpointError(
                f"corrupt checkpoint: {path}: tensor {name} {tuple(t.shape)} does not match the checksum written with "
                f"it (crc32 {got:08x}, recorded {int(want):08x}); the file was damaged after it was saved"
            )


# temp files of atomic_torch_save: ``.<name>.<mkstemp's random part>.tmp`` (see there)
TEMP_FILE_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


# --------------------------------------------------------------------------------------------------------------------
# writing


def atomic_torch_save(obj_or_factory: Any | Callable[[], Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the destination folder, fsync, then ``os.replace``: a reader sees either the
    old file or the complete new one, and a failure midway (building the state or writing it) leaves the old file
    intact and no temp file behind. ``obj_or_factory`` may be a zero-argument callable, called inside the guard.

    A process killed midway (SIGKILL, power loss) cannot clean up: its temp file ``.<name>.<random>.tmp``
    (:data:`TEMP_FILE_RE`) stays. It never looks like a checkpoint (leading dot, ``.tmp`` suffix); the trainer removes
    such leftovers when it starts (``sslam_fast.train.state.remove_stale_temp_files``)."""
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
