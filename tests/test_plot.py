"""``python -m sslam_fast.plot``: the plotted series are the run's ``metrics.jsonl`` (resumed, still written,
fine-tuned, several runs), the PNG is written at its figure size, bad folders are one ``error:`` line, and importing
the package does not import matplotlib."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sslam_fast import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG file; fails on anything else."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def pretrain_record(step: int, scale: float = 1.0) -> dict:
    """A record with the keys ``sslam_fast.train.stats.StepStats.summary`` writes."""
    return {"step": step, "patch": 10.0 / step * scale, "mix_patch": 0.0, "cls": 250.0 - step * scale,
            "loss": 260.0 - step * scale, "lr": 1e-5 * step, "ema_decay": 0.9998 + 1e-7 * step,
            "clips_per_s": 10.0 + step % 7, "nonfinite_steps": 0, "max_nonfinite_in_row": 0,
            "time": {"data": 0.1 * step, "forward": 1.0, "backward": 2.0, "optimizer": 0.5}}


def write_run(run_dir: Path, records: list, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (run_dir / plot.METRICS).write_text("".join(line + "\n" for line in lines) + tail)
    return run_dir


def lines_by_gid(fig) -> dict:
    return {line.get_gid(): line for ax in fig.axes for line in ax.lines if line.get_gid()}


def test_series_equal_metrics_jsonl(tmp_path):
    recs = [pretrain_record(s) for s in (10, 20, 30)]
    run = write_run(tmp_path / "run", [*recs, {"summary": True, "steps": 30, "clips_per_s": 12.0}])
    series = plot.load_series(run)
    for key in ("patch", "mix_patch", "cls", "loss", "lr", "ema_decay", "clips_per_s", "nonfinite_steps"):
        assert series[key] == ([10, 20, 30], [r[key] for r in recs]), key
    for phase in plot.TIME_PHASES:
        assert series[f"time.{phase}"] == ([10, 20, 30], [r["time"][phase] for r in recs])
    assert "steps" not in series and "summary" not in series  # the summary record is not a step

    fig = plot.curves_figure({"run": series})
    lines = lines_by_gid(fig)
    for key in ("patch", "cls", "loss", "lr", "ema_decay", "clips_per_s"):
        line = lines[f"run:{key}"]
        assert list(line.get_xdata()) == series[key][0]
        assert list(line.get_ydata()) == series[key][1]
    # stage 1 logs mix_patch = 0 throughout: no panel; no non-finite step: no panel
    assert "run:mix_patch" not in lines and "run:nonfinite_steps" not in lines
    shares = [lines[f"run:time%.{p}"].get_ydata() for p in plot.TIME_PHASES]
    for i, r in enumerate(recs):
        total = sum(r["time"].values())
        assert [s[i] for s in shares] == pytest.approx([100 * r["time"][p] / total for p in plot.TIME_PHASES])


def test_resumed_and_running_run_is_one_curve(tmp_path):
    # a killed run logged 10..30, the resumed one redid 20 and 30 with other values, and a run still being written
    # has half of its next line
    old = [pretrain_record(s) for s in (10, 20, 30)]
    new = [pretrain_record(s, scale=2.0) for s in (20, 30, 40)]
    run = write_run(tmp_path / "run", [*old, "not json", *new], tail='{"step": 50, "patch": 1.')
    series = plot.load_series(run)
    assert series["loss"] == ([10, 20, 30, 40], [old[0]["loss"]] + [r["loss"] for r in new])
    assert series["time.data"][0] == [10, 20, 30, 40]
    path = plot.plot_runs([run])
    assert path == run / "curves.png" and png_size(path)
    line = lines_by_gid(plot.curves_figure(plot.load_runs([run])))["run:loss"]
    assert list(line.get_xdata()) == [10, 20, 30, 40]


def test_finetune_run_plots_the_evaluation_metric(tmp_path):
    recs, evals = [], []
    for step in (5, 10, 15, 20):
        recs.append({"step": step, "loss": None if step == 15 else 1.0 / step, "lr": 1e-4, "clips_per_s": 50.0,
                     "nonfinite_steps": int(step == 15), "max_nonfinite_in_row": int(step == 15),
                     "time": {"data": 0.2}})
        if step % 10 == 0:
            evals.append({"step": step, "eval": {"mAP": 0.3 + step / 100}, "best": 0.5, "best_step": step,
                          "eval_clips": 64, "eval_bad_files": 0})
            recs.append(evals[-1])
    run = write_run(tmp_path / "ft", recs)
    series = plot.load_series(run)
    assert series["loss"] == ([5, 10, 20], [1 / 5, 1 / 10, 1 / 20])  # null: a gap
    assert series["eval.mAP"] == ([10, 20], [e["eval"]["mAP"] for e in evals])
    kinds = {title: (kind, names) for kind, title, names in plot.panels({"ft": series})}
    assert kinds["evaluation mAP"] == ("eval", ["eval.mAP"])
    assert kinds["data time (s per log interval)"] == ("line", ["time.data"])  # one phase: seconds, not a share
    assert kinds["non-finite steps per log interval"] == ("line", ["nonfinite_steps"])
    lines = lines_by_gid(plot.curves_figure({"ft": series}))
    assert list(lines["ft:eval.mAP"].get_ydata()) == series["eval.mAP"][1]
    assert list(lines["ft:loss"].get_xdata()) == [5, 10, 20]
    assert "ft:ema_decay" not in lines


def test_cli_writes_curves_png_of_the_figure_size(tmp_path, capsys):
    run = write_run(tmp_path / "run", [pretrain_record(s) for s in (10, 20)])
    out = tmp_path / "pictures"
    assert plot.main([str(run), "--out", str(out), "--dpi", "50"]) == 0
    assert f"wrote {out / 'curves.png'}" in capsys.readouterr().out
    # loss, patch, cls, lr, EMA decay, clips/s, time split: 7 panels, 4 a row, 2 rows of 4.0 x 2.6 inches
    assert png_size(out / "curves.png") == (4 * 4.0 * 50, 2 * 2.6 * 50)
    assert not list(out.glob(".*.tmp"))


def test_several_runs_are_overlaid_and_labelled(tmp_path):
    a = write_run(tmp_path / "a" / "run", [pretrain_record(s) for s in (10, 20)])
    b = write_run(tmp_path / "b" / "run", [pretrain_record(s, 3.0) for s in (10, 20, 30)])
    runs = plot.load_runs([a, b])
    assert list(runs) == ["a/run", "b/run"]  # the same name twice: the parent tells them apart
    lines = lines_by_gid(plot.curves_figure(runs))
    assert list(lines["a/run:loss"].get_xdata()) == [10, 20]
    assert list(lines["b/run:loss"].get_ydata()) == runs["b/run"]["loss"][1]
    assert lines["a/run:loss"].get_color() != lines["b/run:loss"].get_color()
    assert plot.plot_runs([a, b], tmp_path / "both") == tmp_path / "both" / "curves.png"


def test_folds_folder_stands_for_its_folds(tmp_path):
    for k in (1, 2):
        write_run(tmp_path / "esc" / f"fold{k}", [{"step": 10, "loss": 0.1 * k, "lr": 1e-4}])
    runs = plot.load_runs([tmp_path / "esc"])
    assert list(runs) == ["fold1", "fold2"]
    assert runs["fold2"]["loss"] == ([10], [0.2])


@pytest.mark.parametrize("case", ["missing", "file", "no_metrics", "no_records"])
def test_bad_folder_is_one_error_line(tmp_path, capsys, case):
    target = tmp_path / "x"
    if case == "file":
        target.write_text("")
    elif case == "no_metrics":
        target.mkdir()
    elif case == "no_records":
        write_run(target, [{"summary": True, "steps": 0}], tail='{"step": 1')
    assert plot.main([str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    expected = {"missing": "does not exist", "file": "is a file", "no_metrics": "has no metrics.jsonl",
                "no_records": "no step record yet"}[case]
    assert expected in err
    assert not (tmp_path / "x" / "curves.png").exists()


def test_plot_knows_the_trainer_keys():
    from sslam_fast.train import stats

    assert set(stats.TERMS) <= set(plot.LOSS_TERMS) == set(plot.LOSS_TITLES)
    assert tuple(stats._PHASES) == plot.TIME_PHASES


def test_package_import_does_not_import_matplotlib():
    code = textwrap.dedent(
        """
        import sys
        import sslam_fast, sslam_fast.ops, sslam_fast.models, sslam_fast.plot, sslam_fast.demo
        assert "matplotlib" not in sys.modules, "importing sslam_fast imported matplotlib"
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok"
