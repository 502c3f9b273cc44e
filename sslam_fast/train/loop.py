"""The lean SSLAM / EAT training loop (SPEC §4-§7): data -> features -> masks -> EMA -> losses -> AdamW, with DDP,
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
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from sslam_fast._checks import value_checks
from sslam_fast.train import distributed
from sslam_fast.train.config import TrainConfig
from sslam_fast.train.distributed import DistEnv
from sslam_fast.train.optim import build_optimizer, build_scheduler
from sslam_fast.train.state import GracefulExit, capture_rng_state, find_latest_checkpoint, restore_rng_state
from sslam_fast.train.stats import TERMS, StepStats

__all__ = ["TrainingError", "default_data_root", "train"]


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite losses in a row, a missing checkpoint for ``resume=True``)."""


def default_data_root(run_dir: str | os.PathLike) -> Path:
    """Where the built-in synthetic set lives for ``cfg.data == ""``: ``<run_dir>/../default_data``."""
    return Path(run_dir).absolute().parent / "default_data"


def _step_rng(seed: int, step: int, rank: int, micro: int) -> random.Random:
    """The host random numbers of one micro-step (the mask seed, the SSLAM windows) from (seed, step, rank,
    micro-step) alone, which is what makes resume exact. A ``random.Random``: drawing from it touches no tensor, so
    it never waits for the device."""
    return random.Random(((seed * 1_000_003 + step) * 1009 + rank) * 31 + micro)


class _Progress:
    """tqdm when installed (the numbers refresh on log steps, the only steps that read them), else a line every
    ``log_every`` steps."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled, self.bar = enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step: int, rec: dict | None) -> None:
        if not self.enabled:
            return
        post = None
        if rec is not None:
            loss = "n/a" if rec["loss"] is None else f"{rec['loss']:.4f}"
            post = {"loss": loss, "lr": f"{rec['lr']:.2e}", "clips/s": f"{rec['clips_per_s']:.1f}"}
        if self.bar is not None:
            self.bar.update(1)
            if post:
                self.bar.set_postfix(post, refresh=False)
        elif post:
            print(f"step {step}: " + " ".join(f"{k}={v}" for k, v in post.items()), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _build_data(cfg: TrainConfig, env: DistEnv):
    from sslam_fast.data import AudioClipDataset, make_default_dataset

    default_set = None
    if cfg.data == "":
        root = default_data_root(cfg.run_dir)
        if env.is_main:
            default_set = make_default_dataset(root)
        env.barrier()
        if not env.is_main:
            default_set = make_default_dataset(root)  # cached by now: only reads
        source = default_set.train_manifest
    else:
        source = cfg.data
    dataset = AudioClipDataset(source, cfg.clip_samples, sample_rate=cfg.sample_rate, seed=cfg.seed)
    return dataset, default_set


def _unwrap(m):
    return m.module if hasattr(m, "module") else m


def _ema_step(model, n: int, cfg: TrainConfig) -> float:
    """``model.ema_step(n)`` with the decay schedule of ``cfg``; returns the decay used (nan when the step was not
    due: before the first update, the resume guard, eval mode)."""
    from sslam_fast.ops import ema_decay

    schedule = (cfg.ema_start, cfg.ema_end, cfg.ema_end_step)
    due = model.ema_due(n)
    model.ema_step(n, fast=True, schedule=schedule)
    return ema_decay(n, *schedule) if due else float("nan")


def _save(path_dir: Path, cfg, model, optimizer, scheduler, step, position, counters, env: DistEnv) -> None:
    from sslam_fast.checkpoint import save_pretraining_checkpoint

    mine = (capture_rng_state(), {"epoch": int(position[0]), "batches_done": int(position[1])})
    if env.world > 1:
        gathered = [None] * env.world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
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
            numbered = sorted((int(p.stem.split("_")[1]), p) for p in path_dir.glob("checkpoint_*.pt")
                              if p.stem.split("_")[1].isdigit())
            for _, p in numbered[:-cfg.keep_checkpoints]:
                p.unlink(missing_ok=True)
    env.barrier()


def _load(path: Path, model, optimizer, scheduler, env: DistEnv) -> dict:
    from sslam_fast.checkpoint import load_checkpoint

    obj, _, maps = load_checkpoint(path)
    model.student.load_state_dict(maps["encoder"])
    model.decoder.load_state_dict(maps["decoder"])
    model.teacher.load_state_dict(maps["teacher"])
    optimizer.load_state_dict(obj["last_optimizer_state"])
    st = obj["extra_state"]["sslam_fast_train"]
    scheduler.load_state_dict(st["scheduler"])
    # the checkpoint of update n is written before the EMA step of n (done at the start of the next step): leave the
    # model one behind so the resumed run applies it, as the uninterrupted run does
    model.num_updates = max(int(st["step"]) - 1, 0)
    if len(st["rng"]) == env.world:
        restore_rng_state(st["rng"][env.rank])
        if len(st.get("positions", ())) == env.world:
            st["position"] = st["positions"][env.rank]
    return st


def _features(cfg, batch, device):
    """(B, 1, T, 128) normalised log-mels of a collated batch, computed on ``device`` (int16 scaled to [-1, 1])."""
    from sslam_fast.ops import eat_features

    # pinned by the loader on a GPU run, so neither copy waits; int16 PCM is scaled by 1 / 32768 inside eat_features
    audio = batch["audio"].to(device, non_blocking=True)
    lengths = batch["lengths"].to(device, non_blocking=True)
    return eat_features(audio, lengths, sample_rate=cfg.sample_rate, target_length=cfg.target_length,
                        norm_mean=cfg.norm_mean, norm_std=cfg.norm_std)


def _masks(cfg, batch_size: int, device, *, generator: torch.Generator | None = None,
           seed: int | None = None) -> torch.Tensor:
    from sslam_fast.ops import inverse_block_mask

    return inverse_block_mask(batch_size, cfg.clones, grid=cfg.grid, mask_prob=cfg.mask_prob,
                              mask_length=cfg.mask_length, mask_prob_adjust=cfg.mask_prob_adjust,
                              generator=generator, seed=seed, device=device)


class WorkerFeatures:
    """The loader's ``collate_fn`` for ``features_in_workers=True``: collate, then fbank and masks on the CPU in the
    loader worker (where upstream computes them), added to the batch as ``fbank`` and ``masks``.

    The masks of a batch are seeded from ``cfg.seed`` and the batch's item indices in order, so they do not depend on
    which worker builds the batch, and a resumed run draws the same ones."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self, items: list) -> dict:
        from sslam_fast.data import collate

        batch = collate(items)
        B = batch["audio"].shape[0]
        if B == 0:
            return batch
        seed = zlib.crc32(batch["indices"].numpy().tobytes(), self.cfg.seed & 0xFFFFFFFF)
        with torch.no_grad():
            batch["fbank"] = _features(self.cfg, batch, torch.device("cpu"))
            batch["masks"] = _masks(self.cfg, B, torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
        return batch


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


class _Batches:
    """The loader's batches in the sampler's order, from a saved position on; a batch of only unreadable files is
    skipped (and its files counted as bad), like any unreadable file."""

    def __init__(self, cfg: TrainConfig, dataset, loader, sampler, epoch: int, done: int):
        self.cfg, self.dataset, self.loader, self.sampler = cfg, dataset, loader, sampler
        self.epoch, self.done = epoch, done
        self._it = self._iterate()

    def _iterate(self):
        while True:
            self.sampler.load_state_dict({"epoch": self.epoch, "batches_done": self.done})
            self.dataset.set_epoch(self.epoch)
            self.loader.generator.manual_seed(self.cfg.seed * 7919 + self.epoch)  # worker seeds: the epoch only
            expected = self.sampler.batches(self.epoch)
            for batch in self.loader:
                idx = expected[self.done]
                self.done += 1
                yield batch, idx
            self.epoch, self.done = self.epoch + 1, 0

    def next(self, bad: list[str]) -> tuple[dict, int]:
        """The next batch with a readable file and its count of readable files; unreadable ones go to ``bad``."""
        n_good, skipped = 0, 0
        while True:
            batch, idx = next(self._it)
            got = set(batch["indices"].tolist())  # a CPU tensor of the collated batch: no device involved
            bad += [str(self.dataset.path(i)) for i in idx if i not in got]
            n_good += len(got)
            if got:
                return batch, n_good
            skipped += len(idx)
            if skipped >= 20 * self.cfg.batch_size:
                raise TrainingError(f"no readable file in {skipped} items in a row: {', '.join(bad[-5:])}")


class _Stepper:
    """One update: EMA, the micro-steps' forward and backward, the gradient norm and AdamW, with nothing read back
    from the device. A non-finite gradient (on any rank: DDP averages the gradients first, so every rank sees the
    same norm) skips the update on the device through the fused AdamW's ``found_inf``: parameters, moments and
    Adam's step count stay as they were, and :class:`StepStats` counts the step."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, model, ddp, optimizer, scheduler):
        from sslam_fast.reference.masks import mask_counts

        self.cfg, self.env, self.model, self.ddp = cfg, env, model, ddp
        self.forward = torch.compile(ddp) if cfg.compile else ddp
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fused = bool(optimizer.defaults.get("fused"))
        self.autocast = env.cuda and cfg.precision in ("auto", "bf16")
        self.num_kept = mask_counts(cfg.grid, cfg.mask_prob, cfg.mask_length, cfg.mask_prob_adjust)[1]
        self.last_terms: torch.Tensor | None = None

    def _inputs(self, batch: dict, step: int, micro: int):
        from sslam_fast.ops import sample_mix_windows
        from sslam_fast.ops.mix import windows_tensor

        cfg, device = self.cfg, self.env.device
        rng = _step_rng(cfg.seed, step, self.env.rank, micro)
        if "fbank" in batch:  # features_in_workers
            source = batch["fbank"].to(device, non_blocking=True)
            masks = batch["masks"].to(device, non_blocking=True)
        else:
            source = _features(cfg, batch, device)
            masks = _masks(cfg, batch["audio"].shape[0], device, seed=rng.randrange(2**63 - 1))
        windows = None
        if cfg.stage == "sslam":  # drawn on the host, handed over as a device tensor: never read back, never a
            # new constant for torch.compile
            s = sample_mix_windows(rng, num_frames=cfg.target_length, window_frames=cfg.mix_window_frames)
            windows = windows_tensor(s, cfg.mix_window_frames, cfg.target_length, device)
        return source, masks, windows

    def run(self, step: int, batches: _Batches, stats: StepStats, bad: list[str], check_values: bool) -> int:
        """Update ``step`` (0-based); returns the readable files it consumed (unreadable ones are added to ``bad``)."""
        cfg, clock = self.cfg, stats.clock
        torch.manual_seed(cfg.seed + step)  # SPEC §6: common.seed + num_updates every step
        stats.ema_decay = _ema_step(self.model, step, cfg)  # SPEC §4: EMA first, with the updates done
        self.optimizer.zero_grad(set_to_none=True)
        terms, n_good = None, 0
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch, got = batches.next(bad)
            n_good += got
            source, masks, windows = self._inputs(batch, step, micro)
            stats.data_s += time.perf_counter() - t0
            if check_values:  # eagerly, outside any compiled region: the checks read values
                self.model.check_values(source, masks, windows, self.num_kept)
            last = micro == cfg.grad_accum - 1
            sync = self.ddp.no_sync() if self.env.world > 1 and not last else contextlib.nullcontext()
            t1 = clock.mark()
            with sync:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
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
        return n_good


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or resume) pre-training as configured; returns the summary dict (also the last line of metrics.jsonl).

    ``resume=True`` requires a checkpoint in ``cfg.run_dir`` (one is used automatically anyway); ``stop_after=k``
    stops (saving a checkpoint) after k updates of this invocation, as a SIGTERM would.

    The steady-state step reads nothing back from the device: value checks of the inputs run on the first step of
    the invocation only (``SSLAM_FAST_CHECK=1``: on every step), and the losses, non-finite steps and the time split
    are read on log steps (``log_every``). A run of ``max_nonfinite_in_row`` non-finite steps is therefore noticed on
    the next log step; the skipped updates changed nothing in the model."""
    from sslam_fast.data import BadFileMonitor, ResumableSampler, collate
    from sslam_fast.models import PretrainingModel

    _check_tensorboard(cfg)
    env = distributed.setup(cfg.device)
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dataset, default_set = _build_data(cfg, env)
    sampler = ResumableSampler(len(dataset), batch_size=cfg.batch_size, seed=cfg.seed, rank=env.rank,
                               world_size=env.world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=WorkerFeatures(cfg) if cfg.features_in_workers else collate,
                                         num_workers=cfg.num_workers, pin_memory=env.cuda,
                                         generator=torch.Generator())  # not the global RNG: exact resume

    torch.manual_seed(cfg.seed)
    model = PretrainingModel(cfg.model_config()).to(env.device)
    if cfg.init_checkpoint:
        from sslam_fast.checkpoint import load_checkpoint

        _, _, maps = load_checkpoint(cfg.init_checkpoint)
        model.student.load_state_dict(maps["encoder"])
        model.teacher.load_state_dict(maps["teacher"])
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)

    step, epoch, done = 0, 0, 0
    counters = {"skipped_steps": 0, "bad_files": 0, "good_files": 0, "clips": 0}
    ckpt = find_latest_checkpoint(run_dir)
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint in {run_dir}")
    if ckpt is not None:
        st = _load(ckpt, model, optimizer, scheduler, env)
        step, epoch, done = st["step"], st["position"]["epoch"], st["position"]["batches_done"]
        counters.update(st.get("counters", {}))
        if env.is_main:
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr, flush=True)

    ddp = model
    if env.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.cuda else None,
                                                        find_unused_parameters=False)
    stepper = _Stepper(cfg, env, model, ddp, optimizer, scheduler)
    batches = _Batches(cfg, dataset, loader, sampler, epoch, done)
    monitor = BadFileMonitor(cfg.max_bad_file_share)
    monitor.n_ok, monitor.n_bad = counters["good_files"], counters["bad_files"]  # a resumed run keeps its counts
    board = _TensorBoard(cfg, env.is_main and cfg.tensorboard)
    progress = _Progress(cfg.max_updates, step, env.is_main)
    stats = StepStats(env)
    t_run, first_step = time.perf_counter(), step

    def log(rec: dict) -> None:
        counters["skipped_steps"] += rec["nonfinite_steps"]
        if env.is_main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            board.write(rec)
        if rec["max_nonfinite_in_row"] >= cfg.max_nonfinite_in_row:
            raise TrainingError(f"{rec['max_nonfinite_in_row']} non-finite losses in a row by step {rec['step']}; "
                                f"stopping (the skipped updates left the model unchanged)")

    with GracefulExit() as stop:
        while step < cfg.max_updates:
            bad: list[str] = []
            with value_checks(step == first_step):
                n_good = stepper.run(step, batches, stats, bad, check_values=step == first_step)
            step += 1
            # host bookkeeping, summed over ranks on the CPU (gloo): every rank sees the same totals and stops alike
            flags = torch.tensor([float(stop.requested), float(n_good), float(len(bad))], dtype=torch.float64)
            stopping, n_good, n_bad = (int(v) for v in env.all_reduce_(flags).tolist())
            counters["good_files"] += n_good
            counters["bad_files"] += n_bad
            monitor.update(n_good, n_bad, bad)
            rec = None
            if step % cfg.log_every == 0 or step == cfg.max_updates:
                rec = stats.summary(step)
                stats.reset()
                log(rec)
            progress.update(step, rec)
            if step % cfg.save_every_updates == 0 and step < cfg.max_updates:
                _save(run_dir, cfg, model, optimizer, scheduler, step, (batches.epoch, batches.done), counters, env)
            if stopping or (stop_after is not None and step - first_step >= stop_after):
                break
        stopped_early = step < cfg.max_updates
    if stats.steps:  # the interval since the last log line (a stop between log steps)
        log(stats.summary(step))
    progress.close()
    board.close()
    counters["clips"] += stats.clips_seen
    _save(run_dir, cfg, model, optimizer, scheduler, step, (batches.epoch, batches.done), counters, env)
    elapsed = time.perf_counter() - t_run
    last_loss = float(stepper.last_terms[3]) if stepper.last_terms is not None else float("nan")
    summary = {"summary": True, "steps": step, "clips_per_s": stats.clips_seen / max(elapsed, 1e-9),
               "final_loss": last_loss, "bad_files": counters["bad_files"],
               "skipped_steps": counters["skipped_steps"], "stopped_early": stopped_early, "world_size": env.world}
    if env.is_main:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
        print(f"done: {step} steps, {summary['clips_per_s']:.1f} clips/s per device, final loss {last_loss:.4f}, "
              f"{counters['bad_files']} bad files, {counters['skipped_steps']} skipped steps", flush=True)
        if default_set is not None and not stopped_early:
            from sslam_fast.train.probe import linear_probe

            res = linear_probe(model.student, default_set, cfg, device=env.device)
            summary["probe"] = res
            print(f"linear-probe mAP: pretrained={res['pretrained']:.3f} random-init={res['random_init']:.3f}",
                  flush=True)
    env.barrier()
    return summary
