"""The fine-tuning loop behind ``finetune.py`` (docs/ALGORITHM.md §9): a pretrained encoder and a fresh ``fc_norm`` +
head trained with upstream's recipe, evaluated every ``eval_every`` updates, with the pretrainer's DDP, resume,
graceful stop and bad-file handling, and fairseq fine-tuned checkpoints (``checkpoint_best.pt``,
``checkpoint_last.pt``).

One update, on the device and without reading anything back: the int16 clips -> ``roll_aug`` (waveform) ->
``eat_features`` (fbank, pad / crop, normalisation) -> ``noise_aug`` -> ``mixup`` -> ``spec_augment`` -> label
smoothing -> classifier -> ``finetune_loss`` -> AdamW over the layer-decayed groups, each on its cosine schedule.
Mixup comes before SpecAugment as in ``[E] models/EAT_audio_classification.py : MaeImageClassificationModel.forward``
(``mixup_fn``, then ``spectrogram_augment``); the waveform roll and SPC-2's noise are upstream's data-loader steps
(``[E] data/raw_audio_dataset.py``). Every random draw of an update comes from a generator seeded by (seed, update,
rank), and torch's default generators (drop path) are seeded with ``seed + update`` as fairseq's trainer does, so a
resumed run draws what the uninterrupted one does.

``linear="true"``: the encoder is frozen and runs under ``no_grad`` (still in train mode, drop path included, as
upstream's ``linear_classifier`` leaves it); only ``fc_norm`` and the head learn, at ``linear_lr`` without warm-up,
with mixup and SpecAugment as in fine-tuning. ``linear="cached"``: see :mod:`sslam_fast.finetune.linear`.
``folds="all"``: the five ESC-50 folds one after the other (``<run_dir>/fold<k>``), and their mean.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from sslam_fast._checks import value_checks
from sslam_fast.finetune.augment import finetune_loss, mixup, noise_aug, roll_aug, smooth_targets, spec_augment
from sslam_fast.finetune.common import (
    Stats,
    build_classifier,
    clip_outputs,
    fairseq_overrides,
    fmt_metric,
    load_data,
    prepare,
    read_state,
    score,
    train_sampler,
)
from sslam_fast.finetune.config import FinetuneConfig
from sslam_fast.finetune.optim import build_optimizer, build_scheduler, lr_at
from sslam_fast.train import distributed
from sslam_fast.train.distributed import DistEnv
from sslam_fast.train.loop import default_data_root
from sslam_fast.train.runtime import (
    BAD_EXAMPLES,
    Batches,
    NoReadableFile,
    Progress,
    TrainingError,
    agree_before_update,
    gather,
    on_main,
    open_run_dir,
    remove_if_empty,
    settle_bad_files,
)
from sslam_fast.train.state import GracefulExit, capture_rng_state, find_latest_checkpoint, restore_rng_state

__all__ = ["STATE_KEY", "finetune"]

STATE_KEY = "sslam_fast_finetune"  # the fine-tuner's entry in a checkpoint's extra_state
MAX_NONFINITE_IN_ROW = 20  # non-finite updates in a row (each skipped) that stop the run, as train.py's default


def _aug_seed(seed: int, step: int, rank: int) -> int:
    """The seed of update ``step``'s augmentation draws on ``rank``: a function of the three alone (exact resume)."""
    return (((seed * 1_000_003 + step) * 1009 + rank) * 31) % (2**63 - 1)


class _Head(nn.Module):
    """``head(fc_norm(cls))`` on the classifier's own modules: what linear evaluation trains (and DDP wraps)."""

    def __init__(self, model):
        super().__init__()
        self.fc_norm, self.head = model.fc_norm, model.head

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(cls))


class _Stepper:
    """One update with nothing read back from the device. A non-finite gradient (the same on every rank: DDP averages
    the gradients first) skips the update on the device through the fused AdamW's ``found_inf``."""

    def __init__(self, cfg: FinetuneConfig, env: DistEnv, model, targets: torch.Tensor, optimizer, scheduler):
        self.cfg, self.env, self.model, self.targets = cfg, env, model, targets
        self.linear = cfg.linear == "true"
        trainable = _Head(model) if self.linear else model
        self.trainable = trainable
        if env.world > 1:
            # the encoder's buffers (the positional table) never change: no broadcast before every forward
            self.trainable = nn.parallel.DistributedDataParallel(
                trainable, device_ids=[env.device] if env.cuda else None, broadcast_buffers=False)
        # compiled: the classifier (or the head); augmentation, loss and optimiser stay eager, and every per-update
        # random draw (mixup's lambda, the masks) reaches the compiled region inside a tensor, never as a constant
        self.forward = torch.compile(self.trainable) if cfg.compile else self.trainable
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fused = bool(optimizer.defaults.get("fused"))
        self.autocast = cfg.precision == "bf16" or (env.cuda and cfg.precision == "auto")
        self.generator = torch.Generator(device=env.device)
        self.last_loss: torch.Tensor | None = None

    def inputs(self, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented (B, 1, T, 128) features and (B, C) targets of one batch (see the module docstring)."""
        from sslam_fast.ops import eat_features

        cfg, device, g = self.cfg, self.env.device, self.generator
        g.manual_seed(_aug_seed(cfg.seed, step, self.env.rank))
        audio, lengths, idx = batch["audio"], batch["lengths"], batch["indices"]
        if cfg.mixup > 0 and audio.shape[0] % 2 and audio.shape[0] > 1:
            # upstream's Mixup needs an even batch; an unreadable file can leave an odd one: its last clip waits
            audio, lengths, idx = audio[:-1], lengths[:-1], idx[:-1]
        audio = audio.to(device, non_blocking=True)
        lengths = lengths.to(device, non_blocking=True)
        targets = self.targets[idx]  # (B, C) rows of the host table: only they travel
        targets = (targets.pin_memory() if self.env.cuda else targets).to(device, non_blocking=True)
        if cfg.roll_aug:
            if not audio.is_floating_point() and audio.dtype != torch.int16:
                audio = audio.float() * (1.0 / 32768.0)  # integer PCM as soundfile reads it
            audio = roll_aug(audio, lengths, g)  # int16 PCM: read as floats / 32768 in the same pass
        fb = eat_features(audio, lengths, sample_rate=cfg.sample_rate, target_length=cfg.target_length,
                          norm_mean=cfg.norm_mean, norm_std=cfg.norm_std)
        if cfg.noise_aug:
            fb = noise_aug(fb, g)
        if cfg.mixup > 0 and fb.shape[0] > 1:  # one clip mixed with itself is itself
            fb, targets = mixup(fb, targets, cfg.mixup, cfg.mixup_prob, g)
        if cfg.mask_ratio > 0:
            fb = spec_augment(fb, cfg.mask_ratio, g)
        if cfg.train_label_smoothing > 0:
            targets = smooth_targets(targets, cfg.train_label_smoothing, cfg.multilabel)
        return fb, targets

    def run(self, step: int, batch: dict, stats: Stats) -> None:
        """Update ``step`` (0-based) on ``batch``."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed + step)  # drop path's draws: fairseq's seed + num_updates
        fb, targets = self.inputs(batch, step)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.linear:
                with torch.no_grad():
                    cls = self.model.encoder.extract_features(fb)[:, 0]
                logits = self.forward(cls)
            else:
                logits = self.forward(fb)
        loss = finetune_loss(logits, targets, cfg.loss)
        loss.backward()
        if cfg.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        finite = torch.isfinite(norm) & torch.isfinite(loss.detach())
        if self.fused:
            self.optimizer.found_inf = (~finite).to(torch.float32)
            self.optimizer.step()
        elif bool(finite):  # a non-fused optimizer has no device-side skip: one host read
            self.optimizer.step()
        self.scheduler.step()
        stats.add(loss.detach(), finite, fb.shape[0])
        self.last_loss = loss.detach()


def _save_last(run_dir: Path, cfg, model, optimizer, scheduler, step, position, extra: dict, env: DistEnv) -> None:
    """``checkpoint_last.pt`` (fairseq's fine-tuned layout) with the optimizer and the trainer's state: every rank's
    RNG state and data position, the scheduler, the counters and the evaluation record."""
    from sslam_fast.checkpoint import save_finetuned_checkpoint

    gathered = gather(env, (capture_rng_state(), position))
    if env.is_main:
        state = {"step": int(step), "positions": [g[1] for g in gathered], "rng": [g[0] for g in gathered],
                 "scheduler": scheduler.state_dict(), "config": cfg.to_dict(), "world_size": int(env.world), **extra}
        save_finetuned_checkpoint(run_dir / "checkpoint_last.pt", model, optimizer, num_updates=step,
                                  cfg=fairseq_overrides(cfg), extra_state={STATE_KEY: state})
    env.barrier()


def _evaluate(model, data, cfg, env) -> dict:
    """The metric of ``model`` on the valid set (every rank scores its share; all of them get the result)."""
    was = model.training
    model.eval()
    try:
        scores, idx, bad = clip_outputs(model, data.valid_ds, cfg, env)
    finally:
        model.train(was)
    name, value = score(scores, data.valid.targets[idx], cfg.multilabel)
    return {"metric": name, "value": value, "clips": int(idx.numel()), "bad_files": len(bad)}


def _run(cfg: FinetuneConfig, env: DistEnv, resume: bool, stop_after: int | None, synthetic_root: Path) -> dict:
    """One fine-tuning (or ``linear="true"``) run in ``cfg.run_dir``; returns its summary."""
    from sslam_fast.data import BadFileMonitor, collate

    run_dir = Path(cfg.run_dir)
    prepare(cfg, env, synthetic_root)
    data = load_data(cfg, env, synthetic_root)
    sampler = train_sampler(cfg, data, env)
    loader = torch.utils.data.DataLoader(data.train_ds, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.num_workers, pin_memory=env.cuda,
                                         generator=torch.Generator())
    ckpt = find_latest_checkpoint(run_dir, load=True, remove_temp=env.is_main, verbose=env.is_main)
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint in {run_dir}")
    model = build_classifier(cfg, data.num_classes, env, ckpt).to(env.device)
    if cfg.linear == "true":
        model.encoder.requires_grad_(False)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    step, epoch, done = 0, 0, 0
    counters = {"bad_files": 0, "good_files": 0, "clips": 0, "skipped_steps": 0}
    evals = {"best": None, "best_step": None, "last": None, "last_step": None}
    if ckpt is not None:
        st = read_state(ckpt.obj, ckpt.path, STATE_KEY)
        try:
            optimizer.load_state_dict(ckpt.obj["last_optimizer_state"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            from sslam_fast.checkpoint import CheckpointError

            raise CheckpointError(f"{ckpt}: its optimizer state does not fit this run's optimizer "
                                  f"({' '.join(str(e).split())})") from None
        scheduler.load_state_dict(st["scheduler"])
        step = int(st["step"])
        positions = st.get("positions") or [{"epoch": 0, "batches_done": 0}]
        if len(st.get("rng", ())) == env.world and len(positions) == env.world:
            restore_rng_state(st["rng"][env.rank])
            epoch, done = positions[env.rank]["epoch"], positions[env.rank]["batches_done"]
        else:
            epoch, done = positions[0]["epoch"], positions[0]["batches_done"]
        counters.update(st.get("counters", {}))
        evals.update(st.get("evals", {}))
        if env.is_main:
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr, flush=True)

    stepper = _Stepper(cfg, env, model, data.train.targets, optimizer, scheduler)
    batches = Batches(cfg, data.train_ds, loader, sampler, epoch, done)
    monitor = BadFileMonitor(cfg.max_bad_file_share)
    monitor.n_ok, monitor.n_bad = counters["good_files"], counters["bad_files"]
    created = on_main(env, lambda: open_run_dir(run_dir, step))
    progress = Progress(cfg.max_updates, step, env.is_main)
    stats = Stats(env)
    t_run, first_step = time.perf_counter(), step
    position = batches.position()
    bad_seen: dict[str, None] = {}
    stop_reason, failure, no_data = None, None, None

    def write(rec: dict) -> None:
        if env.is_main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def log() -> dict:
        rec = stats.summary(step, lr_at(max(step - 1, 0), cfg))
        counters["skipped_steps"] += rec["nonfinite_steps"]
        write(rec)
        if rec["max_nonfinite_in_row"] >= MAX_NONFINITE_IN_ROW:
            raise TrainingError(f"{rec['max_nonfinite_in_row']} non-finite losses in a row by step {step}; "
                                "stopping (the skipped updates left the model unchanged)")
        return rec

    def evaluate() -> None:
        t0 = time.perf_counter()
        res = _evaluate(model, data, cfg, env)
        better = math.isfinite(res["value"]) and (evals["best"] is None or res["value"] > evals["best"])
        evals.update(last=res["value"], last_step=step)
        if better:
            evals.update(best=res["value"], best_step=step)
            on_main(env, lambda: _save_best(run_dir, cfg, model, step, res))
        write({"step": step, "eval": {res["metric"]: res["value"]}, "best": evals["best"],
               "best_step": evals["best_step"], "eval_clips": res["clips"], "eval_bad_files": res["bad_files"]})
        stats.exclude(time.perf_counter() - t0)

    try:
        with GracefulExit() as stop:
            while step < cfg.max_updates:
                bad: list[str] = []
                t0 = time.perf_counter()
                try:
                    batch, n_good = batches.next(bad)
                except NoReadableFile as e:
                    batch, n_good, no_data = None, 0, str(e)
                stats.data_s += time.perf_counter() - t0
                bad_seen.update(dict.fromkeys(bad))
                failure, stop_reason = agree_before_update(env, stop, n_good, len(bad), no_data is not None, monitor,
                                                           counters)
                if failure or stop_reason:
                    break
                with value_checks(step == first_step):
                    stepper.run(step, batch, stats)
                step += 1
                position = batches.position()
                rec = log() if step % cfg.log_every == 0 or step == cfg.max_updates else None
                progress.update(step, rec)
                if step % cfg.eval_every == 0 or step == cfg.max_updates:
                    evaluate()
                if step % cfg.save_every == 0 and step < cfg.max_updates:
                    _save_last(run_dir, cfg, model, optimizer, scheduler, step, position,
                               {"counters": dict(counters), "evals": dict(evals)}, env)
                if stop_after is not None and step - first_step >= stop_after:
                    stop_reason = f"--stop_after={stop_after}"
                    break
        if stats.steps:
            log()
        if step >= cfg.max_updates and evals["last_step"] != step:  # finished earlier, the last evaluation lost
            evaluate()
    except BaseException:
        if env.is_main and created:
            remove_if_empty(run_dir)
        raise
    finally:
        progress.close()
    saved = step > first_step
    if saved:
        _save_last(run_dir, cfg, model, optimizer, scheduler, step, position,
                   {"counters": dict(counters), "evals": dict(evals)}, env)
    note = f"; saved {run_dir / 'checkpoint_last.pt'}: fix the data, then resume with the same command" if saved else ""
    bad_names = settle_bad_files(env, run_dir, bad_seen, no_data, failure, monitor, note, created)
    elapsed = time.perf_counter() - t_run
    metric = "mAP" if cfg.multilabel else "accuracy"
    summary = {"summary": True, "steps": step, "metric": metric, "final": evals["last"], "best": evals["best"],
               "best_step": evals["best_step"], "clips_per_s": stats.clips_seen / max(elapsed, 1e-9),
               "final_loss": float(stepper.last_loss) if stepper.last_loss is not None else None,
               "clips": counters["clips"], "bad_files": counters["bad_files"],
               "skipped_steps": counters["skipped_steps"], "stopped_early": step < cfg.max_updates,
               "stop_reason": stop_reason, "world_size": env.world, "linear": cfg.linear}
    if env.is_main:
        write(summary)
        _print_done(summary, cfg, run_dir, bad_names)
    env.barrier()
    return summary


def _save_best(run_dir: Path, cfg, model, step: int, res: dict) -> None:
    from sslam_fast.checkpoint import save_finetuned_checkpoint

    save_finetuned_checkpoint(run_dir / "checkpoint_best.pt", model, num_updates=step, cfg=fairseq_overrides(cfg),
                              extra_state={"best": {"step": int(step), res["metric"]: float(res["value"])}})


def _print_done(s: dict, cfg, run_dir: Path, bad_names: list[str]) -> None:
    head = (f"stopped early at step {s['steps']} of {cfg.max_updates} ({s['stop_reason']}); resume with the same "
            "command;" if s["stopped_early"] else f"{s['steps']} steps,")
    bad_note = ""
    if s["bad_files"] and bad_names:
        shown = ", ".join(bad_names[:BAD_EXAMPLES]) + (", ..." if len(bad_names) > BAD_EXAMPLES else "")
        bad_note = f" ({shown}; all in {run_dir / 'bad_files.txt'})"
    print(f"done: {head} {s['clips_per_s']:.1f} clips/s per device, final loss {fmt_metric(s['final_loss'])}, "
          f"{s['metric']} {fmt_metric(s['final'])} (best {fmt_metric(s['best'])} at step {s['best_step']}), "
          f"{s['bad_files']} bad files{bad_note}, {s['skipped_steps']} skipped steps", flush=True)


def _all_folds(cfg: FinetuneConfig, env: DistEnv, resume: bool, stop_after: int | None, synthetic_root) -> dict:
    """Folds 1..5, each in ``<run_dir>/fold<k>`` (a finished fold is not trained again), and the mean of their final
    metric (upstream's ESC-50 number is the mean of five runs)."""
    results = []
    for k in range(1, 6):
        sub = dataclasses.replace(cfg, fold=k, folds="", run_dir=str(Path(cfg.run_dir) / f"fold{k}"))
        res = _run(sub, env, resume and (Path(sub.run_dir) / "checkpoint_last.pt").exists(), stop_after,
                   synthetic_root)
        results.append(res)
        if res["stopped_early"]:
            return {"folds": results, "mean": None, "metric": res["metric"], "stopped_early": True}
    values = [r["final"] for r in results]
    mean = sum(values) / len(values) if all(v is not None for v in values) else None
    if env.is_main:
        print(f"{results[0]['metric']} over 5 folds: " + " ".join(fmt_metric(v) for v in values)
              + f"; mean {fmt_metric(mean)}", flush=True)
    return {"folds": results, "mean": mean, "metric": results[0]["metric"], "stopped_early": False}


def finetune(cfg: FinetuneConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or resume) fine-tuning or linear evaluation as configured; returns the summary (also the last line of
    ``<run_dir>/metrics.jsonl``): ``steps``, ``metric`` (``"mAP"`` or ``"accuracy"``), ``final`` and ``best`` values,
    ``best_step``, ``clips_per_s``, ``bad_files``, ``stopped_early``, ... With ``folds="all"``: ``{"folds": [summary
    of each fold], "mean": ...}``.

    A run resumes from ``<run_dir>/checkpoint_last.pt`` when there is one (``resume=True`` makes a missing one an
    error); ``stop_after=k`` stops after k updates of this invocation, saving, as SIGTERM does. The built-in synthetic
    set lives in ``<run_dir>/../default_data`` (shared with ``train.py``). The steady-state update reads nothing back
    from the device; the log steps (``log_every``) read the loss once, the evaluations read the scores."""
    cfg.validate()
    env = distributed.setup(cfg.device)
    synthetic_root = default_data_root(cfg.run_dir)
    if cfg.folds == "all":
        return _all_folds(cfg, env, resume, stop_after, synthetic_root)
    if cfg.linear == "cached":
        from sslam_fast.finetune.linear import linear_cached

        return linear_cached(cfg, env, synthetic_root)
    return _run(cfg, env, resume, stop_after, synthetic_root)



def demonstration(cfg: FinetuneConfig, resume: bool = False, stop_after: int | None = None) -> dict | None:
    """The built-in comparison (``finetune.py --preset=tiny --init_checkpoint=CKPT``): three runs of ``cfg`` on the
    built-in set, in ``<run_dir>/finetuned`` (fine-tuning from CKPT), ``<run_dir>/linear`` (``linear="true"`` from
    CKPT) and ``<run_dir>/random_init`` (the fine-tuning recipe from a random encoder of CKPT's size), then one line
    ``fine-tune mAP: finetuned=... linear=... random-init=...`` with each run's best evaluation (the mAP of its
    ``checkpoint_best.pt``). Returns ``{name: summary}``, or None when a run stopped early (resume with the same
    command: finished runs are not trained again)."""
    from sslam_fast.checkpoint import infer_config, load_checkpoint

    cfg.validate()
    if not cfg.init_checkpoint:
        raise TrainingError("the comparison needs --init_checkpoint (a pretrained checkpoint)")
    env = distributed.setup(cfg.device)
    synthetic_root = default_data_root(cfg.run_dir)
    obj, _, maps = load_checkpoint(cfg.init_checkpoint, cfg.trust_checkpoint)
    size = infer_config(obj, maps)
    base = Path(cfg.run_dir)
    runs = {
        "finetuned": dataclasses.replace(cfg, run_dir=str(base / "finetuned")),
        "linear": dataclasses.replace(cfg, run_dir=str(base / "linear"), linear="true"),
        "random-init": dataclasses.replace(cfg, run_dir=str(base / "random_init"), init_checkpoint="",
                                           embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads),
    }
    out = {}
    for name, sub in runs.items():
        if env.is_main:
            print(f"--- {name}: {sub.run_dir}", flush=True)
        out[name] = _run(sub, env, resume and (Path(sub.run_dir) / "checkpoint_last.pt").exists(), stop_after,
                         synthetic_root)
        if out[name]["stopped_early"]:
            return None
    if env.is_main:
        metric = out["finetuned"]["metric"]
        print(f"fine-tune {metric}: " + " ".join(f"{k}={fmt_metric(out[k]['best'], 3)}" for k in runs), flush=True)
    return out
