"""Optimiser and learning-rate schedule (ALGORITHM §6; upstream ``[F] optim/adam.py``, ``optim/composite.py``,
``optim/lr_scheduler/cosine_lr_scheduler.py`` and data2vec 2.0's ``optim_overrides weight_decay_scale=0``)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["build_optimizer", "build_scheduler", "lr_at", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``weight_decay`` for every parameter of rank >= 2 that is not a ``*.bias``, 0 for every 1-D
    parameter and every bias (so the (1, 1, D) CLS token IS decayed). Frozen parameters (teacher, positional table)
    are left out. Each group also carries ``names`` (the parameter names, for logging and tests)."""
    decay = {"params": [], "names": [], "weight_decay": float(weight_decay)}
    no_decay = {"params": [], "names": [], "weight_decay": 0.0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = no_decay if p.ndim == 1 or name.endswith(".bias") else decay
        group["params"].append(p)
        group["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with ``cfg.lr``, ``cfg.betas``, ``cfg.adam_eps`` and the groups of :func:`param_groups`.

    Uses torch's fused implementation (one kernel over all parameters; CUDA and CPU) when every trainable parameter
    is a floating tensor on one device type it supports, foreach otherwise.
    The initial lr is ``cfg.lr``; :func:`build_scheduler` scales it (to 0 at step 0)."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() for p in params) and len({p.device.type for p in params}) == 1 and \
        params[0].device.type in ("cuda", "cpu")
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, **kw)


def lr_at(step: int, cfg) -> float:
    """ALGORITHM §6: lr_max * n / warmup for n < warmup, then 0.5 * lr_max * (1 + cos(pi * (n - warmup) / (max -
    warmup))),
    0 from ``max_updates`` on."""
    n, warm, total, peak = int(step), int(cfg.warmup_updates), int(cfg.max_updates), float(cfg.lr)
    if n < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if n < warm:
        return peak * n / warm
    if n >= total:
        return 0.0
    return 0.5 * peak * (1.0 + math.cos(math.pi * (n - warm) / (total - warm)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is ``lr_at(step) / cfg.lr``: call ``scheduler.step()`` once per update, so update n
    (0-based) runs at ``lr_at(n)`` like fairseq's ``lr_step_update(num_updates)``. The optimizer's initial lr must
    be ``cfg.lr``."""
    peak = float(cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: lr_at(n, cfg) / peak, last_epoch=last_epoch)
