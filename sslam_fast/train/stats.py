"""What the trainer accumulates between two log lines, without reading the device in between.

A GPU runs ahead of the Python that feeds it only while Python never waits for a value: ``float(loss)`` or
``torch.cuda.synchronize()`` in every step would make the host wait for the whole step and leave the GPU idle while
the next one is prepared. So the loss terms and the non-finite bookkeeping are added up in one small tensor on the
model's device, the time split is kept as CUDA events on a GPU, and both are read once per log line
(:meth:`StepStats.summary`), after one all-reduce over the ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from sslam_fast.train.distributed import DistEnv

__all__ = ["StepStats", "TERMS"]

TERMS = ("patch", "mix_patch", "cls", "loss")  # per-step values, each term divided by the sample size
_FINITE, _NONFINITE, _ROW, _MAX_ROW = len(TERMS), len(TERMS) + 1, len(TERMS) + 2, len(TERMS) + 3
_PHASES = ("data", "forward", "backward", "optimizer")


class _Clock:
    """Marks within a step: CUDA events on a GPU (recorded in stream order, never waited for until read), host
    clock readings on the CPU (where work is synchronous anyway)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1000.0
        return b - a


@dataclass
class StepStats:
    """Loss terms, non-finite steps and the time split of the steps since the last log line.

    ``values`` (on the device): the per-step loss terms summed over the steps whose gradient was finite, the count of
    those steps, the count of non-finite ones, the current run of non-finite steps in a row and its maximum.
    ``data`` time is host time (waiting for the loader); forward, backward and optimiser come from :class:`_Clock`
    marks, read only by :meth:`summary`."""

    env: DistEnv
    values: torch.Tensor = field(init=False)
    clips: int = 0  # since the last log line
    clips_seen: int = 0  # since the start of this invocation
    steps: int = 0
    data_s: float = 0.0
    marks: list = field(default_factory=list)  # per micro-step (t1, t2, t3) and per step (t3, t4) pairs
    lr: float = 0.0
    ema_decay: float = math.nan
    t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.clock = _Clock(self.env.cuda)
        self.values = torch.zeros(len(TERMS) + 4, dtype=torch.float64, device=self.env.device)

    def reset(self, carry_row: torch.Tensor | None = None) -> None:
        row = self.values[_ROW].clone() if carry_row is None else carry_row
        self.values.zero_()
        self.values[_ROW] = row
        self.clips, self.steps, self.data_s, self.marks = 0, 0, 0.0, []
        self.t0 = time.perf_counter()

    def add_clips(self, n: int) -> None:
        self.clips += n
        self.clips_seen += n

    def add_step(self, terms: torch.Tensor, finite: torch.Tensor) -> None:
        """One update's (len(TERMS),) terms (already averaged over micro-steps) and whether its gradient was finite
        (0-dim bool, the same on every rank): device ops only."""
        v, f = self.values, finite.to(torch.float64)
        v[: len(TERMS)] += torch.where(finite, terms.to(torch.float64), 0.0)
        v[_FINITE] += f
        v[_NONFINITE] += 1.0 - f
        v[_ROW] = (v[_ROW] + 1.0) * (1.0 - f)
        v[_MAX_ROW] = torch.maximum(v[_MAX_ROW], v[_ROW])
        self.steps += 1

    def summary(self, step: int) -> dict:
        """The log record of the interval (reads the device once; the loss terms are averaged over ranks)."""
        v = self.values.clone()
        nonfinite, max_row = v[_NONFINITE].clone(), v[_MAX_ROW].clone()
        self.env.all_reduce_(v)
        vals = v.tolist()  # the one read of the interval
        finite = vals[_FINITE]
        means = {k: (vals[i] / finite if finite > 0 else None) for i, k in enumerate(TERMS)}
        n_nonfinite, row = (int(x) for x in torch.stack([nonfinite, max_row]).tolist())
        wall = time.perf_counter() - self.t0
        times = {"data": self.data_s, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        for phase, a, b in self.marks:
            times[phase] += self.clock.seconds(a, b)
        return {
            "step": step, **means, "lr": self.lr,
            "ema_decay": None if math.isnan(self.ema_decay) else self.ema_decay,
            "clips_per_s": self.clips / max(wall, 1e-9),
            "nonfinite_steps": n_nonfinite, "max_nonfinite_in_row": row,
            "time": {k: round(times[k], 4) for k in _PHASES},
        }
