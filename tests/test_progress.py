"""sslam_fast._progress: a bar on a terminal, nothing (no carriage return) in a redirected log; and the inference tools
(extract, predict, evaluate) run with a log-like and with a terminal-like stderr."""

import io
import math
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from sslam_fast import evaluate as ev
from sslam_fast import extract, predict
from sslam_fast._progress import is_terminal, progress, progress_bar, write
from sslam_fast.checkpoint import save_finetuned_checkpoint, save_pretraining_checkpoint
from sslam_fast.models import AudioClassifier, ModelConfig, PretrainingModel


class FakeTTY(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def test_is_terminal():
    assert is_terminal(FakeTTY())
    assert not is_terminal(io.StringIO())
    assert not is_terminal(Closed())
    assert not is_terminal(object())


def test_progress_off_terminal_is_the_iterable_itself():
    log = io.StringIO()
    items = [1, 2, 3]
    assert progress(items, desc="files", unit="file", file=log) is items
    assert log.getvalue() == ""


def test_progress_off_terminal_summary_is_one_line_without_carriage_return():
    log = io.StringIO()
    got = list(progress(iter(range(5)), total=5, desc="extract", unit="file", summary=True, file=log))
    assert got == list(range(5))
    text = log.getvalue()
    assert "\r" not in text
    assert text.count("\n") == 1 and text.startswith("extract: 5 file in ")


def test_progress_on_terminal_draws_a_bar():
    tty = FakeTTY()
    got = list(progress(range(4), desc="extract", unit="file", file=tty))
    assert got == list(range(4))
    text = tty.getvalue()
    assert "\r" in text and "extract" in text and "4/4" in text and "file" in text


def test_progress_bar_off_terminal_is_silent():
    log = io.StringIO()
    bar = progress_bar(10, initial=3, desc="train", file=log)
    bar.update(2)
    bar.set_postfix({"loss": "0.1"}, refresh=False)
    bar.set_postfix(lr="1e-4")
    bar.close()
    with progress_bar(None, file=log) as b:
        b.update()
    assert log.getvalue() == ""


def test_progress_bar_on_terminal_resumes_at_initial():
    tty = FakeTTY()
    bar = progress_bar(10, initial=3, desc="train", unit="step", file=tty)
    bar.update(2)
    bar.set_postfix({"loss": "0.1234"})
    bar.close()
    text = tty.getvalue()
    assert "\r" in text and "train" in text
    assert "5/10" in text and "loss=0.1234" in text


@pytest.mark.parametrize("call", [lambda: progress([], total=-1), lambda: progress_bar(-1),
                                  lambda: progress_bar(5, initial=-2)])
def test_negative_counts_raise(call):
    with pytest.raises(ValueError, match="must be >= 0"):
        call()


def test_write_goes_above_an_open_bar():
    tty = FakeTTY()
    bar = progress_bar(3, desc="files", file=tty)
    write("skipped x.wav: broken", file=tty)
    bar.update(1)
    bar.close()
    lines = tty.getvalue().replace("\r", "\n").split("\n")
    assert "skipped x.wav: broken" in lines  # a line of its own, not glued to the bar
    log = io.StringIO()
    write("plain", file=log)
    assert log.getvalue() == "plain\n"


# --- the tools --------------------------------------------------------------------------------------------------------

NUM_CLASSES = 3
MIDS = [f"/m/p{i}" for i in range(NUM_CLASSES)]
CLIPS = ("a.wav", "b.wav", "sub/c.wav")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    audio = root / "audio"
    for i, name in enumerate(CLIPS):
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(16000) / 16000
        sf.write(audio / name, (0.3 * np.sin(2 * math.pi * 300 * (i + 1) * t)).astype(np.float32), 16000)
    (audio / "broken.wav").write_bytes(b"RIFF not a wave")
    torch.manual_seed(0)
    save_pretraining_checkpoint(root / "pre.pt", PretrainingModel(ModelConfig.tiny()))
    save_finetuned_checkpoint(root / "ft.pt", AudioClassifier(ModelConfig.tiny(), num_classes=NUM_CLASSES))
    labels = root / "labels.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f"{i},{m},c{i}\n" for i, m in enumerate(MIDS)))
    manifest = root / "eval.tsv"
    manifest.write_text(f"{audio}\n" + "".join(f"{n}\t16000\t{MIDS[i]}\n" for i, n in enumerate(CLIPS))
                        + "broken.wav\t1\t/m/p0\n")
    return {"root": root, "audio": audio, "labels": labels, "manifest": manifest}


def _run(tool, s, tmp_path):
    if tool == "extract":
        return extract.main(["--checkpoint", str(s["root"] / "pre.pt"), "--audio", str(s["audio"]),
                             "--out", str(tmp_path / "feats"), "--target-length", "auto"])
    if tool == "predict":
        return predict.main(["--checkpoint", str(s["root"] / "ft.pt"), "--audio", str(s["audio"]),
                             "--target-length", "auto", "--top-k", "2"])
    return ev.main(["--checkpoint", str(s["root"] / "ft.pt"), "--manifest", str(s["manifest"]),
                    "--labels", str(s["labels"]), "--target-length", "auto"])


TOOLS = ("extract", "predict", "evaluate")
UNITS = {"extract": "file", "predict": "file", "evaluate": "clip"}


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_in_a_log_writes_no_carriage_return(tool, setup, tmp_path, capsys):
    assert _run(tool, setup, tmp_path) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "\r" not in out
    assert "skipped" in err and "broken.wav" in err
    assert f"{tool}:" not in err  # no bar, no bar description


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_in_a_terminal_draws_a_bar(tool, setup, tmp_path, monkeypatch, capsys):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert _run(tool, setup, tmp_path) == 0
    err = tty.getvalue()
    assert "\r" in err and f"{tool}:" in err and "4/4 [" in err and UNITS[tool] in err
    lines = err.replace("\r", "\n").split("\n")
    skips = [line for line in lines if "broken.wav" in line]
    assert skips and all(line.startswith("skipped ") and f"{tool}:" not in line for line in skips)  # own line
    out = capsys.readouterr().out
    assert "\r" not in out
    if tool == "predict":
        assert sum(line.startswith("# ") for line in out.splitlines()) == 3


@pytest.mark.parametrize("tty", [False, True])
def test_trainer_progress_lines_in_a_log_bar_on_a_terminal(monkeypatch, tty):
    """The pretrainer's and fine-tuner's Progress: a line per log step and no carriage return off a terminal; a
    redrawn bar with the loss on one."""
    from sslam_fast.train.runtime import Progress

    err = FakeTTY() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    p = Progress(total=4, initial=0, enabled=True)
    rec = {"loss": 1.25, "lr": 1e-3, "clips_per_s": 12.0}
    for step in range(1, 5):
        p.update(step, rec if step % 2 == 0 else None)
    p.close()
    out = err.getvalue()
    if tty:
        assert "\r" in out and "loss=1.2500" in out and "4/4" in out
    else:
        assert "\r" not in out
        assert out.splitlines() == ["step 2: loss=1.2500 lr=1.00e-03 clips/s=12.0",
                                    "step 4: loss=1.2500 lr=1.00e-03 clips/s=12.0"]
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    q = Progress(total=4, initial=0, enabled=False)  # ranks other than 0
    q.update(2, rec)
    q.close()
    assert quiet.getvalue() == ""
