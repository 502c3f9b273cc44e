"""Layer-decayed AdamW groups and the per-group warm-up + cosine schedule of fine-tuning (docs/ALGORITHM.md §9).

Upstream: ``[E] models/EAT_audio_classification.py : MaeImageClassificationModel.__init__`` sets each parameter's
``optim_overrides`` (``lr_scale`` per block, ``weight_decay_scale 0`` for 1-D tensors and biases), ``[F]
optim/composite.py : FairseqCompositeOptimizer`` turns each distinct override into its own Adam (``lr * lr_scale``)
with its own ``[F] optim/lr_scheduler/cosine_lr_scheduler.py : CosineLRSchedule``, and ``[F] optim/adam.py`` is Adam
with decoupled weight decay (AdamW).

The data2vec-multi branch of ``MaeImageClassificationModel.__init__`` (the one EAT's checkpoints take) collects the
blocks as ``context_encoder.blocks + blocks`` (the context encoder has none, ``prenet_depth 0``), so with
``num_layers = L + 1`` and ``layer_scales[k] = layer_decay ** (num_layers - k)`` block i (0-based) gets
``layer_scales[i + 1] = layer_decay ** (L - i)``: 0.65^12 for block 0 ... 0.65 for block 11. Every parameter outside
the blocks (patch embedding, CLS token, input LayerNorm, ``fc_norm``, head) keeps lr_scale 1.0.

Each group's schedule is fairseq's cosine schedule run on the group's own peak lr ``peak * lr_scale``: the floor is
``min(min_lr, peak * lr_scale)`` (``CosineLRSchedule`` lowers ``min_lr`` to a smaller peak), warm-up rises linearly
from that floor (``warmup_init_lr`` defaults to ``min_lr``), and update n (0-based) runs at ``lr(n)``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

__all__ = ["build_optimizer", "build_scheduler", "layer_scale", "lr_at", "param_groups"]

_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.")


def _depth(model: nn.Module) -> int:
    blocks = getattr(getattr(model, "encoder", None), "blocks", None)
    if blocks is None:
        raise ValueError(f"param_groups needs an AudioClassifier (model.encoder.blocks), got {type(model).__name__}")
    return len(blocks)


def layer_scale(name: str, depth: int, layer_decay: float) -> float:
    """The lr scale of parameter ``name`` of an ``AudioClassifier`` with ``depth`` blocks: ``layer_decay ** (depth -
    i)`` inside ``encoder.blocks.{i}``, 1.0 elsewhere and whenever ``layer_decay`` is 0 (upstream's "off")."""
    m = _BLOCK.match(name)
    if m is None or layer_decay == 0:
        return 1.0
    return float(layer_decay) ** (depth - int(m.group(1)))


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 1 or name.endswith(".bias") or name.startswith("fc_norm.") or name == "head.bias"


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups of an ``AudioClassifier``, one per (weight decay, lr scale) pair in first-seen order.

    Weight decay is 0 for 1-D parameters, biases, ``fc_norm.*`` and ``head.bias``, ``weight_decay`` for the rest (the
    (1, 1, D) CLS token and the head weight included). The lr scale is :func:`layer_scale`. Only parameters with
    ``requires_grad`` enter (the fixed positional table never does; a frozen encoder leaves ``fc_norm`` and ``head``).
    Each group holds ``params``, ``names``, ``weight_decay`` and ``lr_scale``.
    """
    if weight_decay < 0 or not math.isfinite(weight_decay):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if not 0 <= layer_decay <= 1:
        raise ValueError(f"layer_decay must lie in [0, 1] (0 = off), got {layer_decay}")
    depth = _depth(model)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if _no_decay(name, p) else float(weight_decay)
        scale = layer_scale(name, depth, layer_decay)
        group = groups.setdefault((wd, scale), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def _peak(cfg) -> float:
    return float(cfg.peak_lr)


def _warmup(cfg) -> int:
    return int(cfg.schedule_warmup)


def lr_at(step: int, cfg, lr_scale: float = 1.0) -> float:
    """The lr of update ``step`` (0-based) in a group with ``lr_scale``: with ``peak = cfg.peak_lr * lr_scale`` and
    ``floor = min(cfg.min_lr, peak)``, ``floor + (peak - floor) * step / warmup`` during the warm-up, then ``floor +
    (peak - floor) * (1 + cos(pi * (step - warmup) / (max_updates - warmup))) / 2``, and ``floor`` from
    ``max_updates`` on. ``cfg.peak_lr`` / ``cfg.schedule_warmup`` are ``lr`` / ``warmup_updates``, or ``linear_lr`` /
    0 in linear evaluation."""
    n = int(step)
    if n < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be > 0, got {lr_scale}")
    peak = _peak(cfg) * float(lr_scale)
    floor = min(float(cfg.min_lr), peak)
    warm, total = _warmup(cfg), int(cfg.max_updates)
    if n < warm:
        return floor + (peak - floor) * n / warm
    if n >= total:
        return floor
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * (n - warm) / (total - warm)))


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg.betas``, ``cfg.adam_eps``; each group starts at (and keeps as
    ``initial_lr``) ``cfg.peak_lr * lr_scale``. Uses torch's fused implementation when every trainable parameter is a
    floating tensor on one cpu or cuda device, foreach otherwise."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    if not groups:
        raise ValueError("model has no trainable parameters")
    peak = _peak(cfg)
    for g in groups:
        g["lr"] = g["initial_lr"] = peak * g["lr_scale"]
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    fused = all(p.is_floating_point() for p in params) and len(devices) == 1 and \
        next(iter(devices)).type in ("cuda", "cpu")
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=peak, betas=tuple(cfg.betas), eps=cfg.adam_eps, **kw)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with one factor per group, ``lr_at(n, cfg, lr_scale) / initial_lr``: call ``scheduler.step()`` once
    per update, so update n (0-based) runs at ``lr_at(n, cfg, lr_scale)`` (fairseq's ``lr_step_update(num_updates)``).
    Groups without ``lr_scale`` count as 1.0. ``last_epoch`` = the updates already done, minus one, on resume."""
    lambdas = []
    for g in optimizer.param_groups:
        scale = float(g.get("lr_scale", 1.0))
        base = float(g.setdefault("initial_lr", _peak(cfg) * scale))
        if not base > 0:
            raise ValueError(f"every group needs a positive initial_lr, got {base}")
        lambdas.append(_factor(cfg, scale, base))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas, last_epoch=last_epoch)


def _factor(cfg, scale: float, base: float):
    def factor(n: int) -> float:  # a plain function: LambdaLR.state_dict() leaves it (and cfg) out of checkpoints
        return lr_at(n, cfg, scale) / base

    return factor
