"""Run state helpers: RNG capture / restore, latest-checkpoint discovery, graceful SIGTERM / SIGINT handling."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
from pathlib import Path

import numpy as np
import torch

__all__ = ["GracefulExit", "capture_rng_state", "find_latest_checkpoint", "restore_rng_state"]


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


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from in ``run_dir``, or None.

    Numbered files ``checkpoint_<step>.pt`` are ranked by step; ``checkpoint_last.pt`` (rewritten after every save)
    wins unless a numbered file is strictly newer on disk. Partial files (``*.tmp`` etc.) are ignored."""
    d = Path(run_dir)
    if not d.is_dir():
        return None
    numbered = []
    for p in d.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_file():
            numbered.append((int(m.group(1)), p))
    best = max(numbered, key=lambda t: t[0])[1] if numbered else None
    last = d / "checkpoint_last.pt"
    if last.is_file():
        if best is None or last.stat().st_mtime_ns >= best.stat().st_mtime_ns:
            return last
    return best


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
