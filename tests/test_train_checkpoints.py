"""The trainer and checkpoints that are damaged, foreign or do not fit the run:

* a damaged newest checkpoint (truncated, or tensor bytes overwritten inside a valid archive) -> the run resumes from
  the newest one that loads, with one warning naming each bad file, which stays where it was;
* a checkpoint ``train.py`` did not write in the run folder, a changed model size on resume, a fine-tuned file given to
  ``--init_checkpoint`` -> one line ``error: ...`` naming the file and what differs (exit 2, no traceback);
* the temp file of a checkpoint write killed midway -> removed at the next start, never taken for a checkpoint.

Tiny preset on the built-in synthetic set (generated once for this module), CPU only. Most runs are in-process
(``train(cfg)``); the exit-code checks run ``train.py`` as a user would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslam_fast.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--preset=tiny", "--warmup_updates=2", "--log_every=1", "--save_every_updates=2", "--num_workers=0"]
TENSOR = "blocks.1.mlp.fc1.weight"  # a student tensor to damage: (256, 64) in the tiny model


def _cfg(run_dir: Path, *extra: str, max_updates: int = 6):
    from sslam_fast.train import load_config

    return load_config([*SHORT, f"--max_updates={max_updates}", f"--run_dir={run_dir}", *extra])


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the trainer runs the default (auto) backends
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=150)


def _steps(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in lines if not r.get("summary")}


@pytest.fixture(scope="module")
def base(make_run_base) -> Path:
    """A folder whose ``default_data`` holds the synthetic set, so run dirs ``base/<name>`` share it."""
    return make_run_base("train_ckpt")


@pytest.fixture(scope="module")
def four(base) -> Path:
    """A run of 6 updates stopped after 4: checkpoint_2.pt, checkpoint_4.pt and checkpoint_last.pt (update 4)."""
    from sslam_fast.train import train

    run_dir = base / "four"
    summary = train(_cfg(run_dir), stop_after=4)
    assert summary["steps"] == 4 and summary["stopped_early"]
    assert sorted(p.name for p in run_dir.glob("checkpoint_*.pt")) == [
        "checkpoint_2.pt", "checkpoint_4.pt", "checkpoint_last.pt"]
    return run_dir


def _copy(four: Path, base: Path, name: str) -> Path:
    """A copy of the 4-update run (mtimes kept: checkpoint_last.pt stays the newest file)."""
    dst = base / name
    shutil.copytree(four, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_tensor_bytes(path: Path) -> None:
    """Overwrite 16 bytes inside the student's TENSOR in ``path``: the archive stays valid and torch.load reads it
    without complaint (NaN weights), only the checksum can tell."""
    t = torch.load(path, map_location="cpu", weights_only=True)["model"][TENSOR]
    blob = t.numpy().tobytes()
    data = path.read_bytes()
    at = data.find(blob)
    assert at > 0 and data.find(blob, at + 1) == -1
    path.write_bytes(data[: at + 256] + b"\xff" * 16 + data[at + 272:])
    assert not torch.isfinite(torch.load(path, map_location="cpu", weights_only=True)["model"][TENSOR]).all()


def _damage(run_dir: Path, names: list[str], damage) -> None:
    for name in names:
        st = (run_dir / name).stat()
        damage(run_dir / name)
        os.utime(run_dir / name, ns=(st.st_atime_ns, st.st_mtime_ns))  # damage on disk leaves the mtime as it was


# ---------------------------------------------------------------------------------------------------------------------
# 1 + 2: damaged newest checkpoints -> fall back, with one warning per bad file, which is kept


@pytest.mark.parametrize(
    "damage,bad,resumed_from,step",
    [
        (_truncate, ["checkpoint_last.pt"], "checkpoint_4.pt", 4),
        (_truncate, ["checkpoint_last.pt", "checkpoint_4.pt"], "checkpoint_2.pt", 2),
        (_flip_tensor_bytes, ["checkpoint_last.pt", "checkpoint_4.pt"], "checkpoint_2.pt", 2),
    ],
    ids=["truncated-last", "truncated-newest-two", "tensor-bytes-flipped"],
)
def test_damaged_newest_checkpoint_falls_back(base, four, capsys, damage, bad, resumed_from, step):
    from sslam_fast.train import train

    run_dir = _copy(four, base, f"fallback_{damage.__name__}_{len(bad)}")
    _damage(run_dir, bad, damage)
    damaged = {name: (run_dir / name).read_bytes() for name in bad}
    capsys.readouterr()
    # keep_checkpoints=1: the fallback must not let a damaged checkpoint_4.pt count as the newest kept one
    summary = train(_cfg(run_dir, "--keep_checkpoints=1"), stop_after=1)
    err = capsys.readouterr().err
    assert f"resumed from {run_dir / resumed_from} at step {step}" in err, err
    assert summary["steps"] == step + 1
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(bad), warnings  # one per bad file, each naming it
    for name, line in zip(bad, warnings):
        assert str(run_dir / name) in line and f"resuming from {run_dir / resumed_from}" in line, line
        if damage is _flip_tensor_bytes:
            assert f"tensor model/{TENSOR} (256, 64) does not match the checksum" in line, line
        else:
            assert "corrupt or truncated checkpoint" in line, line
    # the bad files were kept (checkpoint_last.pt is rewritten by the resumed run's own save, as always)
    for name, data in damaged.items():
        if name != "checkpoint_last.pt":
            assert (run_dir / name).read_bytes() == data, name
    assert (run_dir / f"checkpoint_{step + 1}.pt").is_file()  # not pruned in favour of the damaged newer one
    # and the resumed update is the one the uninterrupted run made
    if step + 1 in _steps(four):
        assert _steps(run_dir)[step + 1]["loss"] == _steps(four)[step + 1]["loss"]


def test_no_checkpoint_loads(base, four):
    from sslam_fast.train import train

    run_dir = _copy(four, base, "all_damaged")
    _damage(run_dir, ["checkpoint_last.pt", "checkpoint_4.pt", "checkpoint_2.pt"], _truncate)
    with pytest.raises(CheckpointError, match=rf"no checkpoint in {run_dir} loads: .*checkpoint_last\.pt.*"
                                              r"checkpoint_4\.pt.*checkpoint_2\.pt.*start the run over") as e:
        train(_cfg(run_dir), stop_after=1)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# 3: foreign checkpoints, another model size, a fine-tuned --init_checkpoint -> one line naming the file


def test_foreign_checkpoint_in_run_dir_exits_2_with_one_line(base, four):
    run_dir = base / "foreign"
    run_dir.mkdir()
    # an upstream-style pre-training file (as fairseq writes them, e.g. SSLAM's released checkpoint_last.pt): the
    # same layout and weights, without the trainer's state and optimizer
    raw = torch.load(four / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    del raw["last_optimizer_state"]
    raw["extra_state"] = {"metrics": {}, "previous_training_time": 1.0}
    torch.save(raw, run_dir / "checkpoint_last.pt")
    res = _run_train_py(*SHORT, "--max_updates=6", f"--run_dir={run_dir}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert str(run_dir / "checkpoint_last.pt") in errors[0]
    assert "fairseq pre-training checkpoint" in errors[0]
    assert ("not written by sslam_fast's trainer: no sslam_fast_train state; move it out of the run folder or start a "
            "new --run_dir") in errors[0]
    assert (run_dir / "checkpoint_last.pt").is_file()  # left alone


def test_finetuned_checkpoint_in_run_dir(base):
    from sslam_fast.checkpoint import save_finetuned_checkpoint
    from sslam_fast.models import AudioClassifier, ModelConfig
    from sslam_fast.train import train

    run_dir = base / "finetuned_in_run_dir"
    save_finetuned_checkpoint(run_dir / "checkpoint_100.pt", AudioClassifier(ModelConfig.tiny(), num_classes=5))
    with pytest.raises(CheckpointError, match=r"checkpoint_100\.pt: a fine-tuned classifier checkpoint, not written "
                                              r"by sslam_fast's trainer: no sslam_fast_train state") as e:
        train(_cfg(run_dir), stop_after=1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "option,expect",
    [
        ("--embed_dim=32", [r"student does not fit the model: \d+ shape\(s\) differ: .*patch_embed\.weight "
                            r"\(64, 1, 16, 16\) in the file, \(32, 1, 16, 16\) in the model",
                            r"\(the run was started with embed_dim=64, this one has embed_dim=32\)"]),
        ("--depth=3", [r"student does not fit the model: 12 key\(s\) the model needs are missing: "
                       r"blocks\.2\.attn\.proj\.bias",
                       r"\(the run was started with depth=2, this one has depth=3\)"]),
    ],
    ids=["embed_dim", "depth"],
)
def test_changed_model_size_on_resume(base, four, option, expect):
    from sslam_fast.train import train

    run_dir = _copy(four, base, f"resize_{option[2:].split('=')[0]}")
    with pytest.raises(CheckpointError) as e:
        train(_cfg(run_dir, option), stop_after=1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(run_dir / "checkpoint_last.pt") + ": ")
    for pattern in expect:
        assert re.search(pattern, msg), (pattern, msg)


def test_changed_model_size_on_resume_exits_2(base, four):
    run_dir = _copy(four, base, "resize_cli")
    res = _run_train_py(*SHORT, "--max_updates=6", "--embed_dim=32", f"--run_dir={run_dir}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "(64, 1, 16, 16) in the file, (32, 1, 16, 16) in the model" in errors[0], errors


def test_init_checkpoint_must_be_a_fitting_pretraining_file(base, four, capsys):
    from sslam_fast.checkpoint import save_finetuned_checkpoint
    from sslam_fast.models import AudioClassifier, ModelConfig
    from sslam_fast.train import train

    ft = save_finetuned_checkpoint(base / "init_ft.pt", AudioClassifier(ModelConfig.tiny(), num_classes=5))
    with pytest.raises(CheckpointError, match=r"init_ft\.pt: this is a fine-tuned classifier checkpoint, "
                                              r"--init_checkpoint needs a pretraining checkpoint") as e:
        train(_cfg(base / "init_from_ft", f"--init_checkpoint={ft}"))
    assert "\n" not in str(e.value)
    init = four / "checkpoint_2.pt"
    with pytest.raises(CheckpointError, match=r"checkpoint_2\.pt: student does not fit the model: .*\(64, 1, 16, 16\) "
                                              r"in the file, \(32, 1, 16, 16\) in the model.*--embed_dim") as e:
        train(_cfg(base / "init_resized", f"--init_checkpoint={init}", "--embed_dim=32"))
    assert "\n" not in str(e.value)
    # a pre-training file of the right size starts the run (stage 2 from a stage-1 checkpoint)
    capsys.readouterr()
    summary = train(_cfg(base / "init_ok", f"--init_checkpoint={init}"), stop_after=1)
    assert summary["steps"] == 1


def test_finetuned_init_checkpoint_exits_2(base):
    from sslam_fast.checkpoint import save_finetuned_checkpoint
    from sslam_fast.models import AudioClassifier, ModelConfig

    ft = save_finetuned_checkpoint(base / "init_ft_cli.pt", AudioClassifier(ModelConfig.tiny(), num_classes=5))
    res = _run_train_py(*SHORT, "--max_updates=6", f"--init_checkpoint={ft}", f"--run_dir={base / 'init_ft_cli'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "this is a fine-tuned classifier checkpoint, --init_checkpoint needs a pretraining " \
                                "checkpoint" in errors[0], errors


# ---------------------------------------------------------------------------------------------------------------------
# 4: the temp file of a write killed midway


def test_temp_file_of_killed_write_is_removed_at_next_start(base, four, capsys):
    from sslam_fast.train import train

    run_dir = _copy(four, base, "killed_write")
    # a process killed inside atomic_torch_save (after it created its temp file, before it wrote a byte)
    code = ("import os, signal, sys; from sslam_fast.checkpoint import atomic_torch_save; "
            "atomic_torch_save(lambda: os.kill(os.getpid(), signal.SIGKILL), sys.argv[1])")
    res = subprocess.run([sys.executable, "-c", code, str(run_dir / "checkpoint_6.pt")], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -9, res.stderr[-2000:]
    stale = sorted(run_dir.glob(".checkpoint_6.pt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size == 0
    (run_dir / ".checkpoint_last.pt.x1y2z3_a.tmp").write_bytes(b"")  # one of checkpoint_last.pt's, too
    mine = run_dir / "notes.tmp"  # not a temp file of ours: left alone
    mine.write_text("keep me")
    capsys.readouterr()
    summary = train(_cfg(run_dir), stop_after=1)
    err = capsys.readouterr().err
    assert not list(run_dir.glob(".checkpoint_*.tmp")), sorted(p.name for p in run_dir.iterdir())
    assert mine.read_text() == "keep me"
    assert "removed 2 temp file(s) of interrupted checkpoint writes" in err, err
    assert f"resumed from {run_dir / 'checkpoint_last.pt'} at step 4" in err, err
    assert summary["steps"] == 5 and "warning:" not in err
    assert _steps(run_dir)[5]["step"] == 5
