"""Smoke test of benchmarks/bench_train.py: a --quick tiny run on CPU prints the machine line, a row per variant with
finite positive figures, the fast-vs-plain loss agreement and the final speed-up / memory line; the same for the
fine-tuning step (``--task finetune``)."""

import contextlib
import importlib.util
import io
import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"^fast/reference: speedup=(\d+\.\d\d)x memory=(\d+\.\d\d)x$")
LABELS = {
    "a": "(a) plain (upstream-faithful)",
    "b": "(b) plain + torch.compile(losses)",
    "c": "(c) fast (sslam_fast)",
    "d": "(d) fast + torch.compile(losses)",
}
FT_LABELS = {
    "a": "(a) plain (upstream-faithful)",
    "b": "(b) plain + torch.compile(model)",
    "c": "(c) fast (sslam_fast)",
    "d": "(d) fast + torch.compile(model)",
}


def _run_main(argv: list[str]) -> list[str]:
    """bench_train.main(argv) run in this process (the CPU peak-memory subprocesses still start fresh); its stdout
    lines."""
    bench = sys.modules.get("bench_train")
    if bench is None:
        spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
        bench = importlib.util.module_from_spec(spec)
        sys.modules["bench_train"] = bench  # dataclasses resolve the module by name
        spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return buf.getvalue().strip().splitlines()


@pytest.fixture(scope="module")
def output() -> list[str]:
    return _run_main(["--preset", "tiny", "--stage", "sslam", "--batch", "2", "--steps", "2", "--warmup", "1",
                      "--threads", "1", "--quick"])


@pytest.fixture(scope="module")
def finetune_output() -> list[str]:
    return _run_main(["--task", "finetune", "--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1",
                      "--threads", "1", "--quick"])


def _row(lines: list[str], label: str) -> list[str]:
    rows = [ln for ln in lines if ln.startswith(f"| {label} |")]
    assert len(rows) == 1, (label, lines)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_machine_line_first(output):
    assert output[0].startswith("machine: ") and "torch " in output[0] and "commit " in output[0]


def test_every_variant_has_a_row(output):
    assert any(ln.startswith("### SSLAM stage 2 (sslam), preset tiny, batch 2") for ln in output)
    for key in ("b", "d"):
        assert _row(output, LABELS[key])[1] == "skipped (--quick)"
    for key in ("a", "c"):
        cells = _row(output, LABELS[key])
        ms, rate, speed, peak, peak_clip, loss = cells[1:7]
        nums = [float(ms), float(rate), float(speed.rstrip("x")), float(peak), float(peak_clip), float(loss)]
        assert all(math.isfinite(x) and x > 0 for x in nums), (key, cells)
        assert float(rate) == pytest.approx(2 / (float(ms) / 1e3), rel=1e-2)  # clips/s = batch / median
        assert float(peak_clip) == pytest.approx(float(peak) / 2, abs=0.03)  # MiB rounded to 0.1 and 0.01
    assert _row(output, LABELS["a"])[3] == "1.00x"


def test_loss_agreement(output):
    lines = [ln for ln in output if ln.startswith("loss agreement [sslam]")]
    assert len(lines) == 1
    terms = dict(re.findall(r"(\w+)=([0-9.e+-]+)", lines[0].split(":", 1)[1]))
    assert set(terms) == {"patch", "mix_patch", "cls", "sample_size", "loss", "max"}
    assert all(float(v) < 1e-5 for v in terms.values()), terms


def test_final_line(output):
    m = FINAL.match(output[-1])
    assert m, output[-1]
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    a, c = _row(output, LABELS["a"]), _row(output, LABELS["c"])
    assert float(m.group(1)) == pytest.approx(float(c[2]) / float(a[2]), abs=0.011)  # clips/s ratio (c) / (a)
    # peak memory ratio (c) / (a); the table rounds MiB to 0.1
    assert float(m.group(2)) == pytest.approx(float(c[4]) / float(a[4]), rel=0.03, abs=0.006)


def test_finetune_rows(finetune_output):
    out = finetune_output
    assert out[0].startswith("machine: ")
    assert any(ln.startswith("### Fine-tuning (tiny recipe), preset tiny, batch 2, 10 classes") for ln in out), out
    for key in ("b", "d"):
        assert _row(out, FT_LABELS[key])[1] == "skipped (--quick)"
    for key in ("a", "c"):
        cells = _row(out, FT_LABELS[key])
        nums = [float(cells[1]), float(cells[2]), float(cells[3].rstrip("x")), float(cells[4]), float(cells[6])]
        assert all(math.isfinite(x) and x > 0 for x in nums), (key, cells)
        assert float(cells[2]) == pytest.approx(2 / (float(cells[1]) / 1e3), rel=1e-2)
    # a classifier's first BCE loss from a fresh head is about log 2 on either path
    assert float(_row(out, FT_LABELS["a"])[6]) == pytest.approx(0.693, abs=0.1)


def test_finetune_loss_agreement(finetune_output):
    lines = [ln for ln in finetune_output if ln.startswith("loss agreement [finetune]")]
    assert len(lines) == 1, finetune_output
    terms = dict(re.findall(r"(\w+)=([0-9.e+-]+)", lines[0].split(":", 1)[1]))
    assert set(terms) == {"logits", "loss", "max"}
    assert all(float(v) < 1e-5 for v in terms.values()), terms
    assert float(terms["max"]) == max(float(terms["logits"]), float(terms["loss"]))


def test_finetune_final_line(finetune_output):
    m = FINAL.match(finetune_output[-1])
    assert m, finetune_output[-1]
    a, c = _row(finetune_output, FT_LABELS["a"]), _row(finetune_output, FT_LABELS["c"])
    assert float(m.group(1)) == pytest.approx(float(c[2]) / float(a[2]), abs=0.011)
    assert float(m.group(2)) == pytest.approx(float(c[4]) / float(a[4]), rel=0.03, abs=0.006)

