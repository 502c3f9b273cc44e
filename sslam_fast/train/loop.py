"""The lean SSLAM / EAT training loop (ALGORITHM §4-§7): data -> features -> masks -> EMA -> losses -> AdamW, with DDP,
gradient accumulation, metrics, atomic fairseq-layout checkpoints and exact resume.

Upstream: ``[F] fairseq_cli/train.py`` and ``trainer.py`` (``train_step``: ``set_num_updates`` of the model, i.e. the
EMA step, happens at the start of a step with the number of updates done; grad clipping; ``lr_step_update``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from sslam_fast._checks import value_checks
from sslam_fast.train import distributed
from sslam_fast.train.config import TrainConfig
from sslam_fast.train.distributed import DistEnv
from sslam_fast.train.inputs import build_data, default_data_root, make_batches
from sslam_fast.train.inputs import features as batch_features
from sslam_fast.train.inputs import masks as batch_masks
from sslam_fast.train.optim import build_optimizer, build_scheduler
from sslam_fast.train.runtime import (
    BAD_EXAMPLES,
    NoReadableFile,
    Progress,
    TrainingError,
    agree_before_update,
    gather,
    on_main,
    open_run_dir,
    prepare_run,
    remove_if_empty,
    settle_bad_files,
)
from sslam_fast.train.state import GracefulExit, capture_rng_state, find_latest_checkpoint, restore_rng_state
from sslam_fast.train.stats import TERMS, StepStats

__all__ = ["TrainingError", "default_data_root", "train"]


def _step_rng(seed: int, step: int, rank: int, micro: int) -> random.Random:
    """The host random numbers of one micro-step (the mask seed, the SSLAM windows) from (seed, step, rank,
    micro-step) alone, which is what makes resume exact. A ``random.Random``: drawing from it touches no tensor, so
    it never waits for the device."""
    return random.Random(((seed * 1_000_003 + step) * 1009 + rank) * 31 + micro)


def _unwrap(m):
    return m.module if hasattr(m, "module") else m


def _ema_step(model, n: int, cfg: TrainConfig) -> float:
    """``model.ema_step(n)`` with the decay schedule of ``cfg``; returns the decay used (nan when the step was not
    due: before the first update, the resume guard, eval mode)."""
    from sslam_fast.ops import ema_decay

    schedule = (cfg.ema_start, cfg.ema_end, cfg.ema_end_step)
    due = model.ema_due(n)
    model.ema_step(n, schedule=schedule)
    return ema_decay(n, *schedule) if due else float("nan")


def _save(path_dir: Path, cfg, model, optimizer, scheduler, step, position, counters, env: DistEnv) -> None:
    from sslam_fast.checkpoint import save_pretraining_checkpoint

    gathered = gather(env, (capture_rng_state(), position))
    states, positions = [g[0] for g in gathered], [g[1] for g in gathered]
    if env.is_main:
        extra = {
            "sslam_fast_train": {
                "step": int(step),
                "position": positions[0],
                "positions": positions,  # per rank: a rank that skipped an all-bad batch is one batch ahead
                "rng": states,
                "scheduler": scheduler.state_dict(),
                "config": cfg.to_dict(),
                "counters": dict(counters),
                "world_size": int(env.world),
            }
        }
        for name in (f"checkpoint_{step}.pt", "checkpoint_last.pt"):
            save_pretraining_checkpoint(path_dir / name, model, optimizer, num_updates=step, extra_state=extra)
        if cfg.keep_checkpoints > 0:
            # only files up to this step count: one past it is from before a resume that fell back past it (a damaged
            # file, kept for inspection until this run's save of that step replaces it); ranking it as the newest
            # would delete the good checkpoints just written
            numbered = sorted((int(p.stem.split("_")[1]), p) for p in path_dir.glob("checkpoint_*.pt")
                              if p.stem.split("_")[1].isdigit() and int(p.stem.split("_")[1]) <= step)
            for _, p in numbered[:-cfg.keep_checkpoints]:
                p.unlink(missing_ok=True)
    env.barrier()


def _load(path: os.PathLike, model, optimizer, scheduler, env: DistEnv) -> dict:
    from sslam_fast.checkpoint import CheckpointError, load_module_state, map_state_dict, read_checkpoint_file
    from sslam_fast.train.state import config_change, trainer_state

    # find_latest_checkpoint(load=True) hands over the file it has read and checksum-verified (a LoadedCheckpoint);
    # a plain path is read here. Whatever does not fit is a one-line CheckpointError naming the file (train.py prints
    # "error: ..." and exits 2), never a KeyError or load_state_dict's multi-line RuntimeError.
    obj = getattr(path, "obj", None)
    path = Path(getattr(path, "path", path))
    if obj is None:
        obj = read_checkpoint_file(path)
    st = trainer_state(obj, path)  # an upstream or fine-tuned file in the run folder: says what it is
    try:
        maps = map_state_dict(obj, "fairseq_pretrain")
        load_module_state(model.student, maps["encoder"], "student")
        load_module_state(model.decoder, maps["decoder"], "decoder")
        load_module_state(model.teacher, maps["teacher"], "_ema teacher")
    except CheckpointError as e:  # e.g. resumed with another --embed_dim / --depth: name the settings that changed
        raise CheckpointError(f"{path}: {e}{config_change(st, model.cfg)}") from None
    try:
        optimizer.load_state_dict(obj["last_optimizer_state"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run's optimizer "
                              f"({' '.join(str(e).split())})") from None
    scheduler.load_state_dict(st["scheduler"])
    # the checkpoint of update n is written before the EMA step of n (done at the start of the next step): leave the
    # model one behind so the resumed run applies it, as the uninterrupted run does
    model.num_updates = max(int(st["step"]) - 1, 0)
    if len(st["rng"]) == env.world:
        restore_rng_state(st["rng"][env.rank])
        if len(st.get("positions", ())) == env.world:
            st["position"] = st["positions"][env.rank]
    return st


class _TensorBoard:
    """TensorBoard scalars of each metrics record (rank 0, ``cfg.tensorboard``); a no-op otherwise."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"))

    def write(self, rec: dict) -> None:
        if self.writer is None:
            return
        for key in ("loss", "patch", "mix_patch", "cls", "lr", "ema_decay", "clips_per_s", "nonfinite_steps"):
            if rec.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", rec[key], rec["step"])
        for key, value in rec["time"].items():
            self.writer.add_scalar(f"time/{key}", value, rec["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_tensorboard(cfg: TrainConfig) -> None:
    if not cfg.tensorboard:
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        from sslam_fast.train.config import ConfigError

        raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard") from e



class _Stepper:
    """One update: EMA, the micro-steps' forward and backward, the gradient norm and AdamW, with nothing read back
    from the device. A non-finite gradient (on any rank: DDP averages the gradients first, so every rank sees the
    same norm) skips the update on the device through the fused AdamW's ``found_inf``: parameters, moments and
    Adam's step count stay as they were, and :class:`StepStats` counts the step."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, model, ddp, optimizer, scheduler):
        from sslam_fast.reference.inverse_block_mask import mask_counts

        self.cfg, self.env, self.model, self.ddp = cfg, env, model, ddp
        self.forward = torch.compile(ddp) if cfg.compile else ddp
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fused = bool(optimizer.defaults.get("fused"))
        # bf16 autocast: "auto" on CUDA, "bf16" on CUDA and CPU alike; no grad scaler (bf16 has fp32's exponent range)
        self.autocast = cfg.precision == "bf16" or (env.cuda and cfg.precision == "auto")
        self.autocast_device = env.device.type
        self.num_kept = mask_counts(cfg.grid, cfg.mask_prob, cfg.mask_length, cfg.mask_prob_adjust)[1]
        self.last_terms: torch.Tensor | None = None

    def _inputs(self, batch: dict, step: int, micro: int):
        from sslam_fast.models.pretraining import mix_windows_tensor
        from sslam_fast.ops import sample_mix_windows

        cfg, device = self.cfg, self.env.device
        rng = _step_rng(cfg.seed, step, self.env.rank, micro)
        if "fbank" in batch:  # features_in_workers
            source = batch["fbank"].to(device, non_blocking=True)
            masks = batch["masks"].to(device, non_blocking=True)
        else:
            source = batch_features(cfg, batch, device)
            masks = batch_masks(cfg, batch["audio"].shape[0], device, seed=rng.randrange(2**63 - 1))
        windows = None
        if cfg.stage == "sslam":  # drawn on the host, handed over as a device tensor: never read back, never a
            # new constant for torch.compile
            s = sample_mix_windows(rng, num_frames=cfg.target_length, window_frames=cfg.mix_window_frames)
            windows = mix_windows_tensor(s, device)
        return source, masks, windows

    def fetch(self, batches, bad: list[str]) -> tuple[list[dict] | None, int, str | None]:
        """The micro-batches of the next update, before it starts: ``(batches, readable files, None)``, or ``(None,
        readable files, message)`` when the loader gave no readable file for too long. Unreadable files go to ``bad``.

        Fetched ahead of the update so that the ranks can agree on stopping before any of them starts one: a rank
        that stopped inside it would leave the others waiting in DDP's gradient all-reduce."""
        out, n_good = [], 0
        for _ in range(self.cfg.grad_accum):
            try:
                batch, got = batches.next(bad)
            except NoReadableFile as e:
                return None, n_good, str(e)
            out.append(batch)
            n_good += got
        return out, n_good, None

    def run(self, step: int, micro_batches: list[dict], stats: StepStats, check_values: bool) -> None:
        """Update ``step`` (0-based) on the micro-batches of :meth:`fetch`."""
        cfg, clock = self.cfg, stats.clock
        torch.manual_seed(cfg.seed + step)  # ALGORITHM §6: common.seed + num_updates every step
        stats.ema_decay = _ema_step(self.model, step, cfg)  # ALGORITHM §4: EMA first, with the updates done
        self.optimizer.zero_grad(set_to_none=True)
        terms = None
        for micro, batch in enumerate(micro_batches):
            t0 = time.perf_counter()
            source, masks, windows = self._inputs(batch, step, micro)
            stats.data_s += time.perf_counter() - t0
            if check_values:  # eagerly, outside any compiled region: the checks read values
                self.model.check_values(source, masks, windows, self.num_kept)
            last = micro == cfg.grad_accum - 1
            sync = self.ddp.no_sync() if self.env.world > 1 and not last else contextlib.nullcontext()
            t1 = clock.mark()
            with sync:
                with torch.autocast(self.autocast_device, dtype=torch.bfloat16, enabled=self.autocast):
                    out = self.forward(source, masks, windows, self.num_kept)
                t2 = clock.mark()
                (out["loss"] / cfg.grad_accum).backward()
            t3 = clock.mark()
            stats.marks += [("forward", t1, t2), ("backward", t2, t3)]
            S = out["sample_size"]
            micro_terms = torch.stack([*(out[k].detach() / S for k in TERMS[:3]), out["loss"].detach()])
            terms = micro_terms / cfg.grad_accum if terms is None else terms + micro_terms / cfg.grad_accum
            stats.add_clips(batch["audio"].shape[0])
        t3 = clock.mark()
        if cfg.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        finite = torch.isfinite(norm)
        stats.lr = self.optimizer.param_groups[0]["lr"]
        if self.fused:
            self.optimizer.found_inf = (~finite).to(torch.float32)
            self.optimizer.step()
        elif bool(finite):  # a non-fused optimizer has no device-side skip: one host read
            self.optimizer.step()
        self.scheduler.step()
        stats.marks.append(("optimizer", t3, clock.mark()))
        stats.add_step(terms, finite)
        self.last_terms = terms


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or resume) pre-training as configured; returns the summary dict (also the last line of metrics.jsonl).

    ``resume=True`` requires a checkpoint in ``cfg.run_dir`` (one is used automatically anyway); ``stop_after=k``
    stops (saving a checkpoint) after k updates of this invocation, as a SIGTERM would.

    The steady-state step reads nothing back from the device: value checks of the inputs run on the first step of
    the invocation only (``SSLAM_FAST_CHECK=1``: on every step), and the losses, non-finite steps and the time split
    are read on log steps (``log_every``). A run of ``max_nonfinite_in_row`` non-finite steps is therefore noticed on
    the next log step; the skipped updates changed nothing in the model.

    Stops are agreed by all ranks before an update, in the step's one host-side all-reduce: SIGTERM / SIGINT,
    ``stop_after``, too many unreadable files (``DataError``) and a loader that gives no readable file for
    ``20 * batch_size`` items in a row (``DataError``) all save a checkpoint of the updates made first (the data
    errors then raise). ``metrics.jsonl`` is trimmed on resume to the steps the checkpoint covers, so that a resumed
    run's log reads as one run; the unreadable files are listed in ``bad_files.txt``. Nothing is written, and
    ``run_dir`` is not created, until every start-up check has passed."""
    from sslam_fast.data import BadFileMonitor
    from sslam_fast.models import PretrainingModel

    _check_tensorboard(cfg)
    env = distributed.setup(cfg.device)
    run_dir = Path(cfg.run_dir)
    # run_dir checked, not created yet: a run that fails a start-up check leaves no folder
    prepare_run(env, run_dir, default_data_root(cfg.run_dir) if cfg.data == "" else None)
    dataset, default_set = build_data(cfg, env)

    torch.manual_seed(cfg.seed)
    model = PretrainingModel(cfg.model_config()).to(env.device)
    if cfg.init_checkpoint:
        from sslam_fast.checkpoint import CheckpointError, load_checkpoint, load_module_state

        # stage 2 starts from a pre-training file's student and _ema teacher; any other file, or another model size,
        # is a one-line CheckpointError naming the file (not KeyError 'encoder' / 'teacher' or a multi-line
        # load_state_dict RuntimeError)
        _, fmt, maps = load_checkpoint(cfg.init_checkpoint)
        if fmt != "fairseq_pretrain":
            what = ("a fine-tuned classifier checkpoint" if "classifier" in maps
                    else "an HF safetensors port of the encoder alone (no decoder, no _ema teacher)")
            raise CheckpointError(f"{cfg.init_checkpoint}: this is {what}, --init_checkpoint needs a pretraining "
                                  "checkpoint (student, decoder and _ema teacher, as EAT's pre-training writes it)")
        try:
            load_module_state(model.student, maps["encoder"], "student")
            load_module_state(model.teacher, maps["teacher"], "_ema teacher")
        except CheckpointError as e:
            raise CheckpointError(f"{cfg.init_checkpoint}: {e} (set --embed_dim, --depth, --num_heads, ... to the "
                                  "checkpoint's model size)") from None
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)

    step, saved = 0, None
    counters = {"skipped_steps": 0, "bad_files": 0, "good_files": 0, "clips": 0}
    ckpt = find_latest_checkpoint(run_dir, load=True, remove_temp=env.is_main, verbose=env.is_main)
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint in {run_dir}")
    if ckpt is not None:
        st = _load(ckpt, model, optimizer, scheduler, env)
        step, saved = st["step"], st
        counters.update(st.get("counters", {}))
        if env.is_main:
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr, flush=True)

    ddp = model
    if env.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.cuda else None,
                                                        find_unused_parameters=False)
    stepper = _Stepper(cfg, env, model, ddp, optimizer, scheduler)
    batches = make_batches(cfg, env, dataset, saved)
    monitor = BadFileMonitor(cfg.max_bad_file_share)
    monitor.n_ok, monitor.n_bad = counters["good_files"], counters["bad_files"]  # a resumed run keeps its counts
    created = on_main(env, lambda: open_run_dir(run_dir, step))  # every start-up check passed: now the folder
    board = _TensorBoard(cfg, env.is_main and cfg.tensorboard)
    progress = Progress(cfg.max_updates, step, env.is_main)
    stats = StepStats(env)
    t_run, first_step = time.perf_counter(), step
    position = batches.position()  # the data position after the updates done (what a checkpoint saves)
    bad_seen: dict[str, None] = {}  # this rank's unreadable files, in order, each once: named at the end
    stop_reason, failure, no_data = None, None, None

    def log(rec: dict) -> None:
        counters["skipped_steps"] += rec["nonfinite_steps"]
        if env.is_main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            board.write(rec)
        if rec["max_nonfinite_in_row"] >= cfg.max_nonfinite_in_row:
            raise TrainingError(f"{rec['max_nonfinite_in_row']} non-finite losses in a row by step {rec['step']}; "
                                f"stopping (the skipped updates left the model unchanged)")

    try:
        with GracefulExit() as stop:
            while step < cfg.max_updates:
                bad: list[str] = []
                t0 = time.perf_counter()
                micro_batches, n_good, no_data = stepper.fetch(batches, bad)
                stats.data_s += time.perf_counter() - t0
                bad_seen.update(dict.fromkeys(bad))
                # every rank agrees on going on before the update (the position saved on a stop is before it)
                failure, stop_reason = agree_before_update(env, stop, n_good, len(bad), no_data is not None, monitor,
                                                           counters)
                if failure or stop_reason:
                    break
                with value_checks(step == first_step):
                    stepper.run(step, micro_batches, stats, check_values=step == first_step)
                step += 1
                position = batches.position()
                rec = None
                if step % cfg.log_every == 0 or step == cfg.max_updates:
                    rec = stats.summary(step)
                    stats.reset()
                    log(rec)
                progress.update(step, rec)
                if step % cfg.save_every_updates == 0 and step < cfg.max_updates:
                    _save(run_dir, cfg, model, optimizer, scheduler, step, position, counters, env)
                if stop_after is not None and step - first_step >= stop_after:
                    stop_reason = f"--stop_after={stop_after}"
                    break
        if stats.steps:  # the interval since the last log line (a stop between log steps)
            log(stats.summary(step))
    except BaseException:
        if env.is_main and created:
            remove_if_empty(run_dir)
        raise
    finally:
        progress.close()
        board.close()
    stopped_early = step < cfg.max_updates
    # A failure with no update since the start (or the resume) has nothing new to save; anything else saves, as a
    # SIGTERM does: a stop for bad data keeps the updates made, to resume from once the data is fixed.
    saved = failure is None or step > first_step
    if saved:
        _save(run_dir, cfg, model, optimizer, scheduler, step, position, counters, env)
    note = f"; saved checkpoint_{step}.pt: fix the data, then resume with the same command" if saved and step else ""
    bad_names = settle_bad_files(env, run_dir, bad_seen, no_data, failure, monitor, note, created)
    elapsed = time.perf_counter() - t_run
    last_loss = float(stepper.last_terms[3]) if stepper.last_terms is not None else float("nan")
    summary = {"summary": True, "steps": step, "clips_per_s": stats.clips_seen / max(elapsed, 1e-9),
               "final_loss": last_loss, "clips": counters["clips"], "bad_files": counters["bad_files"],
               "skipped_steps": counters["skipped_steps"], "stopped_early": stopped_early,
               "stop_reason": stop_reason, "world_size": env.world}
    if env.is_main:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
        head = (f"stopped early at step {step} of {cfg.max_updates} ({stop_reason}); resume with the same command;"
                if stopped_early else f"{step} steps,")
        bad_note = ""
        if counters["bad_files"] and bad_names:
            shown = ", ".join(bad_names[:BAD_EXAMPLES]) + (", ..." if len(bad_names) > BAD_EXAMPLES else "")
            bad_note = f" ({shown}; all in {run_dir / 'bad_files.txt'})"
        print(f"done: {head} {summary['clips_per_s']:.1f} clips/s per device, final loss {last_loss:.4f}, "
              f"{counters['bad_files']} bad files{bad_note}, {counters['skipped_steps']} skipped steps", flush=True)
        if default_set is not None and not stopped_early:
            from sslam_fast.train.probe import linear_probe

            res = linear_probe(model.student, default_set, cfg, device=env.device)
            summary["probe"] = res
            print(f"linear-probe mAP: pretrained={res['pretrained']:.3f} random-init={res['random_init']:.3f}",
                  flush=True)
    env.barrier()
    return summary
