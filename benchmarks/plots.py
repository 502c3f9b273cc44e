"""Charts of the benchmark ratios: one horizontal bar per table row, against the row's peer, the 1.0x line marked.

    python benchmarks/plots.py                          # a chart for every bench_* section of RESULTS.md
    python benchmarks/plots.py bench_ops_cpu --link     # one section, and add its image link to RESULTS.md

Each benchmark script calls :func:`write_chart` with ``--plot`` on the markdown it prints (and writes into RESULTS.md),
so a chart is drawn from the same rows as its table; this CLI does the same from the tables already in RESULTS.md.
The chart of section ``S`` is ``benchmarks/charts/S.png``, linked from the section as ``![...](charts/S.png)``, when
the run writes RESULTS.md; a run that does not (``--no-write``, or bench_train without ``--write``) puts it in
``runs/bench_charts/S.png`` instead, which git ignores, so that the committed chart always matches its table.

Two kinds of ratio, both as printed beside the 1.0x line:

- speed: the peer's time over this row's time (> 1: faster than the peer), i.e. the table's own "speed-up" / "vs"
  column where it has one;
- peak memory: this row's peak over the peer's (< 1: less memory than the peer), as the training-step headline quotes
  it. A peak printed as 0.0 MiB against a peer above it is drawn at the table's resolution (0.05 MiB) and labelled
  "<", an upper bound; a peer peak of 0 gives no ratio and no bar.

The peer of each row: torchaudio's per-clip loop at the same thread count (bench_fbank), upstream's
``compute_block_mask_2d`` at the same thread count (bench_masks), the op's ``reference`` row (bench_ops), variant (a),
the upstream-faithful step (bench_train, both pre-training stages and the fine-tuning step). The mapping from table rows
to bars is :func:`series_for`, a pure function; matplotlib is imported only by :func:`draw`.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
CHARTS = HERE / "charts"
SCRATCH = HERE.parent / "runs" / "bench_charts"  # charts of runs that do not write RESULTS.md
RESULTS = HERE / "RESULTS.md"
DPI = 100
WIDTH_IN = 10.0
BAR_IN = 0.26  # height per bar
PANEL_EXTRA_IN = 1.1  # title and axis of one panel
MIB_RESOLUTION = 0.05  # RESULTS.md prints MiB with one decimal
LOG_SPAN = 10.0  # a log axis when the largest ratio of a panel is more than this many times its smallest


class Bar(NamedTuple):
    label: str
    ratio: float
    bound: bool = False  # the ratio is an upper bound (this row's figure printed as 0)


@dataclass
class Series:
    """One panel: bars against a peer. ``higher_is_better``: speed (True) or memory (False)."""

    title: str
    higher_is_better: bool
    bars: list[Bar] = field(default_factory=list)

    def pairs(self) -> list[tuple[str, float]]:
        return [(b.label, b.ratio) for b in self.bars]


# --- markdown tables --------------------------------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_tables(markdown: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Every pipe table of ``markdown``: ``(heading, rows)``, with ``heading`` the text of the last ``#`` line above
    the table ("" if none) and each row a dict from column name to cell text."""
    out: list[tuple[str, list[dict[str, str]]]] = []
    heading = ""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        is_head = line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+",
                                                                                 lines[i + 1].strip())
        if not is_head:
            i += 1
            continue
        head = _cells(line)
        rows = []
        i += 2
        while i < len(lines) and lines[i].strip().startswith("|"):
            cells = _cells(lines[i])
            if len(cells) != len(head):
                raise ValueError(f"table under {heading!r}: row {lines[i].strip()!r} has {len(cells)} cells, the "
                                 f"header {len(head)}")
            rows.append(dict(zip(head, cells)))
            i += 1
        out.append((heading, rows))
    return out


def _number(cell: str) -> float | None:
    """A table cell as a float: ``"4.507"``, ``"5.55x"``, ``"229.3x"``; None for ``"-"`` or any text."""
    m = re.fullmatch(r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)x?", cell.strip())
    return float(m.group(1)) if m else None


def _speed(peer: float | None, own: float | None) -> float | None:
    return peer / own if peer and own else None


def _memory(peer: float | None, own: float | None) -> tuple[float, bool] | None:
    """(own / peer, is an upper bound) or None when there is no ratio (either missing, or the peer is 0)."""
    if peer is None or own is None or peer <= 0:
        return None
    if own <= 0:
        return MIB_RESOLUTION / peer, True
    return own / peer, False


def _threads(n: str) -> str:
    return f"{n} thread" + ("" if n == "1" else "s")


# --- rows -> series, per table kind -----------------------------------------------------------------------------------


def _fbank_cpu(rows) -> list[Series]:
    s = Series("eat_features: speed-up vs torchaudio's per-clip loop, same threads", True)
    for r in rows:
        ratio = _number(r["speed-up vs loop"])
        if not r["path"].startswith("torchaudio") and ratio:
            s.bars.append(Bar(f"{r['path']}, {_threads(r['threads'])}", ratio))
    return [s]


def _fbank_cuda(rows) -> list[Series]:
    base = next((_number(r["us per clip"]) for r in rows if r["path"].startswith("torchaudio")), None)
    s = Series("eat_features on the GPU: speed-up vs torchaudio's per-clip loop (CPU, 1 thread)", True)
    for r in rows:
        ratio = _speed(base, _number(r["us per clip"]))
        if not r["path"].startswith("torchaudio") and ratio:
            s.bars.append(Bar(r["path"], ratio))
    return [s] if base else []


def _masks_cpu(rows) -> list[Series]:
    s = Series("inverse_block_mask: speed-up per row vs upstream compute_block_mask_2d, same threads", True)
    for r in rows:
        ratio = _number(r["speed-up vs upstream (per row)"])
        if not r["path"].startswith("upstream") and ratio:
            s.bars.append(Bar(f"{r['path']}, {r['rows']} rows, {_threads(r['threads'])}", ratio))
    return [s]


def _masks_cuda(rows) -> list[Series]:
    base = next((_number(r["us / row"]) for r in rows if r["path"].startswith("upstream")), None)
    s = Series("inverse_block_mask on the GPU: speed-up per row vs upstream compute_block_mask_2d (CPU worker)", True)
    for r in rows:
        ratio = _speed(base, _number(r["us / row"]))
        if not r["path"].startswith("upstream") and ratio:
            s.bars.append(Bar(r["path"], ratio))
    return [s] if base else []


def _ops(rows) -> list[Series]:
    speed = [Series("forward: speed-up vs reference", True), Series("forward + backward: speed-up vs reference", True)]
    mem = [Series("forward: peak memory vs reference", False),
           Series("forward + backward: peak memory vs reference", False)]
    shapes: dict[str, set[str]] = {}
    for r in rows:
        shapes.setdefault(r["op"], set()).add(r["shape"])
    peer: dict[str, str] | None = None
    for r in rows:
        if r["path"] == "reference":
            peer = r
            continue
        if peer is None or (peer["op"], peer["shape"]) != (r["op"], r["shape"]):
            raise ValueError(f"bench_ops table: the row {r['op']} {r['shape']} {r['path']!r} comes before its "
                             "reference row")
        op = r["op"] if len(shapes[r["op"]]) == 1 else f"{r['op']} ({r['shape']})"
        label = f"{op}: {r['path'].replace('(single implementation)', '(single impl.)')}"
        fwd = _number(r["fwd vs ref"]) if _number(r["fwd ms"]) else None  # the table's own column
        for series, ratio in zip(speed, (fwd, _speed(_number(peer["fwd+bwd ms"]), _number(r["fwd+bwd ms"])))):
            if ratio:
                series.bars.append(Bar(label, ratio))
        for series, col in zip(mem, ("fwd peak MiB", "fwd+bwd peak MiB")):
            m = _memory(_number(peer[col]), _number(r[col]))
            if m:
                series.bars.append(Bar(label, *m))
    return [s for s in (*speed, *mem) if s.bars]


def _step_name(heading: str) -> str:
    """"SSLAM stage 2 (sslam), preset tiny, ..." -> "SSLAM stage 2"; "Fine-tuning (...)" -> "Fine-tuning"."""
    return re.split(r" \(|,", heading, maxsplit=1)[0].strip() or "step"


def _steps(tables) -> list[Series]:
    speed = Series("whole step: speed-up (clips/s) vs (a) the upstream-faithful step", True)
    mem = Series("whole step: peak memory vs (a) the upstream-faithful step", False)
    for heading, rows in tables:
        name = _step_name(heading)
        peer = rows[0]
        for r in rows[1:]:
            label = f"{name}: {r['variant']}"
            ratio = _number(r["vs (a)"])
            if ratio:
                speed.bars.append(Bar(label, ratio))
            m = _memory(_number(peer["peak MiB"]), _number(r["peak MiB"]))
            if m:
                mem.bars.append(Bar(label, *m))
    return [s for s in (speed, mem) if s.bars]


def series_for(markdown: str) -> list[Series]:
    """The panels of the chart of one benchmark section, from the tables of its markdown (see the module docstring).

    A table is recognised by its columns; tables of no known kind are left out, and a section without any gives []."""
    out: list[Series] = []
    steps = []
    for heading, rows in parse_tables(markdown):
        if not rows:
            continue
        cols = set(rows[0])
        if "speed-up vs loop" in cols:
            out += _fbank_cpu(rows)
        elif {"path", "us per clip"} <= cols:
            out += _fbank_cuda(rows)
        elif "speed-up vs upstream (per row)" in cols:
            out += _masks_cpu(rows)
        elif {"path", "us / row"} <= cols:
            out += _masks_cuda(rows)
        elif "fwd vs ref" in cols:
            out += _ops(rows)
        elif {"variant", "vs (a)", "peak MiB"} <= cols:
            steps.append((heading, rows))
    if steps:
        out += _steps(steps)
    return [s for s in out if s.bars]


# --- drawing ----------------------------------------------------------------------------------------------------------


def figure_size(series: list[Series]) -> tuple[float, float]:
    """(width, height) in inches of the chart of ``series``; in pixels, times :data:`DPI`."""
    return WIDTH_IN, round(0.5 + sum(PANEL_EXTRA_IN + BAR_IN * max(len(s.bars), 1) for s in series), 2)


def use_log(series: Series) -> bool:
    """A log axis when the panel's ratios span more than :data:`LOG_SPAN` (the 1.0x line included)."""
    vals = [b.ratio for b in series.bars] + [1.0]
    return max(vals) / min(vals) > LOG_SPAN


def _fmt(b: Bar) -> str:
    text = f"{b.ratio:.0f}" if b.ratio >= 1000 else f"{b.ratio:.3g}"
    return ("<" if b.bound else "") + text + "x"


def _color(ratio: float, higher_is_better: bool) -> str:
    """Green: better than the peer; red: worse; grey: the same to the tables' two decimals."""
    if abs(ratio - 1.0) < 0.005:
        return "#8c8c8c"
    return "#3a923a" if (ratio > 1) == higher_is_better else "#c8453b"


def draw(series: list[Series], title: str, path: Path) -> Path:
    """Draw ``series`` (one panel each, one horizontal bar per row, the 1.0x line dashed, colours by :func:`_color`)
    to the PNG ``path``, :func:`figure_size` at :data:`DPI`."""
    if not series:
        raise ValueError(f"{path.name}: no ratios to chart")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    w, h = figure_size(series)
    heights = [PANEL_EXTRA_IN + BAR_IN * max(len(s.bars), 1) for s in series]
    fig, axes = plt.subplots(len(series), 1, figsize=(w, h), dpi=DPI, layout="constrained",
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    fig.suptitle(title, fontsize=10)
    for ax, s in zip(axes[:, 0], series):
        labels = [b.label for b in s.bars][::-1]  # the table's first row at the top
        ratios = [b.ratio for b in s.bars][::-1]
        colors = [_color(r, s.higher_is_better) for r in ratios]
        log = use_log(s)
        base = min([*ratios, 1.0]) / 2 if log else 0.0
        ax.barh(range(len(ratios)), [r - base for r in ratios], left=base, color=colors, height=0.7)
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        if log:
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        hi = max([*ratios, 1.0])
        ax.set_xlim(base if log else 0.0, hi * (3.0 if log else 1.18))
        for y, b in enumerate(s.bars[::-1]):
            ax.text(b.ratio * (1.05 if log else 1.0) + (0 if log else hi * 0.01), y, _fmt(b), va="center", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(s.title, fontsize=8, loc="left")
        better = "> 1: faster than the peer" if s.higher_is_better else "< 1: less memory than the peer"
        ax.set_xlabel(f"ratio ({better}; dashed: 1.0x{'; log scale' if log else ''})", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def section_title(markdown: str) -> str:
    """The first ``#`` heading of a section (for the chart's title)."""
    return next((ln.lstrip("#").strip() for ln in markdown.splitlines() if ln.strip().startswith("#")), "benchmark")


def chart_path(section: str, folder: Path | None = None) -> Path:
    """``<folder>/<section>.png``, by default in :data:`CHARTS`."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", section):
        raise ValueError(f"section name {section!r}: letters, digits, '_', '.', '-' only")
    return (CHARTS if folder is None else folder) / f"{section}.png"


def image_link(section: str) -> str:
    """The RESULTS.md line that shows the chart of ``section`` (relative to benchmarks/)."""
    chart_path(section)
    return f"![ratio chart of {section}](charts/{section}.png)"


def write_chart(section: str, markdown: str, folder: Path | None = None) -> Path | None:
    """Chart the tables of ``markdown`` (one section's body) to ``<folder>/<section>.png`` (default: :data:`CHARTS`);
    its path, or None (nothing written) when the markdown has no table with ratios."""
    series = series_for(markdown)
    if not series:
        return None
    return draw(series, section_title(markdown), chart_path(section, folder))


def chart_section(section: str, markdown: str, *, publish: bool) -> str:
    """What a benchmark script's ``--plot`` does: chart ``markdown`` (the section body it prints, and writes into
    RESULTS.md when ``publish``) with :func:`write_chart` and say where. Published: to ``benchmarks/charts/`` and
    returns ``markdown`` with the image link appended; else to ``runs/bench_charts/`` (ignored by git, so that a trial
    run never changes the chart RESULTS.md shows) and returns ``markdown`` unchanged (also when nothing is charted)."""
    png = write_chart(section, markdown, CHARTS if publish else SCRATCH)
    if png is None:
        print(f"no ratio table in {section}: no chart")
        return markdown
    print(f"chart written to {png}")
    return markdown.rstrip() + "\n\n" + image_link(section) if publish else markdown


# --- RESULTS.md -------------------------------------------------------------------------------------------------------


def _section_re(name: str) -> re.Pattern:
    return re.compile(re.escape(f"<!-- {name}:begin -->") + r"\n(.*?)\n?" + re.escape(f"<!-- {name}:end -->"), re.S)


def read_sections(text: str) -> dict[str, str]:
    """{name: body} of every ``<!-- name:begin -->`` ... ``<!-- name:end -->`` section of a RESULTS.md text."""
    names = re.findall(r"<!-- ([A-Za-z0-9_.-]+):begin -->", text)
    out = {}
    for name in names:
        m = _section_re(name).search(text)
        if m:
            out[name] = m.group(1)
    return out


def add_link(text: str, section: str) -> str:
    """``text`` (RESULTS.md) with the chart link as the last line of ``section``, unless the section has it already."""
    m = _section_re(section).search(text)
    if m is None:
        raise ValueError(f"RESULTS.md has no section {section!r}")
    link = image_link(section)
    if link in m.group(1):
        return text
    body = m.group(1).rstrip() + "\n\n" + link
    return text[: m.start(1)] + body + "\n" + text[m.end(0) - len(f"<!-- {section}:end -->"):]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="charts of the ratio tables in benchmarks/RESULTS.md")
    p.add_argument("sections", nargs="*", help="section names (default: every bench_* section with a ratio table)")
    p.add_argument("--results", type=Path, default=RESULTS, help="the RESULTS.md to read (default %(default)s)")
    p.add_argument("--link", action="store_true", help="add each chart's image link to its section of --results")
    args = p.parse_args(argv)
    try:
        text = args.results.read_text()
    except OSError as e:
        p.error(f"--results: {e}")
    sections = read_sections(text)
    unknown = [s for s in args.sections if s not in sections]
    if unknown:
        p.error(f"no section {unknown} in {args.results}; it has {sorted(sections)}")
    names = args.sections or [s for s in sections if s.startswith("bench_")]
    written = []
    for name in names:
        png = write_chart(name, sections[name])
        if png is None:
            print(f"{name}: no ratio table, no chart")
            continue
        print(f"{name}: {png}")
        written.append(name)
        if args.link:
            text = add_link(text, name)
    if args.link and written:
        args.results.write_text(text)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
