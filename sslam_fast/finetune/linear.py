"""Linear evaluation on cached features (``finetune.py --linear=cached``): the frozen encoder's CLS features of every
train and valid clip are extracted once, without augmentation (no roll, mixup or SpecAugment; the first
``clip_seconds`` of each clip), and ``fc_norm`` + head are trained on them with the linear-evaluation optimiser
(AdamW at ``linear_lr`` on its cosine schedule, no warm-up, ``batch_size`` features per update, ``max_updates``
updates). The extraction is the cost; the training takes seconds.

This is not upstream's linear evaluation: that one (``linear="true"``, SSLAM's polyphonic linear evaluation,
``[S] SPASS_Finetune_LinearEval/SSLAM_LinearEval_SPASS``) runs the frozen encoder on every augmented batch. The cached
mode is the fast estimate of the same number. Under ``torchrun`` the ranks share the extraction; rank 0 trains the
head and writes ``checkpoint_best.pt`` / ``checkpoint_last.pt`` (the whole classifier, fairseq's fine-tuned layout,
without optimizer state: a cached run is not resumed, it is run again).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sslam_fast.finetune.augment import finetune_loss, smooth_targets
from sslam_fast.finetune.common import (
    build_classifier,
    clip_outputs,
    fairseq_overrides,
    fmt_metric,
    load_data,
    prepare,
    score,
)
from sslam_fast.finetune.config import FinetuneConfig
from sslam_fast.finetune.optim import build_optimizer, build_scheduler, lr_at
from sslam_fast.train.distributed import DistEnv
from sslam_fast.train.runtime import gather, on_main, open_run_dir, record_bad_files

__all__ = ["linear_cached", "train_head"]


def train_head(model, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor,
               cfg: FinetuneConfig, log=None) -> dict:
    """Train ``model.fc_norm`` and ``model.head`` on (N, D) features and (N, C) targets; evaluate on the valid
    features every ``eval_every`` updates and at the end. Returns ``{"metric", "final", "best", "best_step",
    "best_state" (fc_norm + head weights of the best evaluation), "final_loss", "steps"}``. ``log(rec)`` receives each
    log and evaluation record."""
    device = x_train.device
    optimizer = build_optimizer(model, cfg)  # the encoder is frozen: fc_norm and head only
    scheduler = build_scheduler(optimizer, cfg)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    n, B = x_train.shape[0], min(cfg.batch_size, x_train.shape[0])
    perm, pos = torch.randperm(n, generator=g, device=device), 0
    head = torch.nn.Sequential(model.fc_norm, model.head)
    out = {"best": None, "best_step": None, "final": None, "best_state": None, "final_loss": None}
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for step in range(1, cfg.max_updates + 1):
        if pos + B > n:  # a new pass over the features
            perm, pos = torch.randperm(n, generator=g, device=device), 0
        idx = perm[pos:pos + B]
        pos += B
        targets = y_train[idx]
        if cfg.train_label_smoothing > 0:
            targets = smooth_targets(targets, cfg.train_label_smoothing, cfg.multilabel)
        loss = finetune_loss(head(x_train[idx]), targets, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in head.parameters()], cfg.clip_norm)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        if log is not None and (step % cfg.log_every == 0 or step == cfg.max_updates):
            k = step % cfg.log_every or cfg.log_every
            log({"step": step, "loss": float(loss_sum) / k, "lr": lr_at(step - 1, cfg)})
            loss_sum.zero_()
        if step % cfg.eval_every == 0 or step == cfg.max_updates:
            with torch.no_grad():
                name, value = score(head(x_valid).float().cpu(), y_valid.cpu(), cfg.multilabel)
            out.update(metric=name, final=value, final_loss=float(loss.detach()))
            if value == value and (out["best"] is None or value > out["best"]):  # not NaN, better
                out.update(best=value, best_step=step,
                           best_state={k: v.detach().clone() for k, v in head.state_dict().items()})
            if log is not None:
                log({"step": step, "eval": {name: value}, "best": out["best"], "best_step": out["best_step"]})
    out["steps"] = cfg.max_updates
    return out


def linear_cached(cfg: FinetuneConfig, env: DistEnv, synthetic_root: Path) -> dict:
    """A ``linear="cached"`` run in ``cfg.run_dir`` (see the module docstring); returns its summary, the same keys
    as a fine-tuning run's plus ``extract_s`` and ``train_s``."""
    from sslam_fast.checkpoint import save_finetuned_checkpoint
    from sslam_fast.data import AudioClipDataset

    run_dir = Path(cfg.run_dir)
    prepare(cfg, env, synthetic_root)
    data = load_data(cfg, env, synthetic_root)
    model = build_classifier(cfg, data.num_classes, env).to(env.device)
    model.encoder.requires_grad_(False)
    model.eval()
    t0 = time.perf_counter()
    whole = AudioClipDataset(files=data.train.files, clip_samples=cfg.clip_samples, sample_rate=cfg.sample_rate,
                             random_crop=False)

    def cls(fb: torch.Tensor) -> torch.Tensor:
        return model.encoder.extract_features(fb)[:, 0]

    x_tr, i_tr, bad_tr = clip_outputs(cls, whole, cfg, env)
    x_va, i_va, bad_va = clip_outputs(cls, data.valid_ds, cfg, env)
    extract_s = time.perf_counter() - t0
    bad = bad_tr + bad_va

    def work() -> dict:
        open_run_dir(run_dir, 0)  # a cached run starts over: its metrics.jsonl too
        metrics = open(run_dir / "metrics.jsonl", "a")
        t1 = time.perf_counter()
        try:
            res = train_head(model, x_tr.to(env.device), data.train.targets[i_tr].to(env.device),
                             x_va.to(env.device), data.valid.targets[i_va], cfg,
                             log=lambda rec: metrics.write(json.dumps(rec) + "\n"))
            train_s = time.perf_counter() - t1
            overrides = fairseq_overrides(cfg)
            save_finetuned_checkpoint(run_dir / "checkpoint_last.pt", model, num_updates=res["steps"],
                                      cfg=overrides, extra_state={"linear_cached": {"final": res["final"]}})
            if res["best_state"] is not None:  # the best head in the classifier for a moment, then the last again
                head = torch.nn.Sequential(model.fc_norm, model.head)
                final_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
                head.load_state_dict(res["best_state"])
                save_finetuned_checkpoint(run_dir / "checkpoint_best.pt", model, num_updates=res["best_step"],
                                          cfg=overrides,
                                          extra_state={"best": {"step": res["best_step"], res["metric"]: res["best"]}})
                head.load_state_dict(final_state)
            if bad:
                record_bad_files(run_dir / "bad_files.txt", bad)
            summary = {"summary": True, "steps": res["steps"], "metric": res["metric"], "final": res["final"],
                       "best": res["best"], "best_step": res["best_step"], "final_loss": res["final_loss"],
                       "clips": int(i_tr.numel()), "bad_files": len(bad), "skipped_steps": 0,
                       "stopped_early": False, "stop_reason": None, "world_size": env.world, "linear": "cached",
                       "extract_s": extract_s, "train_s": train_s,
                       "clips_per_s": (i_tr.numel() + i_va.numel()) / max(extract_s, 1e-9)}
            metrics.write(json.dumps(summary) + "\n")
        finally:
            metrics.close()
        print(f"done: linear evaluation on cached features: {res['steps']} steps in {train_s:.1f} s after "
              f"{extract_s:.1f} s of feature extraction, {res['metric']} {fmt_metric(res['final'])} (best "
              f"{fmt_metric(res['best'])} at step {res['best_step']}), {len(bad)} bad files", flush=True)
        return summary

    summary = on_main(env, work)
    return gather(env, summary)[0]
