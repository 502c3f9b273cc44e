"""Training curves of one or more runs: ``python -m sslam_fast.plot RUN_DIR [RUN_DIR ...] [--out DIR]``.

Reads ``<run_dir>/metrics.jsonl`` (one JSON record per log step, written by ``sslam_fast.train.loop.train`` and
``sslam_fast.finetune.loop.finetune``) and draws one PNG, ``<out>/curves.png`` (default out: the first run folder), of
what a researcher checks: each loss term, the learning rate, the EMA decay, clips/s, the share of the step spent in
data / forward / backward / optimiser, the non-finite steps when there were any, and for fine-tuning the evaluation
metric over updates. Several folders are overlaid, one colour per run, labelled with the folder's name; a folder that
holds no ``metrics.jsonl`` but folds ``fold1`` ... (``finetune.py --folds=all``) stands for each of them.

A run still being written and a resumed run read as one run: a line that does not parse (the half line a running or
killed trainer leaves) is skipped, the summary records are left out, and each quantity is ordered by step with the
last record of a step winning (a resumed run logs again the steps it redoes). matplotlib is imported only by the
drawing functions, never by ``import sslam_fast``; they draw on the Agg canvas (no display needed, no pyplot state).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["load_series", "load_runs", "curves_figure", "plot_runs", "agg_figure", "save_png", "main"]

METRICS = "metrics.jsonl"
#: The loss terms, total first: the pretrainer's ``sslam_fast.train.stats.TERMS`` (ALGORITHM §5.4), and the
#: fine-tuner's ``loss``.
LOSS_TERMS = ("loss", "patch", "mix_patch", "cls")
LOSS_TITLES = {
    "loss": "loss (total)",
    "patch": "patch loss (frame targets)",
    "mix_patch": "mix_patch (Source Retention Loss)",
    "cls": "cls loss (utterance target)",
}
#: The phases of the time split (``time`` in each record; the fine-tuner logs ``data`` alone).
TIME_PHASES = ("data", "forward", "backward", "optimizer")
PANEL_SIZE = (4.0, 2.6)  # inches per panel
LOG_SPAN = 20.0  # a loss curve whose max / min exceeds this is drawn on a log scale

Series = tuple[list[int], list[float]]


def _number(value) -> float | None:
    """``value`` as a float when it is a finite JSON number (not a bool); None (a gap in the curve) otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_records(path: str | Path) -> list[dict]:
    """The step records of a ``metrics.jsonl``, in file order: lines that do not parse (a half-written last line),
    records that are not objects, summary records and records without an int ``step`` are left out."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and not rec.get("summary") and isinstance(rec.get("step"), int) \
                    and not isinstance(rec["step"], bool):
                records.append(rec)
    return records


def _metrics_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist" if not run_dir.exists()
                                else f"{run_dir} is a file, not a run folder")
    path = run_dir / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {METRICS} (is it a run folder of train.py or finetune.py?)")
    return path


def load_series(run_dir: str | Path) -> dict[str, Series]:
    """Every numeric quantity of a run's ``metrics.jsonl`` as ``name -> (steps, values)``, steps ascending.

    Top-level numbers keep their key (``loss``, ``lr``, ``ema_decay``, ``clips_per_s``, ...); nested ones are
    ``outer.inner`` (``time.forward``, ``eval.mAP``). A value that is not a finite number (``null`` for an interval
    without a finite step) is a gap. A step logged twice keeps its last value, so a resumed run is one curve. Raises
    FileNotFoundError when the folder or its ``metrics.jsonl`` is missing."""
    by_name: dict[str, dict[int, float]] = {}
    for rec in read_records(_metrics_path(run_dir)):
        step = rec["step"]
        for key, value in rec.items():
            if key == "step":
                continue
            items = [(f"{key}.{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
            for name, v in items:
                number = _number(v)
                points = by_name.setdefault(name, {})
                if number is None:
                    points.pop(step, None)  # a later record of the step without a value replaces the earlier one
                else:
                    points[step] = number
    out = {}
    for name, points in by_name.items():
        if points:
            steps = sorted(points)
            out[name] = (steps, [points[s] for s in steps])
    return out


def expand_runs(run_dirs) -> list[Path]:
    """The run folders to plot: each folder itself, or its ``fold*`` subfolders with a ``metrics.jsonl`` when it has
    none of its own."""
    out = []
    for d in map(Path, run_dirs):
        folds = sorted(p.parent for p in d.glob(f"fold*/{METRICS}")) if d.is_dir() and not (d / METRICS).exists() \
            else []
        out.extend(folds or [d])
    return out


def _labels(dirs: list[Path]) -> list[str]:
    """Legend labels: each folder's name, with its parents added until the labels differ."""
    parts = [d.absolute().parts for d in dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in dirs]


def load_runs(run_dirs) -> dict[str, dict[str, Series]]:
    """``label -> load_series(folder)`` for each folder (after :func:`expand_runs`), in the order given."""
    dirs = expand_runs(run_dirs)
    if not dirs:
        raise ValueError("no run folder given")
    runs = {label: load_series(d) for label, d in zip(_labels(dirs), dirs)}
    empty = [label for label, series in runs.items() if not series]
    if len(empty) == len(runs):
        raise ValueError(f"no step record yet in the {METRICS} of {', '.join(empty)} (the first is written after "
                         "log_every updates)")
    return runs


def time_shares(series: dict[str, Series]) -> dict[str, Series]:
    """``phase -> (steps, % of the logged step time)`` over the steps where every logged phase has a value: the time
    split of each log interval, independent of its length."""
    phases = [p for p in TIME_PHASES if f"time.{p}" in series]
    if not phases:
        return {}
    values = [dict(zip(*series[f"time.{p}"])) for p in phases]
    steps = sorted(set.intersection(*(set(v) for v in values)))
    out: dict[str, Series] = {p: ([], []) for p in phases}
    for s in steps:
        total = sum(v[s] for v in values)
        if total <= 0:
            continue
        for p, v in zip(phases, values):
            out[p][0].append(s)
            out[p][1].append(100.0 * v[s] / total)
    return out


def panels(runs: dict[str, dict[str, Series]]) -> list[tuple[str, str, list[str]]]:
    """The panels to draw, as ``(kind, title, series names)``: kind ``line`` (one curve per run of each name),
    ``time`` (the time split) or ``eval`` (markers). A loss term that is zero in every run (``mix_patch`` of EAT
    stage 1) and quantities no run logs have no panel."""
    present: dict[str, list[Series]] = {}
    for series in runs.values():
        for name, s in series.items():
            present.setdefault(name, []).append(s)

    def nonzero(name):
        return any(v != 0 for s in present.get(name, ()) for v in s[1])

    out = [("line", LOSS_TITLES[t], [t]) for t in LOSS_TERMS if nonzero(t)]
    out += [("line", title, [name]) for name, title in (("lr", "learning rate"), ("ema_decay", "EMA decay"),
                                                         ("clips_per_s", "clips/s per device")) if name in present]
    phases = [f"time.{p}" for p in TIME_PHASES if f"time.{p}" in present]
    if len(phases) > 1:
        out.append(("time", "time split (% of step time)", phases))
    elif phases:  # one phase (the fine-tuner's data time): its seconds, a share would be 100 % throughout
        out.append(("line", f"{phases[0].split('.', 1)[1]} time (s per log interval)", phases))
    if nonzero("nonfinite_steps"):
        out.append(("line", "non-finite steps per log interval", ["nonfinite_steps"]))
    out += [("eval", f"evaluation {name.split('.', 1)[1]}", [name]) for name in sorted(present)
            if name.startswith("eval.")]
    return out


def agg_figure(size: tuple[float, float], dpi: int):
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _log_axis(ax) -> None:
    """A log y axis labelled 1, 2, 5 x 10^k in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def curves_figure(runs: dict[str, dict[str, Series]], *, dpi: int = 100, title: str | None = None):
    """The curves of ``runs`` (:func:`load_runs`) as a matplotlib Figure, 3 or 4 panels a row (whichever leaves fewer
    empty) of ``PANEL_SIZE`` inches each; a loss spanning more than ``LOG_SPAN`` x is drawn on a log scale. Every
    plotted line carries the gid ``"<run label>:<series name>"`` (the time split: ``"<run label>:time%.<phase>"``),
    so its data can be found again."""
    specs = panels(runs)
    if not specs:
        raise ValueError("the runs log no quantity that can be plotted")
    cols = min(len(specs), min((3, 4), key=lambda c: (-len(specs) % c, c)))
    rows = math.ceil(len(specs) / cols)
    fig = agg_figure((PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), dpi)
    if title:
        fig.suptitle(title)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    styles = {"data": ":", "forward": "-", "backward": "--", "optimizer": "-."}
    several = len(runs) > 1
    for i, (kind, panel_title, names) in enumerate(specs):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("update", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        low, high = math.inf, 0.0
        for colour, (label, series) in zip(colours, runs.items()):
            if kind == "time":
                for j, (phase, (steps, values)) in enumerate(time_shares(series).items()):
                    ax.plot(steps, values, styles[phase] if several else "-",
                            color=colour if several else f"C{j}", gid=f"{label}:time%.{phase}",
                            label=phase if (not several or colour == colours[0]) else None)
                continue
            for name in names:
                if name not in series:
                    continue
                steps, values = series[name]
                low, high = min(low, min(values)), max(high, max(values))
                ax.plot(steps, values, "o-" if kind == "eval" else "-", markersize=3, color=colour,
                        gid=f"{label}:{name}", label=label)
        if kind == "time":
            ax.set_ylim(0, 100)
            ax.legend(fontsize=7, ncols=2)
        elif names[0] in LOSS_TERMS and 0 < low and high > LOG_SPAN * low:
            _log_axis(ax)
        elif names[0] == "ema_decay":
            ax.ticklabel_format(axis="y", useOffset=False)
        if several and i == 0:
            ax.legend(fontsize=7)
    return fig


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG of exactly its figure size x dpi (no tight bounding box) with an adaptive 256-colour
    palette (Pillow, which matplotlib depends on; a third of the RGB file's size), atomically; creates the folder."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    buf.seek(0)
    tmp = path.with_name(f".{path.name}.tmp")
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256, dither=0).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path


def plot_runs(run_dirs, out: str | Path | None = None, *, dpi: int = 100) -> Path:
    """Draw the curves of ``run_dirs`` into ``<out>/curves.png`` (default out: the first folder); returns the path."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = load_runs(run_dirs)
    title = None if len(runs) > 1 else next(iter(runs))
    return save_png(curves_figure(runs, dpi=dpi, title=title), Path(out if out is not None else run_dirs[0])
                    / "curves.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sslam_fast.plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (train.py / finetune.py --run_dir)")
    p.add_argument("--out", help="folder for curves.png (default: the first RUN_DIR)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch (default 100)")
    args = p.parse_args(argv)
    if not 10 <= args.dpi <= 1000:
        p.error(f"--dpi must lie in [10, 1000], got {args.dpi}")
    try:
        path = plot_runs(args.run_dirs, args.out, dpi=args.dpi)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out or args.run_dirs[0]}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
