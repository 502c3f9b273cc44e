"""The machinery shared by the step benchmarks of ``bench_train.py``: the pre-training step (``bench_train.py``) and the
fine-tuning step (``finetune_step.py``, ``bench_train.py --task finetune``).

Each benchmark defines its variants (a) to (d) as subclasses of :class:`StepVariant` (their own ``prepare`` and
``step``) and its set-up (``batch``, ``cuda``); this module runs them and reports: the warm-up, the interleaved
round-robin timing with a compiled variant's failure reported in its row, the peak memory of one step, the profile of
(a) and (c), the median, the results table, the CPU-worker line, the loss-agreement line, the final ``fast/reference``
line, and the printing, profile file, RESULTS.md section and chart of one run. The methods themselves are described
in the ``bench_train.py`` docstring.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import RESULTS, cuda_time_once, write_section

PROFILE_STEPS = 3
BF16_FLOP_S = 989e12  # H100 SXM dense bf16
WORKERS_LINE = ("CPU worker time per clip (upstream's DataLoader workers, 1 thread; outside the timed GPU step of (a) "
                "and (b)): ")


def short_error(exc: BaseException) -> str:
    """The table cell of a failed variant: the exception's type and first line, without markdown column bars."""
    msg = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ""
    return f"failed: {type(exc).__name__}: {msg}".replace("|", "/")  # keep the markdown table intact


@contextlib.contextmanager
def worker_threads():
    """Run the block at 1 torch thread, as torch runs one thread per DataLoader worker process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def no_tf32():
    """Run the block with TF32 matmuls and convolutions off (the loss-agreement checks compare in fp32)."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def rel_diff(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude; 0 where the two are equal."""
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))


def synthetic_audio(batch: int, samples: int, device: torch.device, seed: int, sample_rate: int = 16000):
    """(batch, samples) int16 PCM on ``device``: a few tones per clip plus noise, at a moderate level."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float32) / sample_rate
    freqs = 100 + 3900 * torch.rand(batch, 3, 1, generator=g)
    x = 0.1 * torch.sin(2 * math.pi * freqs * t).sum(1) + 0.05 * torch.randn(batch, samples, generator=g)
    return (x * 32768).round().clamp(-32768, 32767).to(torch.int16).to(device)


# --- one variant ------------------------------------------------------------------------------------------------------


class StepVariant:
    """One variant of a step benchmark: its label and flags, step count, timings, first-step loss and peak memory.

    A subclass builds the model copy and the optimizer (``self.opt``) and defines ``prepare(audio, n=None)`` (the
    batch upstream's CPU DataLoader workers hand the GPU step of (a) / (b) on CUDA, computed outside the timed region
    with its CPU seconds in ``_last_worker``; None for every other variant and on the CPU) and ``step(audio,
    prepared=None)`` (one update, returning the detached loss, with ``self.n`` counting the updates)."""

    def __init__(self, key: str, s, variants: dict[str, tuple[str, bool, bool]]):
        self.key, self.s = key, s
        self.label, self.fast, self.compiled = variants[key]  # label, fast path, under torch.compile
        self.workers = s.cuda and not self.fast  # (a) and (b) on CUDA: the batch from upstream's CPU workers
        self.worker_times: list[tuple[float, ...]] = []  # the workers' CPU seconds per timed step, by part
        self._last_worker: tuple[float, ...] | None = None
        self.n = 0  # optimizer steps done
        self.times: list[float] = []
        self.first_loss: float | None = None
        self.peak: int | None = None
        self.note = ""  # "failed: ..." / "skipped (...)"

    def prepare(self, audio: torch.Tensor, n: int | None = None):
        raise NotImplementedError

    def step(self, audio: torch.Tensor, prepared=None) -> torch.Tensor:
        raise NotImplementedError

    def timed_step(self, audio: torch.Tensor) -> None:
        if self.s.cuda:
            prepared = self.prepare(audio)  # upstream's workers, outside the timed region (None for (c) / (d))
            self.times.append(cuda_time_once(lambda: self.step(audio, prepared)))
            if prepared is not None:
                self.worker_times.append(self._last_worker)
            return
        t0 = time.perf_counter()
        self.step(audio)
        self.times.append(time.perf_counter() - t0)

    def cuda_peak(self, audio: torch.Tensor) -> int:
        self.opt.zero_grad(set_to_none=True)
        prepared = self.prepare(audio)  # the workers' batch arrives before the step, as in upstream
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.step(audio, prepared)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


# --- a run ------------------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    setup: object  # the benchmark's set-up: batch, cuda, ...
    variants: list[StepVariant]
    agreement: dict[str, float] = field(default_factory=dict)
    profiles: list[tuple[str, str]] = field(default_factory=list)


def measure(s, variants: list[StepVariant], audio: torch.Tensor, args, tag: str, cpu_peak, agreement) -> StepResult:
    """Warm-up (the first step gives the first-step loss, and compiles), ``args.steps`` round-robin rounds of one timed
    step per variant, the peak memory of one step (``cuda_peak`` on CUDA, ``cpu_peak(key)`` in a fresh process on the
    CPU), then ``agreement()`` and, with ``args.profile``, the profile of (a) and (c). The compiled variants are
    skipped with ``args.quick``; a failing one is reported in its row (``note``) and the run goes on."""
    for v in variants:
        if v.compiled and args.quick:
            v.note = "skipped (--quick)"
    active = [v for v in variants if not v.note]
    print(f"[{tag}] warm-up: {args.warmup} step(s) per variant", flush=True)
    for v in active:
        try:
            for i in range(args.warmup):
                loss = v.step(audio)
                if i == 0:
                    v.first_loss = float(loss)
        except Exception as exc:  # noqa: BLE001 - a compile failure is reported in the table, never hidden
            if not v.compiled:
                raise
            v.note = short_error(exc)
            print(f"  {v.label}: {v.note}", flush=True)
    active = [v for v in active if not v.note]
    print(f"[{tag}] timing: {args.steps} round(s) of {len(active)} variant(s)", flush=True)
    for _ in range(args.steps):
        for v in list(active):
            try:
                v.timed_step(audio)
            except Exception as exc:  # noqa: BLE001
                if not v.compiled:
                    raise
                v.note, v.times = short_error(exc), []
                active.remove(v)
    for v in active:
        try:
            v.peak = v.cuda_peak(audio) if s.cuda else cpu_peak(v.key)
        except RuntimeError as exc:
            if not v.compiled:
                raise
            print(f"  {v.label}: peak memory {short_error(exc)}", flush=True)
    result = StepResult(s, variants, agreement())
    if args.profile is not None:
        result.profiles = profile([v for v in variants if v.key in ("a", "c")], audio)
    return result


def profile(variants: list[StepVariant], audio: torch.Tensor) -> list[tuple[str, str]]:
    """(label, top-25 operators by self time) of ``PROFILE_STEPS`` steps of each variant; the workers' batches of
    (a) / (b) on CUDA are made before the profiled region."""
    out = []
    for v in variants:
        cuda = v.s.cuda
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        batches = [v.prepare(audio, v.n + i) for i in range(PROFILE_STEPS)]  # upstream's workers: not profiled
        with torch.profiler.profile(activities=acts) as prof:
            for prepared in batches:
                v.step(audio, prepared)
            if cuda:
                torch.cuda.synchronize()
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        out.append((v.label, prof.key_averages().table(sort_by=sort, row_limit=25)))
    return out


# --- report -----------------------------------------------------------------------------------------------------------


def median_s(v: StepVariant) -> float | None:
    return statistics.median(v.times) if v.times else None


def step_table(r: StepResult, flop_per_clip: float) -> str:
    """The markdown table: a row per variant (its note where it has no times); on CUDA with the share of the bf16
    roofline at ``flop_per_clip`` matmul FLOPs per clip."""
    s = r.setup
    head = ["variant", "ms / step", "clips/s", "vs (a)", "peak MiB", "peak MiB / clip", "first-step loss"]
    if s.cuda:
        head.append("bf16 roofline share")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    t_ref = median_s(r.variants[0])
    for v in r.variants:
        t = median_s(v)
        if t is None:
            lines.append("| " + " | ".join([v.label, v.note] + ["-"] * (len(head) - 2)) + " |")
            continue
        rate = s.batch / t
        rate_s = f"{rate:.2f}" if rate >= 1 else f"{rate:.3g}"  # base on a CPU runs at a few hundredths
        cells = [v.label, f"{1e3 * t:.1f}", rate_s, f"{t_ref / t:.2f}x" if t_ref else "-",
                 "-" if v.peak is None else f"{v.peak / 2**20:.1f}",
                 "-" if v.peak is None else f"{v.peak / 2**20 / s.batch:.2f}",
                 "-" if v.first_loss is None else f"{v.first_loss:.4f}"]
        if s.cuda:
            cells.append(f"{100 * rate * flop_per_clip / BF16_FLOP_S:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worker_line(r: StepResult, parts: tuple[str, ...]) -> str | None:
    """On CUDA: upstream's CPU DataLoader-worker time per clip, by part (``parts`` names the entries of each
    ``worker_times`` tuple), which (a) and (b) do not pay inside their GPU step, and the worker cores needed to keep
    up with (a). None where no variant ran with workers (the CPU, or none timed)."""
    times = [t for v in r.variants if v.workers for t in v.worker_times]
    if not times:
        return None
    batch, t_a = r.setup.batch, median_s(r.variants[0])
    per_clip = [statistics.median(t[i] for t in times) / batch for i in range(len(parts))]
    total = sum(per_clip)
    feed = (f"; feeding (a) at {batch / t_a:.1f} clips/s needs >= {total * batch / t_a:.1f} worker cores per GPU"
            if t_a else "")
    each = " + ".join(f"{name} {1e3 * t:.2f} ms" for name, t in zip(parts, per_clip))
    return WORKERS_LINE + each + (f" = {1e3 * total:.2f} ms" if len(parts) > 1 else "") + feed


def agreement_line(what: str, agreement: dict[str, float]) -> str:
    terms = " ".join(f"{k}={v:.1e}" for k, v in agreement.items())
    return f"loss agreement {what}, max rel diff fast vs plain: {terms}; max={max(agreement.values()):.1e}"


def result_text(r: StepResult, title: str, flop_per_clip: float, worker_parts: tuple[str, ...], what: str) -> str:
    """One result's markdown: ``title``, the table, the CPU-worker line (CUDA) and the loss-agreement line."""
    workers = worker_line(r, worker_parts)
    return "\n\n".join([title, step_table(r, flop_per_clip), *([workers] if workers else []),
                        agreement_line(what, r.agreement)])


def final_line(variants: list[StepVariant]) -> str:
    """(c) against (a): the clips/s ratio (the time ratio a / c) and the peak-memory ratio c / a."""
    a, c = variants[0], variants[2]
    speed = median_s(a) / median_s(c)
    mem = (c.peak / a.peak) if (a.peak and c.peak is not None) else float("nan")
    return f"fast/reference: speedup={speed:.2f}x memory={mem:.2f}x"


def notes_line(args, device: torch.device, fast_path: str, cpu_peak_note: str, cuda_note: str) -> str:
    """The run's settings line: threads, precision, the timing, the fast path's backends (``fast_path``) and the peak
    memory method (``cpu_peak_note`` appended on the CPU); on CUDA, ``cuda_note`` on how (a) and (b) run there."""
    cuda = device.type == "cuda"
    notes = (f"threads {torch.get_num_threads()}; {'bf16 autocast' if cuda else 'fp32'}; "
             f"median of {args.steps} round-robin steps after {args.warmup} warm-up step(s) per variant"
             f"{' (--quick)' if args.quick else ''}; fast path: {fast_path}; peak = "
             + ("max_memory_allocated above the step's start" if cuda
                else f"peak RSS above the step's start, fresh process per variant{cpu_peak_note}"))
    if cuda:
        notes += f"; step times from CUDA events; (a) and (b) as upstream on a GPU: {cuda_note}"
    return notes


def finish(args, argv: list[str], *, machine: str, notes: str, text: str, profiles: list[tuple[str, str, str]],
           heading: str, section: str, profile_name: str, last: str) -> int:
    """Print ``text``; with ``args.profile`` write the profiles (title, label, table) to that path (default
    ``benchmarks/profiles/<profile_name>``) and print them; with ``args.write`` write RESULTS.md section ``section``
    (``heading``, the machine, command and notes, ``text``, ``last``); with ``args.plot`` chart the ratios (linked from
    RESULTS.md with ``--write``); print ``last``."""
    print()
    print(text)
    if args.profile is not None:
        path = Path(args.profile) if args.profile else Path(__file__).resolve().parent / "profiles" / profile_name
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = [machine] + [f"## {title}: {label}, {PROFILE_STEPS} steps, top 25 by self time\n\n{table}"
                             for title, label, table in profiles]
        path.write_text("\n\n".join(parts) + "\n")
        print("\n\n".join(parts[1:]))
        print(f"profile written to {path}")
    if args.write:
        cmd = "python benchmarks/bench_train.py " + " ".join(argv)
        body = "\n\n".join([heading, f"{machine}  \ncommand: `{cmd.strip()}`; {notes}", text, f"`{last}`"])
        write_section(section, body)
    if args.plot:
        import plots  # imports matplotlib when it draws

        plots.chart_section(section, f"{heading}\n\n{text}", publish=args.write)
        if args.write:
            RESULTS.write_text(plots.add_link(RESULTS.read_text(), section))
    print(last)
    return 0
