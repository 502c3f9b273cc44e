"""Fine-tuning optimiser (sslam_fast.finetune.optim): layer-decayed groups parameter by parameter, the per-group
schedule against fairseq's cosine schedule, and the optimiser / scheduler pair."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from sslam_fast.finetune.config import PRESETS, FinetuneConfig
from sslam_fast.finetune.optim import build_optimizer, build_scheduler, layer_scale, lr_at, param_groups
from sslam_fast.models import AudioClassifier, ModelConfig


def tiny_classifier(depth: int = 3) -> AudioClassifier:
    return AudioClassifier(ModelConfig.tiny(depth=depth, average_top_k_layers=1), num_classes=7)


def expected(name: str, p: torch.Tensor, depth: int, wd: float, ld: float) -> tuple[float, float]:
    """(weight decay, lr scale) of one parameter, written out from upstream's rules."""
    decay = 0.0 if (p.ndim == 1 or name.endswith(".bias") or name.startswith("fc_norm.")) else wd
    if name.startswith("encoder.blocks."):
        i = int(name.split(".")[2])
        scale = ld ** (depth - i)
    else:
        scale = 1.0
    return decay, scale


@pytest.mark.parametrize("depth", [1, 3])
def test_groups_parameter_by_parameter(depth):
    model = tiny_classifier(depth)
    groups = param_groups(model, 0.05, 0.65)
    seen = {}
    for g in groups:
        assert set(g) >= {"params", "weight_decay", "lr_scale", "names"}
        assert len(g["params"]) == len(g["names"])
        for name, p in zip(g["names"], g["params"]):
            assert name not in seen, f"{name} in two groups"
            seen[name] = (g["weight_decay"], g["lr_scale"], p)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == set(trainable)
    assert "encoder.pos_embed" not in seen  # the fixed sin-cos table
    for name, (wd, scale, p) in seen.items():
        assert p is trainable[name]
        want_wd, want_scale = expected(name, p, depth, 0.05, 0.65)
        assert wd == want_wd, name
        assert scale == pytest.approx(want_scale, rel=1e-12), name
    # spot values: the CLS token (1, 1, D) and the head weight are decayed at scale 1; the last block gets 0.65
    assert seen["encoder.cls_token"][:2] == (0.05, 1.0)
    assert seen["encoder.patch_embed.weight"][:2] == (0.05, 1.0)
    assert seen["encoder.patch_embed.bias"][:2] == (0.0, 1.0)
    assert seen["encoder.input_norm.weight"][:2] == (0.0, 1.0)
    assert seen["head.weight"][:2] == (0.05, 1.0)
    assert seen["head.bias"][:2] == (0.0, 1.0)
    assert seen["fc_norm.weight"][:2] == seen["fc_norm.bias"][:2] == (0.0, 1.0)
    assert seen[f"encoder.blocks.{depth - 1}.attn.qkv.weight"][1] == pytest.approx(0.65)
    assert seen["encoder.blocks.0.mlp.fc1.weight"][1] == pytest.approx(0.65**depth)
    assert seen["encoder.blocks.0.norm1.weight"][:2] == (0.0, pytest.approx(0.65**depth))
    # one group per distinct (decay, scale): 2 per block + 2 outside the blocks
    assert len(groups) == 2 * depth + 2


def test_base_model_scales_follow_upstream_block_numbering():
    """The data2vec-multi branch of MaeImageClassificationModel.__init__: num_layers = 13, block i -> 0.65^(12 - i)."""
    scales = [layer_scale(f"encoder.blocks.{i}.attn.proj.weight", 12, 0.65) for i in range(12)]
    assert scales == pytest.approx([0.65 ** (12 - i) for i in range(12)], rel=1e-12)
    assert scales[0] == pytest.approx(0.65**12) and scales[11] == pytest.approx(0.65)
    for name in ("encoder.cls_token", "encoder.patch_embed.weight", "encoder.input_norm.bias", "fc_norm.weight",
                 "head.weight", "head.bias"):
        assert layer_scale(name, 12, 0.65) == 1.0


def test_layer_decay_zero_is_off_and_frozen_encoder_leaves_the_head():
    model = tiny_classifier(2)
    assert {g["lr_scale"] for g in param_groups(model, 0.05, 0.0)} == {1.0}
    assert {g["lr_scale"] for g in param_groups(model, 0.05, 1.0)} == {1.0}
    model.encoder.requires_grad_(False)
    names = sorted(n for g in param_groups(model, 0.05, 0.65) for n in g["names"])
    assert names == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_param_groups_refuses_bad_arguments():
    model = tiny_classifier(1)
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(model, 0.05, 1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0, 0.65)
    with pytest.raises(ValueError, match="AudioClassifier"):
        param_groups(torch.nn.Linear(2, 2), 0.05, 0.65)


def fairseq_cosine(n: int, peak: float, min_lr: float, warmup: int, max_update: int) -> float:
    """fairseq's CosineLRSchedule (t_mult 1, warmup_init_lr -1) of one composite group, as its step_update runs."""
    min_lr = min(min_lr, peak)  # "if self.max_lr < cfg.min_lr: cfg.min_lr = self.max_lr"
    init = min_lr  # warmup_init_lr < 0 -> min_lr
    step = (peak - init) / warmup if warmup > 0 else 1
    if n < warmup:
        return init + n * step
    period = max_update - warmup
    cur = n - warmup
    i = math.floor(cur / period)
    t_curr = cur - period * i
    shrink = 0.1**i
    lo, hi = min_lr * shrink, peak * shrink
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * t_curr / period))


@pytest.mark.parametrize("scale", [1.0, 0.65, 0.65**6, 0.65**12])
def test_lr_matches_fairseqs_cosine_schedule_per_group(scale):
    cfg = PRESETS["as20k"]
    peak = cfg.lr * scale
    for n in [0, 1, 100, 3999, 4000, 4001, 10000, 22000, 39999]:
        assert lr_at(n, cfg, scale) == pytest.approx(fairseq_cosine(n, peak, cfg.min_lr, 4000, 40000), rel=1e-12)
    assert lr_at(40000, cfg, scale) == pytest.approx(min(cfg.min_lr, peak))
    assert lr_at(10**6, cfg, scale) == pytest.approx(min(cfg.min_lr, peak))


def test_lr_shape():
    cfg = PRESETS["as20k"]
    assert lr_at(0, cfg) == pytest.approx(1e-6)  # the warm-up starts at min_lr, not 0
    assert lr_at(2000, cfg) == pytest.approx(1e-6 + (5e-5 - 1e-6) / 2)
    assert lr_at(4000, cfg) == pytest.approx(5e-5)
    assert lr_at(22000, cfg) == pytest.approx(1e-6 + (5e-5 - 1e-6) / 2)
    assert lr_at(22000, cfg, 0.65**12) == pytest.approx(5e-5 * 0.65**12)  # below min_lr: constant
    lin = dataclasses.replace(PRESETS["spass"], linear="true")
    assert lr_at(0, lin) == pytest.approx(1e-3)  # linear evaluation: no warm-up, peak linear_lr
    assert lr_at(lin.max_updates // 2, lin) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2, rel=1e-3)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, cfg)
    with pytest.raises(ValueError, match="lr_scale"):
        lr_at(0, cfg, 0.0)


def small_cfg(**kw) -> FinetuneConfig:
    base = dict(lr=1e-3, min_lr=1e-5, warmup_updates=3, max_updates=12, layer_decay=0.5, embed_dim=64, depth=2,
                num_heads=4, target_length=256)
    return FinetuneConfig(**{**base, **kw}).validate()


def test_optimizer_and_scheduler_follow_lr_at_in_every_group():
    cfg = small_cfg()
    model = tiny_classifier(2)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"] is True  # every parameter is a float CPU tensor
    sched = build_scheduler(opt, cfg)
    fbank = torch.randn(2, 1, 256, 128)
    for n in range(cfg.max_updates):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(lr_at(n, cfg, g["lr_scale"]), rel=1e-12), (n, g["lr_scale"])
            assert g["initial_lr"] == pytest.approx(cfg.lr * g["lr_scale"])
        model(fbank).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == pytest.approx([0.25, 0.5, 1.0])


def test_weight_decay_reaches_the_optimizer_groups():
    model = tiny_classifier(1)
    opt = build_optimizer(model, small_cfg(weight_decay=0.3))
    by_name = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert by_name["head.weight"] == 0.3 and by_name["head.bias"] == 0.0 and by_name["fc_norm.weight"] == 0.0


def test_linear_evaluation_optimizer():
    cfg = small_cfg(linear="true", linear_lr=2e-3)
    model = tiny_classifier(2)
    model.encoder.requires_grad_(False)
    opt = build_optimizer(model, cfg)
    build_scheduler(opt, cfg)
    assert sorted(n for g in opt.param_groups for n in g["names"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias",
                                                                        "head.weight"]
    assert all(g["lr"] == pytest.approx(2e-3) for g in opt.param_groups)  # no warm-up: the peak at update 0
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(model, cfg)


def test_scheduler_resume_and_state_dict():
    """A resumed scheduler (last_epoch = done - 1) continues at lr_at(done); its state saves without the config."""
    cfg = small_cfg()
    model = tiny_classifier(2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    buf = io.BytesIO()
    torch.save({"sched": state, "opt": opt.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain data: no FinetuneConfig, no functions
    opt2 = build_optimizer(tiny_classifier(2), cfg)
    opt2.load_state_dict(loaded["opt"])
    sched2 = build_scheduler(opt2, cfg, last_epoch=4)
    for g in opt2.param_groups:
        assert g["lr"] == pytest.approx(lr_at(5, cfg, g["lr_scale"]), rel=1e-12)
    sched2.load_state_dict(loaded["sched"])
    sched2.step()
    for g in opt2.param_groups:
        assert g["lr"] == pytest.approx(lr_at(6, cfg, g["lr_scale"]), rel=1e-12)
