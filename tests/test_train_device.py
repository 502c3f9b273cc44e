"""The trainer on the device it is given: the device of each rank, the process group, no host syncs in the steady
state, a compiled stage-2 forward that compiles once, and the precision of the forward (bf16 autocast on a CPU too).

The sync test counts, with a ``TorchDispatchMode``, the ATen calls that read a tensor's value back to the host
(``aten._local_scalar_dense``: what ``.item()``, ``float(t)``, ``int(t)`` and ``bool(t)`` call, and the ops whose
output shape depends on values). On CPU these cost little, but each one is a full device sync on a GPU; the steps
between two log lines must have none. The CUDA variant runs the same steps under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SyncCounter, compiles_once

from sslam_fast.models import CNNDecoder, PretrainingModel
from sslam_fast.train import distributed, load_config, loop, train


def _cfg(base, name, *extra):
    args = {"preset": "tiny", "warmup_updates": 2, "log_every": 5, "max_updates": 8, "save_every_updates": 1000,
            "num_workers": 0, "run_dir": base / name}
    args.update(a[2:].split("=", 1) for a in extra)
    return load_config([f"--{k}={v}" for k, v in args.items()])


@pytest.fixture(scope="module")
def base(make_run_base):
    return make_run_base("train_device")


def _per_step_counts(monkeypatch, counter) -> list[tuple[int, int]]:
    """(step, syncs from the start of that update to the start of the next) for every update of a run."""
    marks = []
    orig = loop._Stepper.run

    def run(self, step, *args, **kwargs):
        marks.append((step, counter.n))
        return orig(self, step, *args, **kwargs)

    monkeypatch.setattr(loop._Stepper, "run", run)
    return marks


@pytest.mark.parametrize("stage", ["eat", "sslam"])
def test_steady_state_steps_read_nothing_back(base, monkeypatch, stage):
    """Updates 2-4 and 6-7 of an 8-update run (log lines after 5 and 8) read no value back: the first update runs
    the value checks, log steps read the statistics once."""
    monkeypatch.delenv("SSLAM_FAST_CHECK", raising=False)
    counter = SyncCounter()
    marks = _per_step_counts(monkeypatch, counter)
    with counter:
        train(_cfg(base, f"sync_{stage}", f"--stage={stage}"), stop_after=8)
    per_step = {s: n2 - n1 for (s, n1), (_, n2) in zip(marks, marks[1:])}
    assert per_step[0] > 0  # the first update checks the values of its inputs (proves the counter sees them)
    steady = {s: n for s, n in per_step.items() if s not in (0, 4)}  # update 5 (index 4) is followed by a log line
    assert steady and all(n == 0 for n in steady.values()), (steady, counter.ops)


def test_check_env_var_runs_value_checks_every_step(base, monkeypatch):
    """``SSLAM_FAST_CHECK=1`` turns the value checks on for every update (the debugging mode)."""
    monkeypatch.setenv("SSLAM_FAST_CHECK", "1")
    counter = SyncCounter()
    marks = _per_step_counts(monkeypatch, counter)
    with counter:
        train(_cfg(base, "sync_checked", "--max_updates=3", "--log_every=100"), stop_after=3)
    per_step = [n2 - n1 for (_, n1), (_, n2) in zip(marks, marks[1:])]
    assert len(per_step) == 2 and all(n > 0 for n in per_step)


def test_compiled_stage2_compiles_once_for_new_windows(base, monkeypatch):
    """``--compile=true`` at stage 2: the mix windows change every update and enter the compiled forward as a tensor,
    so 10 updates compile once (dynamo would raise on a recompile). The dynamo-level guards are what decide a
    recompile, so the test compiles with the ``aot_eager`` backend (forward and backward traced, no inductor code
    generation: minutes less on a small CPU)."""
    from torch._dynamo.utils import counters

    from sslam_fast import _backend

    _backend.reset_fallbacks()  # as in a fresh process: no kernel has run yet (its bookkeeping must not be guarded)

    windows = []
    orig_inputs = loop._Stepper._inputs

    def inputs(self, *args, **kwargs):
        out = orig_inputs(self, *args, **kwargs)
        windows.append(tuple(out[2].tolist()))
        return out

    monkeypatch.setattr(loop._Stepper, "_inputs", inputs)
    with compiles_once(monkeypatch, loop._Stepper) as graphs:
        train(_cfg(base, "compile_sslam", "--stage=sslam", "--compile=true", "--max_updates=10", "--log_every=10"))
    assert len(set(windows)) > 3  # the windows did change
    assert len(graphs) == 10 and graphs[0] >= 1 and graphs[-1] == graphs[0], graphs
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0


# --- device and process group -----------------------------------------------------------------------------------------


def test_select_device_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.select_device("auto", 3) == torch.device("cpu")
    assert distributed.select_device("cpu", 0) == torch.device("cpu")
    with pytest.raises(ValueError, match="device=cuda but no CUDA device is visible"):
        distributed.select_device("cuda", 0)
    with pytest.raises(ValueError, match="device must be"):
        distributed.select_device("gpu", 0)


def test_select_device_names_the_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.select_device("auto", 0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but only 1 GPU\(s\) are visible.*--nproc_per_node=1"):
        distributed.select_device("cuda", 1)
    assert distributed.select_device("cpu", 1) == torch.device("cpu")


def test_gpu_ranks_join_one_group_for_cpu_and_cuda_tensors(monkeypatch):
    """On GPUs the group is ``cpu:gloo,cuda:nccl`` (CPU bookkeeping over gloo, CUDA tensors over NCCL) and the rank
    takes ``cuda:LOCAL_RANK``; on CPUs it is gloo."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", d))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = distributed.setup("auto")
    assert env.device == torch.device("cuda", 1) and (env.rank, env.world, env.local_rank) == (5, 8, 1)
    assert seen["backend"] == "cpu:gloo,cuda:nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert seen["set_device"] == torch.device("cuda", 1)
    seen.clear()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    env = distributed.setup("cpu")
    assert env.device == torch.device("cpu") and seen == {"backend": "gloo"}


@pytest.mark.parametrize("stage", ["eat", "sslam"])
@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("auto", torch.float32)], ids=["bf16", "auto"])
def test_cpu_precision_sets_the_forward_dtype_and_trains(base, monkeypatch, stage, precision, dtype):
    """``--precision=bf16`` on a CPU runs the forward under CPU bf16 autocast (no grad scaler), as on CUDA: the
    decoder's predictions are bf16 and the fp32 parameters train to finite losses. ``auto`` on a CPU stays fp32."""
    states, preds = [], []
    orig_losses, orig_decoder = PretrainingModel.losses, CNNDecoder.forward

    def losses(self, *args, **kwargs):
        states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        out = orig_losses(self, *args, **kwargs)
        assert all(p.dtype == torch.float32 for p in self.parameters())  # autocast casts activations, not weights
        return out

    def decoder(self, *args, **kwargs):
        out = orig_decoder(self, *args, **kwargs)
        preds.append(out.dtype)
        return out

    monkeypatch.setattr(PretrainingModel, "losses", losses)
    monkeypatch.setattr(CNNDecoder, "forward", decoder)
    run_dir = base / f"precision_{precision}_{stage}"
    summary = train(_cfg(base, run_dir.name, f"--stage={stage}", f"--precision={precision}", "--device=cpu",
                         "--log_every=1"), stop_after=3)
    assert summary["steps"] == 3 and len(states) == len(preds) == 3
    if dtype == torch.bfloat16:
        assert states == [(True, torch.bfloat16)] * 3
    else:
        assert not any(enabled for enabled, _ in states)
    assert preds == [dtype] * 3
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses_seen = [r["loss"] for r in records if not r.get("summary")]
    assert len(losses_seen) == 3 and all(math.isfinite(v) and v > 0 for v in losses_seen)
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["final_loss"])


def test_train_refuses_cuda_without_a_gpu(base, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        train(_cfg(base, "no_gpu", "--device=cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("stage", ["eat", "sslam"])
def test_cuda_steady_state_steps_do_not_sync(base, monkeypatch, stage):
    """On a GPU: the updates between log lines run under ``set_sync_debug_mode("error")`` (any host sync raises)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("SSLAM_FAST_CHECK", raising=False)
    orig_run, orig_summary = loop._Stepper.run, loop.StepStats.summary

    def run(self, step, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error" if step not in (0, 5) else "default")
        try:
            return orig_run(self, step, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def summary(self, step):
        torch.cuda.set_sync_debug_mode("default")
        return orig_summary(self, step)

    monkeypatch.setattr(loop._Stepper, "run", run)
    monkeypatch.setattr(loop.StepStats, "summary", summary)
    try:
        out = train(_cfg(base, f"cuda_sync_{stage}", f"--stage={stage}", "--device=cuda", "--batch_size=4"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out["steps"] == 8 and out["skipped_steps"] == 0
