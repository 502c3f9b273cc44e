"""End-to-end tests of the lean trainer (``train.py`` + ``sslam_fast.train.loop``) on the tiny preset, CPU only.

Every run is a subprocess (like a user's), on a small shared synthetic default set generated once per session.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--preset=tiny", "--warmup_updates=2", "--log_every=1", "--save_every_updates=3"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the trainer runs the default (auto) backends
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args, timeout=150, python_module=None):
    cmd = [sys.executable, *(["-m", python_module] if python_module else []), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if not r.get("summary")], [r for r in lines if r.get("summary")]


@pytest.fixture(scope="session")
def base(make_run_base) -> Path:
    """A folder whose ``default_data`` holds the synthetic set, so run dirs ``base/<name>`` share it."""
    return make_run_base("train")


@pytest.fixture(scope="session")
def six_steps(base) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted 6-step single-process run on the default set (reference for resume and loss tests)."""
    run_dir = base / "six"
    res = _run(["train.py", *SHORT, "--max_updates=6", f"--run_dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, res


def test_torchrun_two_processes(base):
    run_dir = base / "ddp"
    res = _run(["--standalone", "--nproc_per_node=2", "train.py", *SHORT, "--max_updates=6",
                f"--run_dir={run_dir}"], python_module="torch.distributed.run", timeout=170)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    steps, summary = _metrics(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["loss"] == pytest.approx(r["patch"] + r["mix_patch"] + r["cls"], rel=1e-5)
        assert r["clips_per_s"] > 0 and set(r["time"]) == {"data", "forward", "backward", "optimizer"}
    assert steps[0]["lr"] == 0.0 and steps[1]["lr"] == pytest.approx(5e-4)  # warmup 2 of lr 1e-3
    assert len(summary) == 1 and summary[0]["steps"] == 6 and summary[0]["world_size"] == 2
    for name in ("checkpoint_3.pt", "checkpoint_6.pt", "checkpoint_last.pt"):
        assert (run_dir / name).is_file(), name
    ck = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    st = ck["extra_state"]["sslam_fast_train"]
    assert st["step"] == 6 and len(st["rng"]) == 2 and st["world_size"] == 2
    assert st["position"] == {"epoch": 0, "batches_done": 6}  # 256 clips / 2 ranks / 8 = 16 batches an epoch
    assert "_ema" in ck["model"] and ck["optimizer_history"][-1]["num_updates"] == 6
    probe = [line for line in res.stdout.splitlines() if line.startswith("linear-probe mAP:")]
    assert len(probe) == 1 and "pretrained=0." in probe[0] and "random-init=0." in probe[0]


def test_loss_goes_down(six_steps):
    steps, _ = _metrics(six_steps[0])
    losses = [r["loss"] for r in steps]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 * 0.99, losses


def test_resume_is_exact(base, six_steps):
    ref, _ = _metrics(six_steps[0])
    run_dir = base / "resumed"
    first = _run(["train.py", *SHORT, "--max_updates=6", "--stop_after=3", f"--run_dir={run_dir}"])
    assert first.returncode == 0, first.stderr[-3000:]
    part, summary = _metrics(run_dir)
    assert [r["step"] for r in part] == [1, 2, 3] and summary[0]["stopped_early"] is True
    second = _run(["train.py", *SHORT, "--max_updates=6", "--resume", f"--run_dir={run_dir}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    got, summary = _metrics(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, ref):
        for key in ("loss", "patch", "cls", "lr", "ema_decay"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])  # bit-exact on CPU
    a = torch.load(run_dir / "checkpoint_6.pt", weights_only=True)["model"]
    b = torch.load(six_steps[0] / "checkpoint_6.pt", weights_only=True)["model"]
    for k in b["_ema"]:
        assert torch.equal(a["_ema"][k], b["_ema"][k]), k


def test_resume_flag_without_checkpoint(base):
    res = _run(["train.py", *SHORT, "--max_updates=6", "--resume", f"--run_dir={base / 'nothing_here'}"])
    assert res.returncode == 2 and "error:" in res.stderr and "no checkpoint" in res.stderr
    assert "Traceback" not in res.stderr


def _folder_with_bad_files(base: Path, name: str, n_good: int, n_bad: int) -> Path:
    folder = base / name
    folder.mkdir()
    src = sorted((base / "default_data" / "train").glob("*.wav"))[:n_good]
    for p in src:
        shutil.copy(p, folder / p.name)
    for i in range(n_bad):
        (folder / f"corrupt_{i}.wav").write_bytes(b"RIFF\x00\x01not really a wav file" * 7)
    return folder


def test_bad_files_are_skipped_and_counted(base):
    folder = _folder_with_bad_files(base, "some_bad", 27, 3)  # 30 files = 6 batches of 5 = one epoch
    run_dir = base / "bad_ok"
    res = _run(["train.py", *SHORT, "--max_updates=6", "--batch_size=5", "--max_bad_file_share=0.2",
                f"--data={folder}", f"--run_dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-3000:]
    steps, summary = _metrics(run_dir)
    assert len(steps) == 6 and summary[0]["bad_files"] == 3
    assert "linear-probe" not in res.stdout  # the probe runs on the default set only


def test_too_many_bad_files_stop_with_names(base):
    folder = _folder_with_bad_files(base, "many_bad", 20, 10)
    res = _run(["train.py", *SHORT, "--max_updates=6", "--batch_size=5", f"--data={folder}",
                f"--run_dir={base / 'bad_stop'}"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert "too many unreadable audio files" in res.stderr and "corrupt_" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus_key=1"], "unknown key 'bogus_key'"),
        (["--lr=-1"], "lr must be a positive"),
        (["--data=/nonexistent/manifest.tsv"], "no such manifest or folder"),
    ],
    ids=["unknown-key", "impossible-value", "data-nowhere"],
)
def test_bad_config_exits_2(base, args, message):
    run_dir = base / "cfg_err"
    res = _run(["train.py", *SHORT, "--max_updates=6", f"--run_dir={run_dir}", *args])
    assert res.returncode == 2
    assert res.stderr.startswith("error:") or "\nerror:" in res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not run_dir.exists()  # a run that fails its start-up checks leaves no (empty) folder behind


def test_manifest_pointing_nowhere(base, tmp_path):
    manifest = tmp_path / "m.tsv"
    manifest.write_text("/no/such/root\na.wav\t16000\n")
    res = _run(["train.py", *SHORT, "--max_updates=6", f"--data={manifest}", f"--run_dir={tmp_path / 'r'}"])
    assert res.returncode == 2 and "manifest points nowhere" in res.stderr and "Traceback" not in res.stderr


def test_sigterm_saves_and_exits_0(base):
    run_dir = base / "sigterm"
    proc = subprocess.Popen([sys.executable, "train.py", *SHORT, "--max_updates=5000", f"--run_dir={run_dir}"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    steps, summary = _metrics(run_dir)
    assert summary[0]["stopped_early"] is True and 2 <= summary[0]["steps"] < 5000
    ck = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert ck["extra_state"]["sslam_fast_train"]["step"] == summary[0]["steps"] == steps[-1]["step"]
    assert "linear-probe" not in out  # an interrupted run does not probe


def test_ema_follows_config():
    """The trainer's EMA uses cfg.ema_start / ema_end / ema_end_step (its schedule for PretrainingModel.ema_step)."""
    from sslam_fast.models import PretrainingModel
    from sslam_fast.train import load_config
    from sslam_fast.train.loop import _ema_step

    cfg = load_config(["--preset=tiny", "--ema_start=0.5", "--ema_end=0.9", "--ema_end_step=4"])
    model = PretrainingModel(cfg.model_config()).train()
    t0 = [p.clone() for p in model.teacher.parameters()]
    assert math.isnan(_ema_step(model, 0, cfg))  # nothing to average before the first update
    with torch.no_grad():
        for p in model.student.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert math.isnan(_ema_step(model, 2, cfg))  # the resume guard: 0 -> 2 skips (ALGORITHM §11.9)
    model.num_updates = 1
    d = _ema_step(model, 2, cfg)
    assert d == pytest.approx(0.7)
    for t, t_old, (name, s) in zip(model.teacher.parameters(), t0, model.student.named_parameters()):
        want = s.detach() if not s.requires_grad else 0.7 * t_old + 0.3 * s.detach()
        torch.testing.assert_close(t, want, msg=name)
    assert model.num_updates == 2 and math.isnan(_ema_step(model, 2, cfg))  # same count again: no update


@pytest.mark.cuda
@pytest.mark.parametrize("stage", ["eat", "sslam"])
def test_cuda_bf16_run(base, stage):
    """On a GPU: bf16 autocast run of the tiny model, finite decreasing losses, checkpoint written, probe line."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run_dir = base / f"cuda_{stage}"
    res = _run(["train.py", *SHORT, "--max_updates=30", "--log_every=5", f"--stage={stage}", "--batch_size=16",
                f"--run_dir={run_dir}"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps, summary = _metrics(run_dir)
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["loss"] < steps[0]["loss"]
    assert summary[0]["steps"] == 30 and (run_dir / "checkpoint_30.pt").is_file()
    assert "linear-probe mAP:" in res.stdout


def test_nonfinite_losses_are_skipped_then_stop(base, monkeypatch):
    """A NaN loss skips the update on the device (the fused AdamW's ``found_inf``: the parameters do not move), is
    counted, and ``max_nonfinite_in_row`` of them in a row stop with a clear error on the next log step."""
    from sslam_fast.checkpoint import load_checkpoint
    from sslam_fast.models import PretrainingModel
    from sslam_fast.train import TrainingError, load_config, train

    calls = {"n": 0}
    bad_calls = set()
    orig = PretrainingModel.losses

    def losses(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    monkeypatch.setattr(PretrainingModel, "losses", losses)
    bad_calls.update({2, 3})
    run_dir = base / "nan_skip"
    short = [a for a in SHORT if not a.startswith("--save_every_updates=")]
    cfg = load_config([*short, "--max_updates=4", "--save_every_updates=1", "--keep_checkpoints=0",
                       f"--run_dir={run_dir}"])
    summary = train(cfg)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 2 and calls["n"] == 4
    steps, _ = _metrics(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["nonfinite_steps"] for r in steps] == [0, 1, 1, 0]
    assert steps[1]["loss"] is None and steps[2]["loss"] is None  # no finite step in those intervals
    assert math.isfinite(steps[0]["loss"]) and math.isfinite(steps[3]["loss"])
    # the skipped updates changed nothing: the student after update 3 is the student after update 1
    maps = [load_checkpoint(run_dir / f"checkpoint_{n}.pt")[2]["encoder"] for n in (1, 2, 3)]
    for key in maps[0]:
        assert torch.equal(maps[0][key], maps[2][key]), key
    assert any(not torch.equal(maps[0][k], load_checkpoint(run_dir / "checkpoint_last.pt")[2]["encoder"][k])
               for k in maps[0])  # and update 4 trained again

    calls["n"] = 0
    bad_calls.clear()
    bad_calls.update(range(2, 100))
    cfg = load_config([*SHORT, "--max_updates=20", "--max_nonfinite_in_row=3", f"--run_dir={base / 'nan_stop'}"])
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        train(cfg)
    assert calls["n"] == 4


def test_compile_run_matches_eager(base):
    """``--compile=true``: the model's forward + losses under torch.compile (inductor on CPU) trains the same curve.

    Mask-token noise off in both runs: inductor draws random numbers with its own generator."""
    curves = []
    for name, extra in (("eager", []), ("compiled", ["--compile=true"])):
        run_dir = base / f"compile_{name}"
        res = _run(["train.py", *SHORT, "--max_updates=4", "--mask_noise_std=0", *extra, f"--run_dir={run_dir}"],
                   timeout=400)
        assert res.returncode == 0, res.stderr[-3000:]
        steps, summary = _metrics(run_dir)
        assert [r["step"] for r in steps] == [1, 2, 3, 4] and summary[0]["steps"] == 4
        curves.append(steps)
    ref, got = curves
    for key in ("loss", "patch", "cls"):  # step 1 is the same computation: fp32 rounding apart, equal
        assert got[0][key] == pytest.approx(ref[0][key], rel=1e-5), key
    # Later steps follow the same curve, not bit for bit: Adam divides each gradient by its own running RMS, so a
    # rounding-level change in a near-zero gradient element moves that weight by up to lr.
    for a, b in zip(got[1:], ref[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), a["step"]


def test_worker_features_match_the_step_and_are_deterministic(base):
    """``features_in_workers``: the loader's collate adds the same fbank the step computes, and masks that depend
    on the seed and the batch's items only."""
    from sslam_fast.data import AudioClipDataset, collate, make_default_dataset
    from sslam_fast.train import load_config
    from sslam_fast.train.inputs import WorkerFeatures
    from sslam_fast.train.inputs import features as _features

    cfg = load_config(["--preset=tiny", "--features_in_workers=true"])
    ds = AudioClipDataset(make_default_dataset(base / "default_data").train_manifest, cfg.clip_samples, seed=1)
    items = [ds[i] for i in (5, 3, 9)]
    a, b = WorkerFeatures(cfg)(items), WorkerFeatures(cfg)(list(items))
    assert a["fbank"].shape == (3, 1, cfg.target_length, 128) and a["masks"].shape == (3 * cfg.clones, 128)
    assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["fbank"], b["fbank"])
    torch.testing.assert_close(a["fbank"], _features(cfg, collate(items), torch.device("cpu")), rtol=0, atol=0)
    kept = (~a["masks"]).sum(1)
    assert bool((kept == kept[0]).all()) and 0 < int(kept[0]) < 128
    other = WorkerFeatures(cfg)([ds[i] for i in (5, 3, 10)])
    assert not torch.equal(other["masks"], a["masks"])
    assert WorkerFeatures(cfg)([None, None])["audio"].shape[0] == 0  # an all-bad batch passes through empty


def test_features_in_workers_run(base):
    run_dir = base / "in_workers"
    res = _run(["train.py", *SHORT, "--max_updates=4", "--features_in_workers=true", "--num_workers=1",
                f"--run_dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-3000:]
    steps, summary = _metrics(run_dir)
    assert summary[0]["steps"] == 4 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)


def test_two_ranks_count_bad_files_together_and_skip_all_bad_batches(base):
    """batch_size 1: every bad file is a batch of only unreadable files, skipped on its rank; the count in the summary
    and the checkpoint is the sum over both ranks, and each rank's data position is saved."""
    from sslam_fast.data import AudioClipDataset, ResumableSampler

    folder = _folder_with_bad_files(base, "ddp_bad", 27, 3)
    run_dir = base / "ddp_bad_run"
    res = _run(["--standalone", "--nproc_per_node=2", "train.py", *SHORT, "--max_updates=8", "--batch_size=1",
                "--max_bad_file_share=0.5", f"--data={folder}", f"--run_dir={run_dir}"],
               python_module="torch.distributed.run", timeout=170)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    st = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["extra_state"]["sslam_fast_train"]
    ds = AudioClipDataset(str(folder), 256 * 160)
    expected_bad = 0
    for rank, pos in enumerate(st["positions"]):
        assert pos["epoch"] == 0
        order = ResumableSampler(len(ds), batch_size=1, seed=1, rank=rank, world_size=2).batches(0)
        used = [i for batch in order[: pos["batches_done"]] for i in batch]
        n_bad = sum("corrupt_" in str(ds.path(i)) for i in used)
        assert len(used) - n_bad == 8  # one good clip per update on each rank
        expected_bad += n_bad
    assert expected_bad > 0  # the seed puts bad files in the first batches: the skip path ran
    _, summary = _metrics(run_dir)
    assert summary[0]["bad_files"] == st["counters"]["bad_files"] == expected_bad
    assert f"{expected_bad} bad files" in res.stdout


def test_tensorboard_needs_its_package(base):
    run_dir = base / "tb"
    res = _run(["train.py", *SHORT, "--max_updates=2", "--tensorboard=true", f"--run_dir={run_dir}"])
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert res.returncode == 2 and "pip install tensorboard" in res.stderr and "Traceback" not in res.stderr
        assert not (run_dir / "metrics.jsonl").exists()
        return
    assert res.returncode == 0, res.stderr[-3000:]
    assert any((run_dir / "tensorboard").iterdir())
