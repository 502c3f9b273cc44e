"""benchmarks/plots.py: the benchmark tables turned into (label, ratio) bars, the PNG charts, the RESULTS.md links, and
the ``--plot`` flag of the benchmark scripts. No pixel is compared: the PNGs are checked for their signature and size,
the data for equality with the tables."""

import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_fbank  # noqa: E402
import bench_ops  # noqa: E402
import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def expected_pixels(series) -> tuple[int, int]:
    w, h = plots.figure_size(series)
    return round(w * plots.DPI), round(h * plots.DPI)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    charts, scratch = tmp_path / "charts", tmp_path / "scratch"
    monkeypatch.setattr(plots, "CHARTS", charts)
    monkeypatch.setattr(plots, "SCRATCH", scratch)
    return charts, scratch


FBANK_CPU = """## fbank: eat_features vs the upstream per-clip loop (cpu, 16 x 10 s clips)

machine: x
| threads | path | ms / clip | speed-up vs loop | max abs diff |
|---|---|---|---|---|
| 1 | torchaudio per-clip loop | 4.507 | 1.00x | 0 |
| 1 | eat_features[reference] | 7.700 | 0.59x | 0.0e+00 |
| 1 | eat_features[cpp] | 0.812 | 5.55x | 2.4e-07 |
| 2 | torchaudio per-clip loop | 2.930 | 1.00x | 0 |
| 2 | eat_features[cpp] | 0.698 | 4.20x | 2.4e-07 |
"""

FBANK_CUDA = """| path | ms per batch | us per clip | GB/s | share of HBM (H100) | max abs diff vs CPU |
|---|---|---|---|---|---|
| torchaudio per-clip loop, CPU, 1 thread (upstream's worker) | - | 4000.0 | - | - | - |
| eat_features[cuda] | 0.960 | 10.00 | 1200 | 36% | 1.0e-06 |
| eat_features[triton] | 1.920 | 20.00 | 600 | 18% | 2.0e-06 |
"""

MASKS_CPU = """### inverse_block_mask, batch 12 x 16 clones = 192 rows, grid 64 x 8, 102 kept / row, device cpu

| threads | rows | path | ms / call | us / row | speed-up vs upstream (per row) |
|---|---|---|---|---|---|
| 1 | 192 | upstream compute_block_mask_2d (one call per clip) | 12.191 | 63.49 | 1.0x |
| 1 | 192 | inverse_block_mask[cpp] | 0.053 | 0.28 | 229.3x |
| 1 | 1536 | inverse_block_mask[cpp] | 0.223 | 0.15 | 436.8x |
"""

MASKS_CUDA = """| path | ms / batch | us / row |
|---|---|---|
| upstream compute_block_mask_2d (one call per clip), CPU, 1 thread (upstream's worker) | 12.0 | 62.500 |
| inverse_block_mask[triton] | 0.0200 | 0.125 |
"""

TRAIN = """## Train step, preset tiny, device cpu

### SSLAM stage 2 (sslam), preset tiny, batch 8, clones 4, 2.56 s clips, device cpu

| variant | ms / step | clips/s | vs (a) | peak MiB | peak MiB / clip | first-step loss |
|---|---|---|---|---|---|---|
| (a) plain (upstream-faithful) | 104.9 | 76.26 | 1.00x | 51.7 | 6.46 | 564.5197 |
| (b) plain + torch.compile(losses) | failed: BackendCompilerFailed | - | - | - | - | - |
| (c) fast (sslam_fast) | 79.4 | 100.78 | 1.32x | 25.8 | 3.22 | 564.5351 |

### EAT stage 1 (eat), preset tiny, batch 8, clones 4, 2.56 s clips, device cpu

| variant | ms / step | clips/s | vs (a) | peak MiB | peak MiB / clip | first-step loss |
|---|---|---|---|---|---|---|
| (a) plain (upstream-faithful) | 59.5 | 134.40 | 1.00x | 24.2 | 3.02 | 280.2228 |
| (c) fast (sslam_fast) | 44.3 | 180.57 | 1.34x | 12.2 | 1.52 | 280.2842 |

`fast/reference: speedup=1.32x memory=0.50x`
"""

FINETUNE = """### Fine-tuning (as2m recipe), preset tiny, batch 16, 527 classes, 10 s clips, device cpu

| variant | ms / step | clips/s | vs (a) | peak MiB | peak MiB / clip | first-step loss |
|---|---|---|---|---|---|---|
| (a) plain (upstream-faithful) | 200.0 | 80.00 | 1.00x | 40.0 | 2.50 | 0.7 |
| (c) fast (sslam_fast) | 100.0 | 160.00 | 2.00x | 10.0 | 0.62 | 0.7 |
"""


def test_parse_tables_keeps_heading_and_cells():
    tables = plots.parse_tables(TRAIN)
    assert [h for h, _ in tables] == [
        "SSLAM stage 2 (sslam), preset tiny, batch 8, clones 4, 2.56 s clips, device cpu",
        "EAT stage 1 (eat), preset tiny, batch 8, clones 4, 2.56 s clips, device cpu",
    ]
    rows = tables[0][1]
    assert len(rows) == 3 and rows[2]["variant"] == "(c) fast (sslam_fast)" and rows[2]["peak MiB"] == "25.8"


def test_parse_tables_rejects_a_ragged_row():
    with pytest.raises(ValueError, match="has 2 cells, the header 3"):
        plots.parse_tables("| a | b | c |\n|---|---|---|\n| 1 | 2 |\n")


def test_fbank_series():
    (s,) = plots.series_for(FBANK_CPU)
    assert s.higher_is_better
    assert s.pairs() == [("eat_features[reference], 1 thread", 0.59), ("eat_features[cpp], 1 thread", 5.55),
                         ("eat_features[cpp], 2 threads", 4.20)]
    (g,) = plots.series_for(FBANK_CUDA)
    assert g.pairs() == [("eat_features[cuda]", 400.0), ("eat_features[triton]", 200.0)]


def test_masks_series():
    (s,) = plots.series_for(MASKS_CPU)
    assert s.pairs() == [("inverse_block_mask[cpp], 192 rows, 1 thread", 229.3),
                         ("inverse_block_mask[cpp], 1536 rows, 1 thread", 436.8)]
    (g,) = plots.series_for(MASKS_CUDA)
    assert g.pairs() == [("inverse_block_mask[triton]", 500.0)]


def test_train_and_finetune_series():
    speed, mem = plots.series_for(TRAIN)
    assert speed.higher_is_better and not mem.higher_is_better
    assert speed.pairs() == [("SSLAM stage 2: (c) fast (sslam_fast)", 1.32),
                             ("EAT stage 1: (c) fast (sslam_fast)", 1.34)]
    assert mem.pairs() == [("SSLAM stage 2: (c) fast (sslam_fast)", 25.8 / 51.7),
                           ("EAT stage 1: (c) fast (sslam_fast)", 12.2 / 24.2)]
    speed, mem = plots.series_for(FINETUNE)
    assert speed.pairs() == [("Fine-tuning: (c) fast (sslam_fast)", 2.0)]
    assert mem.pairs() == [("Fine-tuning: (c) fast (sslam_fast)", 0.25)]


def _ops_markdown() -> str:
    """A bench_ops table made by bench_ops.table itself."""
    mib = 2**20
    gather = bench_ops.Case("clone_gather", "B2 K4", [], None, None, "clone_gather", grad_args=(0,))
    ema = bench_ops.Case("ema_update_", "160 tensors", [], None, None, None)
    rows_g = [bench_ops.Row("reference", 2e-3, 6e-3, 4 * mib, 8 * mib),
              bench_ops.Row("compile(reference)", note="compile failed: RuntimeError: x"),
              bench_ops.Row("op auto -> cpp", 1e-3, 2e-3, 0, 2 * mib)]
    rows_e = [bench_ops.Row("reference", 3e-3, None, 0, None),
              bench_ops.Row("op (single implementation)", 1.5e-3, None, 0, None)]
    return bench_ops.table([(gather, rows_g), (ema, rows_e)], "cpu")


def test_ops_series_from_bench_ops_table():
    fwd, fwd_bwd, fwd_mem, fwd_bwd_mem = plots.series_for(_ops_markdown())
    assert fwd.pairs() == [("clone_gather: op auto -> cpp", 2.0), ("ema_update_: op (single impl.)", 2.0)]
    assert fwd_bwd.pairs() == [("clone_gather: op auto -> cpp", 3.0)]
    # 0.0 MiB against 4.0 MiB: drawn at the table's resolution, marked as a bound; 0 against 0: no bar
    assert fwd_mem.bars == [plots.Bar("clone_gather: op auto -> cpp", plots.MIB_RESOLUTION / 4.0, True)]
    assert fwd_bwd_mem.pairs() == [("clone_gather: op auto -> cpp", 0.25)]
    assert not fwd_mem.higher_is_better and fwd.higher_is_better


def test_ops_series_need_the_reference_row_first():
    head = "| op | shape | path | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | fwd vs ref |\n"
    bad = head + "|---" * 8 + "|\n| x | s | op auto -> cpp | 1.0 | - | 1.0 | - | 1.00x |\n"
    with pytest.raises(ValueError, match="before its reference row"):
        plots.series_for(bad)


def test_use_log_only_when_ratios_span_decades():
    assert plots.use_log(plots.Series("t", True, [plots.Bar("a", 229.0), plots.Bar("b", 1.0)]))
    assert not plots.use_log(plots.Series("t", True, [plots.Bar("a", 1.3), plots.Bar("b", 0.5)]))
    assert plots.use_log(plots.Series("t", False, [plots.Bar("a", 0.004, True)]))  # with the 1.0x line


@pytest.mark.parametrize("markdown", [FBANK_CPU, MASKS_CPU, TRAIN, "OPS"], ids=["fbank", "masks", "train", "ops"])
def test_write_chart_is_a_png_of_the_expected_size(markdown, dirs):
    markdown = _ops_markdown() if markdown == "OPS" else markdown
    png = plots.write_chart("some_section", markdown)
    assert png == dirs[0] / "some_section.png"
    assert png_size(png) == expected_pixels(plots.series_for(markdown))


def test_nothing_to_chart():
    assert plots.series_for("no table here\n") == []
    assert plots.write_chart("x", "| a | b |\n|---|---|\n| 1 | 2 |\n") is None
    with pytest.raises(ValueError, match="no ratios"):
        plots.draw([], "t", Path("x.png"))
    with pytest.raises(ValueError, match="section name"):
        plots.chart_path("../escape")


def test_chart_section_published_or_not(dirs, capsys):
    charts, scratch = dirs
    body = plots.chart_section("bench_fbank_cpu", FBANK_CPU, publish=False)
    assert body == FBANK_CPU and (scratch / "bench_fbank_cpu.png").exists() and not charts.exists()
    body = plots.chart_section("bench_fbank_cpu", FBANK_CPU, publish=True)
    assert body.endswith("\n\n![ratio chart of bench_fbank_cpu](charts/bench_fbank_cpu.png)")
    assert png_size(charts / "bench_fbank_cpu.png") == expected_pixels(plots.series_for(FBANK_CPU))
    assert "chart written to" in capsys.readouterr().out


def test_add_link_once_per_section():
    text = "# R\n\n<!-- a:begin -->\nbody\n<!-- a:end -->\n\n<!-- b:begin -->\nother\n<!-- b:end -->\n"
    once = plots.add_link(text, "a")
    assert once == text.replace("body\n", "body\n\n![ratio chart of a](charts/a.png)\n")
    assert plots.add_link(once, "a") == once
    assert plots.read_sections(once)["a"].endswith("(charts/a.png)")
    with pytest.raises(ValueError, match="no section 'c'"):
        plots.add_link(text, "c")


def test_cli_charts_and_links_results(tmp_path, dirs, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# R\n\n<!-- bench_fbank_cpu:begin -->\n{FBANK_CPU}<!-- bench_fbank_cpu:end -->\n\n"
                       f"<!-- bench_train_tiny_cpu:begin -->\n{TRAIN}<!-- bench_train_tiny_cpu:end -->\n\n"
                       "<!-- notes:begin -->\nno table\n<!-- notes:end -->\n")
    assert plots.main(["--results", str(results), "--link"]) == 0
    text = results.read_text()
    for name in ("bench_fbank_cpu", "bench_train_tiny_cpu"):
        assert text.count(f"(charts/{name}.png)") == 1
        body = plots.read_sections(text)[name]
        assert png_size(dirs[0] / f"{name}.png") == expected_pixels(plots.series_for(body))
    assert "charts/notes" not in text
    assert plots.main(["--results", str(results), "--link"]) == 0 and results.read_text() == text  # idempotent
    with pytest.raises(SystemExit):
        plots.main(["--results", str(results), "bench_missing"])
    assert "no section" in capsys.readouterr().err


def test_results_md_links_existing_charts_of_its_tables():
    """Every chart RESULTS.md shows exists and is a PNG of its section's tables."""
    text = (BENCH / "RESULTS.md").read_text()
    linked = [name for name, body in plots.read_sections(text).items() if f"(charts/{name}.png)" in body]
    assert linked, "RESULTS.md shows no benchmark chart"
    for name in linked:
        body = plots.read_sections(text)[name]
        assert png_size(BENCH / "charts" / f"{name}.png") == expected_pixels(plots.series_for(body)), name


def test_bench_fbank_plot_flag(dirs, capsys):
    bench_fbank.main(["--batch", "1", "--repeats", "1", "--no-write", "--plot"])
    out = capsys.readouterr().out
    png = dirs[1] / "bench_fbank_cpu.png"  # not published: RESULTS.md is not written
    assert f"chart written to {png}" in out and not dirs[0].exists()
    table = out[out.index("| threads |"):out.index("chart written")]
    assert png_size(png) == expected_pixels(plots.series_for(table))
    (s,) = plots.series_for(table)
    assert [label for label, _ in s.pairs()][-1].endswith("2 threads")


def test_bench_ops_plot_flag(dirs, capsys):
    assert bench_ops.main(["--ops", "masked_mse", "--quick", "--no-write", "--plot"]) == 0
    out = capsys.readouterr().out
    png = dirs[1] / "bench_ops_cpu.png"
    assert f"chart written to {png}" in out
    series = plots.series_for(out[out.index("### Every op"):])
    assert [s.pairs()[0][0] for s in series] == ["masked_mse: op auto -> cpp"] * len(series)
    assert png_size(png) == expected_pixels(series)
