"""The lean SSLAM / EAT training loop (SPEC §4-§7): data -> features -> masks -> EMA -> losses -> AdamW, with DDP,
gradient accumulation, metrics, atomic fairseq-layout checkpoints and exact resume.

Upstream: ``[F] fairseq_cli/train.py`` and ``trainer.py`` (``train_step``: ``set_num_updates`` of the model, i.e. the
EMA step, happens at the start of a step with the number of updates done; grad clipping; ``lr_step_update``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from sslam_fast.train.config import TrainConfig
from sslam_fast.train.optim import build_optimizer, build_scheduler
from sslam_fast.train.state import GracefulExit, capture_rng_state, find_latest_checkpoint, restore_rng_state

__all__ = ["TrainingError", "default_data_root", "train"]


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite losses in a row, a missing checkpoint for ``resume=True``)."""


def default_data_root(run_dir: str | os.PathLike) -> Path:
    """Where the built-in synthetic set lives for ``cfg.data == ""``: ``<run_dir>/../default_data``."""
    return Path(run_dir).absolute().parent / "default_data"


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, rank, micro-step): masks and mix windows of a step do not depend on
    anything but these numbers, which is what makes resume exact."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 31 + micro)


class _Progress:
    """tqdm when installed, else a line every ``log_every`` steps."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled, self.bar = enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step: int, post: dict, log: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(post, refresh=False)
        elif log:
            print(f"step {step}: " + " ".join(f"{k}={v}" for k, v in post.items()), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _build_data(cfg: TrainConfig, rank: int, world: int):
    from sslam_fast.data import AudioClipDataset, make_default_dataset

    default_set = None
    if cfg.data == "":
        root = default_data_root(cfg.run_dir)
        if rank == 0:
            default_set = make_default_dataset(root)
        _barrier(world)
        if rank != 0:
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


def _save(path_dir: Path, cfg, model, optimizer, scheduler, step, position, counters, rank, world) -> None:
    from sslam_fast.checkpoint import save_pretraining_checkpoint

    mine = (capture_rng_state(), {"epoch": int(position[0]), "batches_done": int(position[1])})
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    states, positions = [g[0] for g in gathered], [g[1] for g in gathered]
    if rank == 0:
        extra = {
            "sslam_fast_train": {
                "step": int(step),
                "position": positions[0],
                "positions": positions,  # per rank: a rank that skipped an all-bad batch is one batch ahead
                "rng": states,
                "scheduler": scheduler.state_dict(),
                "config": cfg.to_dict(),
                "counters": dict(counters),
                "world_size": int(world),
            }
        }
        for name in (f"checkpoint_{step}.pt", "checkpoint_last.pt"):
            save_pretraining_checkpoint(path_dir / name, model, optimizer, num_updates=step, extra_state=extra)
        if cfg.keep_checkpoints > 0:
            numbered = sorted((int(p.stem.split("_")[1]), p) for p in path_dir.glob("checkpoint_*.pt")
                              if p.stem.split("_")[1].isdigit())
            for _, p in numbered[:-cfg.keep_checkpoints]:
                p.unlink(missing_ok=True)
    _barrier(world)


def _load(path: Path, model, optimizer, scheduler, rank: int, world: int) -> dict:
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
    if len(st["rng"]) == world:
        restore_rng_state(st["rng"][rank])
        if len(st.get("positions", ())) == world:
            st["position"] = st["positions"][rank]
    return st


def _features(cfg, batch, device):
    """(B, 1, T, 128) normalised log-mels of a collated batch, computed on ``device`` (int16 scaled to [-1, 1])."""
    from sslam_fast.ops import eat_features

    audio = batch["audio"].to(device, non_blocking=True)  # int16 PCM is scaled by 1 / 32768 inside eat_features
    lengths = batch["lengths"].to(device)
    return eat_features(audio, lengths, sample_rate=cfg.sample_rate, target_length=cfg.target_length,
                        norm_mean=cfg.norm_mean, norm_std=cfg.norm_std)


def _masks(cfg, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
    from sslam_fast.ops import inverse_block_mask

    return inverse_block_mask(batch_size, cfg.clones, grid=cfg.grid, mask_prob=cfg.mask_prob,
                              mask_length=cfg.mask_length, mask_prob_adjust=cfg.mask_prob_adjust,
                              generator=generator, device=device)


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
            batch["masks"] = _masks(self.cfg, B, torch.Generator().manual_seed(seed), torch.device("cpu"))
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
        for key in ("loss", "patch", "mix_patch", "cls", "lr", "ema_decay", "clips_per_s"):
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


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or resume) pre-training as configured; returns the summary dict (also the last line of metrics.jsonl).

    ``resume=True`` requires a checkpoint in ``cfg.run_dir`` (one is used automatically anyway); ``stop_after=k``
    stops (saving a checkpoint) after k updates of this invocation, as a SIGTERM would."""
    from sslam_fast.data import BadFileMonitor, ResumableSampler, collate
    from sslam_fast.models import PretrainingModel
    from sslam_fast.ops import sample_mix_windows

    _check_tensorboard(cfg)
    rank, world, local_rank = _dist_env()
    use_cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if world > 1 and not use_cuda:
        torch.set_num_threads(1)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dataset, default_set = _build_data(cfg, rank, world)
    sampler = ResumableSampler(len(dataset), batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=WorkerFeatures(cfg) if cfg.features_in_workers else collate,
                                         num_workers=cfg.num_workers, pin_memory=use_cuda,
                                         generator=torch.Generator())  # not the global RNG: exact resume

    torch.manual_seed(cfg.seed)
    model = PretrainingModel(cfg.model_config()).to(device)
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
        st = _load(ckpt, model, optimizer, scheduler, rank, world)
        step, epoch, done = st["step"], st["position"]["epoch"], st["position"]["batches_done"]
        counters.update(st.get("counters", {}))
        if rank == 0:
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr, flush=True)

    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None,
                                                        find_unused_parameters=False)
    autocast = use_cuda and cfg.precision in ("auto", "bf16")
    monitor = BadFileMonitor(cfg.max_bad_file_share)
    monitor.n_ok, monitor.n_bad = counters["good_files"], counters["bad_files"]  # a resumed run keeps its counts
    forward = torch.compile(ddp) if cfg.compile else ddp
    board = _TensorBoard(cfg, rank == 0 and cfg.tensorboard)
    metrics_path = run_dir / "metrics.jsonl"
    progress = _Progress(cfg.max_updates, step, rank == 0)
    params = [p for p in model.parameters() if p.requires_grad]
    nonfinite_row = 0
    acc = _new_acc()
    t_run, clips_run, last_loss = time.perf_counter(), 0, float("nan")

    def batches():
        nonlocal epoch, done
        while True:
            sampler.load_state_dict({"epoch": epoch, "batches_done": done})
            dataset.set_epoch(epoch)
            loader.generator.manual_seed(cfg.seed * 7919 + epoch)  # worker base seeds depend on the epoch only
            expected = sampler.batches(epoch)
            for batch in loader:
                idx = expected[done]
                done += 1
                yield batch, idx
            epoch, done = epoch + 1, 0

    it = batches()
    first_step = step
    with GracefulExit() as stop:
        while step < cfg.max_updates:
            torch.manual_seed(cfg.seed + step)  # SPEC §6: common.seed + num_updates every step
            decay = _ema_step(model, step, cfg)  # SPEC §4: EMA first, with the updates done
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(5, dtype=torch.float64)  # patch, mix_patch, cls, loss, finite flag
            n_good, bad = 0, []
            for micro in range(cfg.grad_accum):
                t0 = time.perf_counter()
                while True:  # a batch of only unreadable files is skipped (and counted) like any bad file
                    batch, idx = next(it)
                    got = set(batch["indices"].tolist())
                    bad += [str(dataset.path(i)) for i in idx if i not in got]
                    n_good += len(got)
                    if got:
                        break
                    if len(bad) >= 20 * cfg.batch_size:
                        raise TrainingError(f"no readable file in {len(bad)} items in a row: {', '.join(bad[:5])}")
                B = batch["audio"].shape[0]
                g = _step_generator(cfg.seed, step, rank, micro)
                if "fbank" in batch:  # features_in_workers
                    source = batch["fbank"].to(device, non_blocking=True)
                    masks = batch["masks"].to(device, non_blocking=True)
                else:
                    source = _features(cfg, batch, device)
                    masks = _masks(cfg, B, g, device)
                windows = None
                if cfg.stage == "sslam":
                    windows = sample_mix_windows(g, num_frames=cfg.target_length, window_frames=cfg.mix_window_frames)
                t1 = _sync_time(use_cuda)
                sync_ctx = ddp.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else _Null()
                with sync_ctx:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                        out = forward(source, masks, windows)
                    loss = out["loss"]
                    t2 = _sync_time(use_cuda)
                    (loss / cfg.grad_accum).backward()
                t3 = _sync_time(use_cuda)
                S = float(out["sample_size"])
                vals = [float(out[k].detach()) / S for k in ("patch", "mix_patch", "cls")] + [float(loss.detach())]
                sums[:4] += torch.tensor(vals, dtype=torch.float64) / cfg.grad_accum
                sums[4] += 0.0 if math.isfinite(vals[3]) else 1.0
                acc["data"] += t1 - t0
                acc["forward"] += t2 - t1
                acc["backward"] += t3 - t2
                acc["clips"] += B
                clips_run += B
            t4 = time.perf_counter()
            flags = torch.tensor([sums[4].item(), 1.0 if stop.requested else 0.0, float(n_good), float(len(bad))],
                                 dtype=torch.float64)
            if world > 1:
                dist.all_reduce(flags)
            # bad files count over all ranks (every rank sees the same totals, so all stop together)
            counters["good_files"] += int(flags[2])
            counters["bad_files"] += int(flags[3])
            monitor.update(int(flags[2]), int(flags[3]), bad)
            if flags[0] > 0:  # a non-finite loss on some rank: skip the update everywhere
                optimizer.zero_grad(set_to_none=True)
                counters["skipped_steps"] += 1
                nonfinite_row += 1
                model.num_updates = step  # the next EMA call sees the same update count
                if nonfinite_row >= cfg.max_nonfinite_in_row:
                    raise TrainingError(f"{nonfinite_row} non-finite losses in a row at step {step}; stopping")
            else:
                nonfinite_row = 0
                if cfg.clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                step += 1
                acc["optimizer"] += _sync_time(use_cuda) - t4
                acc["n"] += 1
                acc["sums"] += sums[:4]
                acc["decay"], acc["lr"] = decay, lr
                last_loss = float(sums[3])
                log = step % cfg.log_every == 0 or step == cfg.max_updates
                if log:
                    rec = _log_record(acc, step, world)
                    if rank == 0:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        board.write(rec)
                    acc = _new_acc()
                rate = clips_run / max(time.perf_counter() - t_run, 1e-9)
                progress.update(step, {"loss": f"{last_loss:.4f}", "lr": f"{lr:.2e}", "clips/s": f"{rate:.1f}"}, log)
                if step % cfg.save_every_updates == 0 and step < cfg.max_updates:
                    _save(run_dir, cfg, model, optimizer, scheduler, step, (epoch, done), counters, rank, world)
            if flags[1] > 0 or (stop_after is not None and step - first_step >= stop_after):
                break
        stopped_early = step < cfg.max_updates
    progress.close()
    board.close()
    counters["clips"] += clips_run
    _save(run_dir, cfg, model, optimizer, scheduler, step, (epoch, done), counters, rank, world)
    elapsed = time.perf_counter() - t_run
    summary = {"summary": True, "steps": step, "clips_per_s": clips_run / max(elapsed, 1e-9),
               "final_loss": last_loss, "bad_files": counters["bad_files"],
               "skipped_steps": counters["skipped_steps"], "stopped_early": stopped_early, "world_size": world}
    if rank == 0:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(summary) + "\n")
        print(f"done: {step} steps, {summary['clips_per_s']:.1f} clips/s per device, final loss {last_loss:.4f}, "
              f"{counters['bad_files']} bad files, {counters['skipped_steps']} skipped steps", flush=True)
        if default_set is not None and not stopped_early:
            from sslam_fast.train.probe import linear_probe

            res = linear_probe(model.student, default_set, cfg, device=device)
            summary["probe"] = res
            print(f"linear-probe mAP: pretrained={res['pretrained']:.3f} random-init={res['random_init']:.3f}",
                  flush=True)
    _barrier(world)
    return summary


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sync_time(use_cuda: bool) -> float:
    if use_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def _new_acc() -> dict:
    return {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "clips": 0, "n": 0,
            "sums": torch.zeros(4, dtype=torch.float64), "decay": float("nan"), "lr": 0.0, "t0": time.perf_counter()}


def _log_record(acc: dict, step: int, world: int) -> dict:
    means = acc["sums"] / max(acc["n"], 1)
    if world > 1:  # average the logged losses over ranks (one small all-reduce per log line)
        means = means.clone()
        dist.all_reduce(means)
        means /= world
    wall = time.perf_counter() - acc["t0"]
    return {"step": step, "patch": means[0].item(), "mix_patch": means[1].item(), "cls": means[2].item(),
            "loss": means[3].item(), "lr": acc["lr"], "ema_decay": None if math.isnan(acc["decay"]) else acc["decay"],
            "clips_per_s": acc["clips"] / max(wall, 1e-9),
            "time": {k: round(acc[k], 4) for k in ("data", "forward", "backward", "optimizer")}}
