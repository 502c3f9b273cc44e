"""Run state helpers: RNG capture / restore, latest-checkpoint discovery (with fallback past damaged files and removal
of the temp files of interrupted writes), checks that a checkpoint is the trainer's, graceful SIGTERM / SIGINT."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "GracefulExit",
    "LoadedCheckpoint",
    "capture_rng_state",
    "checkpoint_candidates",
    "find_latest_checkpoint",
    "config_change",
    "remove_stale_temp_files",
    "restore_rng_state",
    "trainer_state",
]


def capture_rng_state() -> dict:
    """The state of python ``random``, numpy's global generator, torch CPU and (if initialised) every CUDA generator,
    as tensors / ints / floats / strings / lists only, so it survives ``torch.load(weights_only=True)``."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored only when CUDA is available (a CPU run resuming
    a GPU state keeps its CUDA generators); a state with fewer devices than visible restores the first ones."""
    py = state["python"]
    gauss = py["gauss_next"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu().to(torch.uint8), device=i)


_CKPT = re.compile(r"^checkpoint_(\d+)\.pt$")
_LAST = "checkpoint_last.pt"
TRAIN_STATE_KEY = "sslam_fast_train"  # the trainer's own entry in a checkpoint's extra_state (see loop._save)


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """The trainer's checkpoints in ``run_dir``, newest first (the order a resume tries them in).

    Numbered files ``checkpoint_<step>.pt`` are ranked by step, the update count in their name.
    ``checkpoint_last.pt`` is a copy of the newest numbered file written right after it, so its step is not in its
    name: it goes before the first numbered file that is not strictly newer on disk (normally first, ahead of the
    numbered file of the same step; after a kill between the two writes, behind the newer numbered one). Nothing else
    is a candidate: not the temp files of interrupted writes (``.checkpoint_6.pt.<random>.tmp``), not ``*.tmp`` or
    ``checkpoint_best.pt``."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    numbered = []
    for p in d.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_file():
            numbered.append((int(m.group(1)), p))
    out = [p for _, p in sorted(numbered, key=lambda t: -t[0])]
    last = d / _LAST
    if last.is_file():
        t = last.stat().st_mtime_ns
        at = next((i for i, p in enumerate(out) if p.stat().st_mtime_ns <= t), len(out))
        out.insert(at, last)
    return out


def remove_stale_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temp files that checkpoint writes killed midway left in ``run_dir`` (``atomic_torch_save`` writes
    ``.<name>.<random>.tmp`` and renames it; SIGKILL or a power loss skips its clean-up) and return them.

    Only the temp files of the trainer's own names (``checkpoint_<N>.pt``, ``checkpoint_last.pt``) are touched. Call
    it only while nothing writes checkpoints into ``run_dir``: the trainer does, once, on its main rank before the
    first update (a save of this run cannot be under way, and one of an earlier run is dead)."""
    from sslam_fast.checkpoint._io import TEMP_FILE_RE

    d = Path(run_dir)
    if not d.is_dir():
        return []
    removed = []
    for p in sorted(d.iterdir()):
        m = TEMP_FILE_RE.match(p.name)
        if not m or not (m.group("name") == _LAST or _CKPT.match(m.group("name"))) or not p.is_file():
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError:  # read-only folder: the leftover is harmless (never taken for a checkpoint), keep going
            continue
        removed.append(p)
    return removed


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint(os.PathLike):
    """A checkpoint file already read (and its checksums verified) by ``find_latest_checkpoint(load=True)``: a path
    (``str()`` / ``os.fspath()`` give it) that also carries the loaded object, so the file is not read twice."""

    path: Path
    obj: Any = dataclasses.field(repr=False, compare=False)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)


def find_latest_checkpoint(run_dir: str | os.PathLike, *, load: bool = False, remove_temp: bool = False,
                           verbose: bool = True) -> Path | LoadedCheckpoint | None:
    """The checkpoint to resume from in ``run_dir``, or None when there is none.

    ``load=False``: the newest candidate (:func:`checkpoint_candidates`), not opened.

    ``load=True``: the newest candidate that reads, as a :class:`LoadedCheckpoint`. A damaged one (truncated, not an
    archive, a tensor that does not match its checksum: ``CorruptCheckpointError``) is skipped for the next newest,
    with one ``warning:`` line on stderr naming it (``verbose``); it is left as it is, never deleted (the run's next
    save under the same name replaces it, as every save does). A file that reads but is of the wrong kind is not
    skipped: that is for the caller to report. When candidates exist and none reads, ``CheckpointError`` lists them
    (starting over silently would throw the run away).

    ``remove_temp=True`` first removes the temp files of interrupted writes (:func:`remove_stale_temp_files`)."""
    if remove_temp:
        removed = remove_stale_temp_files(run_dir)
        if removed and verbose:
            print(f"removed {len(removed)} temp file(s) of interrupted checkpoint writes: "
                  + ", ".join(p.name for p in removed), file=sys.stderr, flush=True)
    candidates = checkpoint_candidates(run_dir)
    if not load:
        return candidates[0] if candidates else None
    from sslam_fast.checkpoint import CheckpointError, CorruptCheckpointError, read_checkpoint_file

    bad: list[tuple[Path, CheckpointError]] = []
    for path in candidates:
        try:
            obj = read_checkpoint_file(path)
        except CorruptCheckpointError as e:
            bad.append((path, e))
            continue
        if verbose:
            for _, e in bad:
                print(f"warning: {e}; resuming from {path} instead (the damaged file is left in place)",
                      file=sys.stderr, flush=True)
        return LoadedCheckpoint(path, obj)
    if bad:
        raise CheckpointError(f"no checkpoint in {run_dir} loads: " + "; ".join(str(e) for _, e in bad)
                              + "; restore one, or move them out of the folder to start the run over")
    return None


# model-size fields of TrainConfig (saved in the trainer state) that change the shapes of the weights
_SIZE_FIELDS = ("embed_dim", "depth", "num_heads", "decoder_layers", "decoder_groups", "grid")


def trainer_state(obj: Any, path: str | os.PathLike) -> dict:
    """The trainer's state (``extra_state['sslam_fast_train']``) of a checkpoint read from ``path``, or a one-line
    ``CheckpointError`` saying what the file is instead (an upstream pre-training file, a fine-tuned classifier, ...)
    and what to do. Resuming needs this state and the optimizer's: a file the trainer did not write has neither."""
    from sslam_fast.checkpoint import CheckpointError
    from sslam_fast.checkpoint._keys import detect_format_of

    extra = obj.get("extra_state") if isinstance(obj, Mapping) else None
    st = extra.get(TRAIN_STATE_KEY) if isinstance(extra, Mapping) else None
    if isinstance(st, Mapping):
        if isinstance(obj.get("last_optimizer_state"), Mapping):
            return dict(st)
        raise CheckpointError(f"{path}: a checkpoint of sslam_fast's trainer without its optimizer state "
                              "(last_optimizer_state was removed), which a resume needs; move it out of the run folder "
                              "or start a new --run_dir; to start from its weights, pass it as --init_checkpoint")
    try:
        fmt = detect_format_of(obj)
    except CheckpointError:
        fmt = None
    what = {"fairseq_pretrain": "a fairseq pre-training checkpoint (e.g. an upstream EAT/SSLAM file)",
            "fairseq_finetune": "a fine-tuned classifier checkpoint", "hf_safetensors": "an HF safetensors port",
            None: "not an EAT/SSLAM checkpoint"}[fmt]
    hint = "; to start from its weights, pass it as --init_checkpoint" if fmt == "fairseq_pretrain" else ""
    raise CheckpointError(f"{path}: {what}, not written by sslam_fast's trainer: no {TRAIN_STATE_KEY} state; move it "
                          f"out of the run folder or start a new --run_dir{hint}")


def config_change(st: Mapping, model_cfg: Any) -> str:
    """`` (the run was started with embed_dim=64, this one has embed_dim=32)`` for the model-size settings that
    differ between a checkpoint's saved config and this run's ``ModelConfig``; "" when none does (or unknown)."""
    saved = st.get("config") if isinstance(st, Mapping) else None
    if not isinstance(saved, Mapping):
        return ""

    def norm(v):  # grid is a list once saved, a tuple in the config
        return tuple(v) if isinstance(v, (list, tuple)) else v

    diff = [k for k in _SIZE_FIELDS if k in saved and norm(saved[k]) != norm(getattr(model_cfg, k, saved[k]))]
    if not diff:
        return ""
    was = ", ".join(f"{k}={norm(saved[k])}" for k in diff)
    now = ", ".join(f"{k}={norm(getattr(model_cfg, k))}" for k in diff)
    return f" (the run was started with {was}, this one has {now})"


class GracefulExit:
    """``with GracefulExit() as stop: ... if stop.requested: save and break``.

    Inside the block SIGTERM and SIGINT set ``requested`` (and ``signum``) instead of killing the process; a second
    SIGINT raises KeyboardInterrupt so a hung run can still be stopped. The previous handlers are restored on exit.
    Outside the main thread (where handlers cannot be installed) it is a no-op that never requests."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __enter__(self) -> GracefulExit:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old.clear()
