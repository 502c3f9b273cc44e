"""Trainer configuration, optimiser groups, lr schedule and run-state helpers (sslam_fast.train)."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from sslam_fast.models import ModelConfig, PretrainingModel
from sslam_fast.train import (
    PRESETS,
    ConfigError,
    GracefulExit,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    capture_rng_state,
    find_latest_checkpoint,
    load_config,
    lr_at,
    param_groups,
    restore_rng_state,
)

# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_build_model_config(name):
    cfg = load_config([f"--preset={name}"])
    assert cfg == PRESETS[name]
    assert cfg is not PRESETS[name]
    mc = cfg.model_config()
    assert mc.grid[0] * 16 == cfg.target_length
    assert mc.stage == cfg.stage and mc.clones == cfg.clones


def test_preset_values_follow_algorithm():
    """The stage presets hold ALGORITHM §6-§7's hyper-parameters."""
    eat, sslam, tiny = PRESETS["eat-as2m"], PRESETS["sslam-as2m"], PRESETS["tiny"]
    assert (eat.stage, eat.clones, eat.lr, eat.warmup_updates, eat.max_updates) == ("eat", 16, 5e-4, 53333, 400000)
    assert (sslam.stage, sslam.clones, sslam.lr, sslam.warmup_updates, sslam.max_updates) == (
        "sslam",
        8,
        5e-5,
        25000,
        200000,
    )
    for c in (eat, sslam):
        assert (c.batch_size, c.betas, c.adam_eps, c.weight_decay, c.clip_norm, c.seed) == (
            12,
            (0.9, 0.95),
            1e-8,
            0.05,
            4.0,
            1,
        )
        assert (c.ema_start, c.ema_end, c.ema_end_step) == (0.9998, 0.99999, 100000)
        assert (c.mask_prob, c.mask_length, c.mask_prob_adjust, c.mask_noise_std) == (0.8, 5, 0.07, 0.01)
        assert (c.average_top_k_layers, c.norm_mean, c.norm_std, c.target_length) == (12, -4.268, 4.569, 1024)
    assert eat.model_config() == ModelConfig.base()
    assert sslam.model_config() == ModelConfig.base(stage="sslam", clones=8)
    assert tiny.model_config() == ModelConfig.tiny()
    assert (tiny.target_length, tiny.clip_seconds, tiny.batch_size, tiny.lr, tiny.warmup_updates) == (
        256,
        2.56,
        8,
        1e-3,
        40,
    )


def test_default_preset_is_eat():
    assert load_config([]) == PRESETS["eat-as2m"]


def test_cli_overrides_convert_types():
    cfg = load_config(
        [
            "--preset=tiny",
            "--lr=2e-3",
            "--batch_size",
            "3",
            "--compile=false",
            "--features-in-workers=0",
            "--betas=0.8,0.99",
            "--data=/x/y.tsv",
            "--clip_seconds=3",
            "--max_updates=1_000",
        ]
    )
    assert cfg.lr == 2e-3 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 3 and isinstance(cfg.batch_size, int)
    assert cfg.compile is False and cfg.features_in_workers is False
    assert cfg.betas == (0.8, 0.99)
    assert cfg.data == "/x/y.tsv" and cfg.clip_seconds == 3.0 and cfg.max_updates == 1000
    assert load_config(["--preset=tiny", "--compile=False"]).compile is False


def test_yaml_precedence(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 0.002\nbatch_size: 5\nbetas: [0.5, 0.6]\nrun_dir: out/a\ncompile: false\nclones: 2\n")
    # CLI beats file beats preset, whatever the order on the command line.
    cfg = load_config(["--batch_size=7", "--config", str(f), "--preset=tiny"])
    assert cfg.lr == 0.002 and cfg.batch_size == 7 and cfg.betas == (0.5, 0.6) and cfg.run_dir == "out/a"
    assert cfg.compile is False and cfg.clones == 2
    assert cfg.embed_dim == 64 and cfg.warmup_updates == 40  # untouched preset values
    assert load_config([f"--config={f}"]).embed_dim == 768  # default preset under the file


def test_target_length_and_grid_follow_each_other():
    assert load_config(["--preset=tiny", "--target_length=512"]).grid == (32, 8)
    assert load_config(["--preset=tiny", "--grid=8,8"]).target_length == 128
    with pytest.raises(ConfigError, match="target_length"):
        load_config(["--preset=tiny", "--target_length=512", "--grid=16,8"])


def test_to_dict_roundtrip(tmp_path):
    cfg = load_config(["--preset=sslam-as2m", "--init_checkpoint=/ckpt/eat.pt"])
    d = cfg.to_dict()
    assert d["betas"] == [0.9, 0.95] and d["grid"] == [64, 8] and d["stage"] == "sslam"
    torch.save({"cfg": d}, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)["cfg"]
    assert TrainConfig.from_dict(back) == cfg
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        TrainConfig.from_dict({**d, "nope": 1})


@pytest.mark.parametrize(
    "args, match",
    [
        (["--nope=1"], "unknown key 'nope'"),
        (["--preset=huge"], "unknown preset 'huge'"),
        (["--lr=abc"], "lr"),
        (["--lr=0"], "lr must be a positive"),
        (["--lr=-1e-4"], "lr must be a positive"),
        (["--lr=nan"], "lr"),
        (["--batch_size=0"], "batch_size must be >= 1"),
        (["--batch_size=1.5"], "batch_size"),
        (["--compile=maybe"], "compile"),
        (["--betas=0.9"], "betas"),
        (["--betas=0.9,1.0"], "betas must be two values"),
        (["--warmup_updates=500000"], "warmup_updates .* must not exceed max_updates"),
        (["--target_length=1000"], "target_length must be a positive multiple of 16"),
        (["--stage=beats"], "stage must be 'eat' or 'sslam'"),
        (["--precision=fp16"], "precision"),
        (["--clip_seconds=0.1"], "shorter than one patch"),
        (["--clip_seconds=0"], "clip_seconds"),
        (["--grad_accum=0"], "grad_accum"),
        (["--max_bad_file_share=1.5"], "max_bad_file_share"),
        (["--max_nonfinite_in_row=0"], "max_nonfinite_in_row"),
        (["--ema_start=0.99999", "--ema_end=0.9998"], "ema_start"),
        (["--mask_prob=1.0"], "mask_prob"),
        (["--average_top_k_layers=13"], "average_top_k_layers"),
        (["--num_heads=5"], "num_heads"),
        (["--lr=1", "--lr=2"], "given twice"),
        (["--lr"], "needs a value"),
        (["lr=1"], "unexpected argument"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_config_raises(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(args)
    assert issubclass(ConfigError, ValueError)


def test_bad_yaml_raises(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(["--config", str(f)])
    f.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(["--config", str(f)])
    f.write_text("batch_size: true\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(["--config", str(f)])
    f.write_text("colnes: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'colnes'"):
        load_config(["--config", str(f)])


# ---------------------------------------------------------------------------------------------------- optimiser


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return PretrainingModel(ModelConfig.tiny())


def test_param_groups_follow_algorithm(tiny_model):
    """ALGORITHM §6: weight decay on every trained tensor except 1-D ones and biases (the CLS token is decayed)."""
    groups = param_groups(tiny_model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = set(groups[0]["names"]), set(groups[1]["names"])
    assert not decay & no_decay
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable
    for n in (
        "student.cls_token",
        "student.patch_embed.weight",
        "student.blocks.0.attn.qkv.weight",
        "student.blocks.1.mlp.fc2.weight",
        "decoder.blocks.0.0.weight",
        "decoder.proj.weight",
    ):
        assert n in decay, n
    for n in (
        "student.patch_embed.bias",
        "student.input_norm.weight",
        "student.input_norm.bias",
        "student.blocks.0.norm1.weight",
        "student.blocks.0.attn.qkv.bias",
        "decoder.proj.bias",
    ):
        assert n in no_decay, n
    assert not any(n.startswith("teacher.") or "pos_embed" in n for n in decay | no_decay)
    for g in groups:
        byname = dict(tiny_model.named_parameters())
        assert all(byname[n] is p for n, p in zip(g["names"], g["params"]))
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(trainable)


def test_param_groups_bias_rule_and_frozen():
    odd = torch.nn.Module()
    odd.bias = torch.nn.Parameter(torch.ones(2, 2))  # 2-D but named *.bias: no decay
    odd.gain = torch.nn.Parameter(torch.ones(2))  # 1-D: no decay
    odd.table = torch.nn.Parameter(torch.ones(1, 1, 2))  # 3-D like the CLS token: decayed
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False), odd)
    m[1].weight.requires_grad_(False)  # frozen: in no group
    groups = param_groups(m, 0.1)
    assert groups[0]["names"] == ["0.weight", "2.table"] and groups[0]["weight_decay"] == 0.1
    assert groups[1]["names"] == ["0.bias", "2.bias", "2.gain"] and groups[1]["weight_decay"] == 0.0
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert param_groups(frozen, 0.1) == []
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, PRESETS["tiny"])


def test_build_optimizer_steps_with_decay():
    cfg = dataclasses.replace(PRESETS["tiny"], lr=0.1, weight_decay=0.5)
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.fill_(1.0)
    opt = build_optimizer(m, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == cfg.betas and opt.defaults["eps"] == cfg.adam_eps
    assert opt.defaults["fused"] is True  # CPU parameters: torch's fused AdamW runs on CPU too
    # Zero gradients: Adam's update is 0, only decoupled decay moves the weight (w *= 1 - lr * wd); the bias stays.
    m.weight.grad = torch.zeros_like(m.weight)
    m.bias.grad = torch.zeros_like(m.bias)
    opt.step()
    torch.testing.assert_close(m.weight, torch.full((2, 3), 1.0 - 0.1 * 0.5))
    torch.testing.assert_close(m.bias, torch.ones(2))


# ---------------------------------------------------------------------------------------------------- lr schedule


def test_lr_schedule_values():
    cfg = dataclasses.replace(PRESETS["eat-as2m"])
    peak, w, total = 5e-4, 53333, 400000
    assert lr_at(0, cfg) == 0.0
    assert lr_at(w // 2, cfg) == pytest.approx(peak * (w // 2) / w, rel=1e-12)
    assert lr_at(w, cfg) == pytest.approx(peak, rel=1e-12)
    mid = (w + total) // 2
    assert lr_at(mid, cfg) == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * (mid - w) / (total - w))), rel=1e-12)
    assert lr_at((w + total) / 2, cfg) == pytest.approx(peak / 2, rel=1e-3)
    assert lr_at(total, cfg) == 0.0 and lr_at(total + 10, cfg) == 0.0
    assert 0 < lr_at(total - 1, cfg) < 1e-12
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, cfg)
    no_warm = dataclasses.replace(cfg, warmup_updates=0, max_updates=10)
    assert lr_at(0, no_warm) == peak and lr_at(5, no_warm) == pytest.approx(peak / 2)


def test_lambda_lr_matches_lr_at():
    cfg = dataclasses.replace(PRESETS["tiny"], lr=1e-3, warmup_updates=4, max_updates=10)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(n, cfg) for n in range(12)], abs=1e-15)
    assert seen[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # Resuming: a fresh scheduler loaded from the state dict continues at the same step.
    opt2 = torch.optim.AdamW([p], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 12


# ---------------------------------------------------------------------------------------------------- run state


def _draws():
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(4).tolist(),
        torch.randn(2).tolist(),
    )


def test_rng_roundtrip_through_weights_only_file(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()  # numpy draws normals in pairs: leaves has_gauss = 1
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # move every generator further on
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected
    restore_rng_state(state)
    assert _draws() == expected


def test_rng_restore_each_generator_independently():
    state = capture_rng_state()
    a = random.random()
    b = np.random.rand()
    c = torch.rand(1).item()
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == (a, b, c)
    assert state["cuda"] == [] or all(isinstance(s, torch.Tensor) for s in state["cuda"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_roundtrip_cuda(tmp_path):
    torch.cuda.manual_seed_all(7)
    torch.randn(3, device="cuda")
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    torch.save(state, tmp_path / "rng.pt")
    x = torch.randn(5, device="cuda")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    torch.testing.assert_close(torch.randn(5, device="cuda"), x, rtol=0, atol=0)


def test_find_latest_checkpoint(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    for name in (
        "checkpoint_100.pt",
        "checkpoint_2000.pt",
        "checkpoint_300.pt",
        "checkpoint_9999.pt.tmp",
        "checkpoint_best.pt",
        "notes.txt",
    ):
        (tmp_path / name).write_bytes(b"x")
    t = time.time()
    os.utime(tmp_path / "checkpoint_300.pt", (t, t))  # newest mtime, but ranking is by step
    os.utime(tmp_path / "checkpoint_2000.pt", (t - 10, t - 10))
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_2000.pt"
    (tmp_path / "checkpoint_last.pt").write_bytes(b"x")
    os.utime(tmp_path / "checkpoint_last.pt", (t - 5, t - 5))
    assert find_latest_checkpoint(str(tmp_path)) == tmp_path / "checkpoint_last.pt"
    os.utime(tmp_path / "checkpoint_2000.pt", (t, t))  # a numbered file strictly newer than last wins
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_2000.pt"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_exit_sets_flag_and_restores(sig):
    calls = []

    def old_handler(signum, frame):
        calls.append(signum)

    before = signal.signal(sig, old_handler)
    try:
        with GracefulExit() as stop:
            assert not stop.requested
            os.kill(os.getpid(), sig)
            for _ in range(100):  # the handler runs at the next bytecode boundary of the main thread
                if stop.requested:
                    break
                time.sleep(0.001)
            assert stop.requested and stop.signum == sig
            assert calls == []
        assert signal.getsignal(sig) is old_handler
        os.kill(os.getpid(), sig)
        for _ in range(100):
            if calls:
                break
            time.sleep(0.001)
        assert calls == [sig]
    finally:
        signal.signal(sig, before)


def test_graceful_exit_second_sigint_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with GracefulExit() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("script, preset, field", [("train.py", "tiny", "--clones=4"),
                                                   ("finetune.py", "esc50", "--mask_ratio=0.4")])
def test_help_lists_the_settings_of_the_preset(script, preset, field):
    """``--help`` prints the entry point's usage and every setting with the named preset's value, and exits 0."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, script, f"--preset={preset}", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"values of --preset={preset}" in res.stdout and field in res.stdout
    assert "--run_dir=" in res.stdout and "error" not in res.stderr
