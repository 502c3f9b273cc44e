"""End-to-end tests of the fine-tuner (``finetune.py`` + ``sslam_fast.finetune.loop``) on the tiny preset, CPU only.

Most runs are in-process (``finetune(cfg)``); the command line, torchrun and the evaluation tool run as a user runs
them. The pretrained checkpoint is a freshly initialised tiny ``PretrainingModel`` saved in fairseq's layout: what
is tested is the machinery (checkpoints, resume, frozen encoder, bad files, host syncs), not the numbers.

The sync test counts, with a ``TorchDispatchMode``, the ATen calls that read a tensor's value back to the host (see
``tests/test_train_device.py``): the updates between two log lines must have none.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SyncCounter, compiles_once

from sslam_fast.finetune import loop
from sslam_fast.finetune.config import load_finetune_config
from sslam_fast.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--preset=tiny", "--warmup_updates=2", "--log_every=2", "--num_workers=0"]



@pytest.fixture(scope="module")
def base(make_run_base) -> Path:
    """A folder whose ``default_data`` holds the built-in set, so run dirs ``base/<name>`` share it."""
    return make_run_base("finetune")


@pytest.fixture(scope="module")
def pretrained(base) -> Path:
    """A tiny pre-training checkpoint (fairseq layout) of a freshly initialised model."""
    from sslam_fast.checkpoint import save_pretraining_checkpoint
    from sslam_fast.models import ModelConfig, PretrainingModel

    torch.manual_seed(3)
    return save_pretraining_checkpoint(base / "pretrained.pt", PretrainingModel(ModelConfig.tiny()))


def _cfg(run_dir, *extra):
    """The tiny preset with SMALL's settings, then ``extra`` (``--key=value``; a key given again replaces SMALL's)."""
    args = dict(a.split("=", 1) for a in [*SMALL, f"--run_dir={run_dir}", *extra])
    return load_finetune_config([f"{k}={v}" for k, v in args.items()])


def _records(run_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return ([r for r in lines if "loss" in r and not r.get("summary")], [r for r in lines if "eval" in r],
            [r for r in lines if r.get("summary")])


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def six(base, pretrained):
    """An uninterrupted 6-update fine-tuning run from the pretrained checkpoint (evaluations after 3 and 6)."""
    run_dir = base / "six"
    res = loop.finetune(_cfg(run_dir, f"--init_checkpoint={pretrained}", "--max_updates=6", "--eval_every=3",
                             "--save_every=3"))
    return run_dir, res


def test_run_writes_metrics_and_checkpoints_that_load_and_evaluate(six, base, capsys):
    import sslam_fast
    from sslam_fast import evaluate
    from sslam_fast.checkpoint import detect_format
    from sslam_fast.data import make_default_dataset
    from sslam_fast.models import AudioClassifier

    run_dir, res = six
    steps, evals, summary = _records(run_dir)
    assert [r["step"] for r in steps] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    assert len(summary) == 1 and summary[0]["steps"] == 6 and summary[0]["metric"] == "mAP"
    assert res["best"] == max(e["eval"]["mAP"] for e in evals) and 0 < res["final"] <= 1
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        assert detect_format(run_dir / name) == "fairseq_finetune"
        model = sslam_fast.load_pretrained(run_dir / name)
        assert isinstance(model, AudioClassifier) and model.head.out_features == 10
    ck = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert ck["cfg"]["model"]["_name"] == "mae_image_classification" and ck["cfg"]["model"]["mixup"] == 0.8
    assert ck["optimizer_history"][-1]["num_updates"] == 6 and "last_optimizer_state" in ck
    # python -m sslam_fast.evaluate scores checkpoint_best.pt on the held-out set as the run's evaluation did
    ds = make_default_dataset(base / "default_data")
    names = ds.class_names
    labels = base / "labels.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f"{i},{n},{n}\n" for i, n in enumerate(names)))
    heldout = ds.labels("heldout")
    lines = ds.heldout_manifest.read_text().splitlines()
    manifest = base / "heldout.tsv"
    manifest.write_text(lines[0] + "\n" + "".join(
        f"{line.split(chr(9))[0]}\t0\t{','.join(names[c] for c in row.nonzero().flatten().tolist())}\n"
        for line, row in zip(lines[1:], heldout)))
    capsys.readouterr()
    rc = evaluate.main(["--checkpoint", str(run_dir / "checkpoint_best.pt"), "--manifest", str(manifest),
                        "--labels", str(labels), "--target-length", "256"])
    out = capsys.readouterr().out
    assert rc == 0, out
    got = float(out.split("mAP ")[1].split()[0])
    best_step = res["best_step"]
    assert got == pytest.approx(next(e["eval"]["mAP"] for e in evals if e["step"] == best_step), abs=1e-4)


def test_resume_after_stop_is_exact(six, base, pretrained):
    ref_dir, _ = six
    run_dir = base / "resumed"
    args = (f"--init_checkpoint={pretrained}", "--max_updates=6", "--eval_every=3", "--save_every=3")
    first = loop.finetune(_cfg(run_dir, *args), stop_after=2)
    assert first["stopped_early"] and first["steps"] == 2
    with pytest.raises(loop.TrainingError, match="no checkpoint"):
        loop.finetune(_cfg(base / "nothing_here", *args), resume=True)
    loop.finetune(_cfg(run_dir, *args), resume=True)
    a = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    b = torch.load(ref_dir / "checkpoint_last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    got, ref = _records(run_dir), _records(ref_dir)
    assert [r["loss"] for r in got[0]] == [r["loss"] for r in ref[0]]  # bit-exact on CPU
    assert [r["eval"] for r in got[1]] == [r["eval"] for r in ref[1]]


def test_linear_true_leaves_the_encoder_bit_identical(base, pretrained):
    import sslam_fast

    run_dir = base / "linear"
    res = loop.finetune(_cfg(run_dir, f"--init_checkpoint={pretrained}", "--linear=true", "--max_updates=4",
                             "--eval_every=4"))
    assert res["linear"] == "true" and res["steps"] == 4
    before = sslam_fast.load_pretrained(pretrained).state_dict()
    after = sslam_fast.load_pretrained(run_dir / "checkpoint_last.pt")
    for k, v in after.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(after.fc_norm.weight, torch.ones_like(after.fc_norm.weight))  # the head did learn
    st = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["last_optimizer_state"]
    assert sum(len(g["params"]) for g in st["param_groups"]) == 4  # fc_norm and head: weight and bias each
    steps, _, _ = _records(run_dir)
    # linear_lr 1e-3 without warm-up: the log after update 2 names the lr of update 1 (0-based) on the cosine
    assert steps[0]["lr"] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_linear_cached_trains_the_head_on_extracted_features(base, pretrained, capsys):
    import sslam_fast

    run_dir = base / "cached"
    res = loop.finetune(_cfg(run_dir, f"--init_checkpoint={pretrained}", "--linear=cached", "--max_updates=30",
                             "--eval_every=10"))
    assert res["linear"] == "cached" and res["metric"] == "mAP" and 0 < res["best"] <= 1
    assert res["clips"] == 256 and res["extract_s"] > 0
    _, evals, summary = _records(run_dir)
    assert [e["step"] for e in evals] == [10, 20, 30] and len(summary) == 1
    model = sslam_fast.load_pretrained(run_dir / "checkpoint_best.pt")
    before = sslam_fast.load_pretrained(pretrained).state_dict()
    assert all(torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())
    assert "linear evaluation on cached features" in capsys.readouterr().out


def _class_folder(base: Path, name: str, per_class: int, bad: int = 0, folds: bool = False) -> Path:
    """``base/name/<a|b>/*.wav`` from the built-in clips (single-label), with ``bad`` corrupt files in ``a``; with
    ``folds``, ESC-50 style names ``{fold}-...`` over folds 1..5."""
    src = sorted((base / "default_data" / "train").glob("*.wav"))
    root = base / name
    k = 0
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            stem = f"{i % 5 + 1}-{k}-A-{label}" if folds else f"{k:03d}"
            shutil.copy(src[k], root / label / f"{stem}.wav")
            k += 1
    for i in range(bad):
        (root / "a" / f"corrupt_{i}.wav").write_bytes(b"RIFF\x00\x01not really a wav file" * 7)
    return root


def test_bad_file_is_skipped_and_counted_single_label(base):
    """24 files (one corrupt), batch 4: 6 updates are one epoch, so the corrupt file is met exactly once; its batch
    has 3 readable clips, and mixup (which needs an even batch) runs on 2 of them."""
    train = _class_folder(base, "single", 12)
    (train / "a" / "000.wav").unlink()
    (train / "a" / "corrupt_0.wav").write_bytes(b"RIFF\x00\x01not really a wav file" * 7)
    valid = _class_folder(base, "single_valid", 4)
    run_dir = base / "bad"
    res = loop.finetune(_cfg(run_dir, f"--data={train}", f"--valid_data={valid}", "--multilabel=false",
                             "--batch_size=4", "--max_updates=6", "--eval_every=6", "--max_bad_file_share=0.3"))
    assert res["steps"] == 6 and res["bad_files"] == 1 and res["metric"] == "accuracy"
    assert (run_dir / "bad_files.txt").read_text().strip().endswith("corrupt_0.wav")
    assert 0 <= res["final"] <= 1


def test_bad_config_value_is_one_error_line(base, capsys):
    sys.path.insert(0, str(ROOT))
    try:
        import finetune as cli
    finally:
        sys.path.remove(str(ROOT))
    run_dir = base / "cfg_err"
    for args, message in ((["--lr=-1"], "lr must be a positive"), (["--bogus=1"], "unknown key 'bogus'"),
                          (["--num_classes=5"], "num_classes=5"), (["--stop_after=x"], "--stop_after")):
        assert cli.main([*SMALL, f"--run_dir={run_dir}", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err, (args, err)
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="valid_data"):
        loop.finetune(_cfg(run_dir, f"--data={base / 'default_data'}", "--multilabel=false"))


def test_steady_state_updates_read_nothing_back(base, pretrained, monkeypatch):
    """Updates 2-4 and 6-7 of an 8-update run (log lines after 5 and 8, one evaluation after 8) read no value back,
    with every augmentation on (roll, noise, mixup, SpecAugment, label smoothing)."""
    monkeypatch.delenv("SSLAM_FAST_CHECK", raising=False)
    counter, marks = SyncCounter(), []
    orig = loop._Stepper.run

    def run(self, step, *args, **kwargs):
        marks.append((step, counter.n))
        return orig(self, step, *args, **kwargs)

    monkeypatch.setattr(loop._Stepper, "run", run)
    cfg = _cfg(base / "sync", f"--init_checkpoint={pretrained}", "--max_updates=8", "--log_every=5",
               "--eval_every=100", "--save_every=100", "--noise_aug=true")
    with counter:
        loop.finetune(cfg)
    per_step = {s: n2 - n1 for (s, n1), (_, n2) in zip(marks, marks[1:])}
    assert per_step[0] > 0  # the first update checks its inputs' values (proves the counter sees them)
    steady = {s: n for s, n in per_step.items() if s not in (0, 4)}  # update 5 (index 4) is followed by a log line
    assert steady and all(n == 0 for n in steady.values()), (steady, counter.ops)


def test_tiny_comparison_prints_the_line(base, pretrained, capsys):
    out = loop.demonstration(_cfg(base / "demo", f"--init_checkpoint={pretrained}", "--max_updates=4",
                                  "--eval_every=4"))
    assert set(out) == {"finetuned", "linear", "random-init"}
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("fine-tune mAP: finetuned=0.") and " linear=0." in line and " random-init=0." in line
    assert out["linear"]["linear"] == "true" and (base / "demo" / "random_init" / "checkpoint_best.pt").is_file()


def test_five_folds_report_the_mean(base, capsys):
    root = _class_folder(base, "esc", 10, folds=True)  # 2 classes x 10 clips, 2 per class and fold
    res = loop.finetune(_cfg(base / "folds", f"--data={root}", "--folds=all", "--multilabel=false", "--mixup=0",
                             "--batch_size=4", "--max_updates=2", "--eval_every=2"))
    assert len(res["folds"]) == 5 and res["metric"] == "accuracy"
    assert res["mean"] == pytest.approx(sum(f["final"] for f in res["folds"]) / 5)
    assert all(f["clips"] == 8 for f in res["folds"])  # 16 training clips per fold, 2 updates of 4
    assert "accuracy over 5 folds" in capsys.readouterr().out


def test_torchrun_two_processes(base, pretrained):
    run_dir = base / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune.py",
           *SMALL, f"--run_dir={run_dir}", f"--init_checkpoint={pretrained}", "--compare=false", "--batch_size=8",
           "--max_updates=4", "--eval_every=2", "--save_every=2"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    steps, evals, summary = _records(run_dir)
    assert [r["step"] for r in steps] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    assert summary[0]["world_size"] == 2 and summary[0]["clips"] == 4 * 16
    assert evals[-1]["eval_clips"] == 128  # both ranks' halves of the held-out set
    st = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["extra_state"][loop.STATE_KEY]
    assert st["step"] == 4 and len(st["rng"]) == 2 and st["positions"] == [{"epoch": 0, "batches_done": 4}] * 2
    assert res.stdout.count("done:") == 1


@pytest.mark.cuda
@pytest.mark.parametrize("linear", ["false", "true"])
def test_cuda_steady_state_updates_do_not_sync(base, pretrained, monkeypatch, linear):
    """On a GPU: every update after the first runs under ``set_sync_debug_mode("error")`` (any host sync raises)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("SSLAM_FAST_CHECK", raising=False)
    orig = loop._Stepper.run

    def run(self, step, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            return orig(self, step, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loop._Stepper, "run", run)
    res = loop.finetune(_cfg(base / f"cuda_sync_{linear}", f"--init_checkpoint={pretrained}", "--device=cuda",
                             f"--linear={linear}", "--max_updates=6", "--log_every=3", "--eval_every=6",
                             "--noise_aug=true"))
    assert res["steps"] == 6 and math.isfinite(res["final_loss"]) and 0 < res["final"] <= 1


def test_compiled_classifier_compiles_once_and_trains_as_eager(base, pretrained, six, monkeypatch):
    """``--compile=true``: mixup's lambda, the SpecAugment masks and drop path's draws change every update and reach
    the compiled classifier inside tensors, so 6 updates compile once (dynamo raises on a recompile after the first
    update), and the run logs the losses of the eager run. The dynamo guards decide a recompile, so the test compiles
    with the ``aot_eager`` backend (no inductor code generation: minutes less on a small CPU)."""
    run_dir = base / "compiled"
    with compiles_once(monkeypatch, loop._Stepper) as graphs:
        loop.finetune(_cfg(run_dir, f"--init_checkpoint={pretrained}", "--max_updates=6", "--eval_every=3",
                           "--save_every=3", "--compile=true"))
    assert len(graphs) == 6 and graphs[0] >= 1 and graphs == [graphs[0]] * 6, graphs
    got, _, _ = _records(run_dir)
    ref, _, _ = _records(six[0])
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
