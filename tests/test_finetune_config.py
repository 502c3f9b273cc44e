"""Fine-tuning configuration (sslam_fast.finetune.config): the presets' upstream values field by field, validation,
the shared command-line parser, the round trip through a dict and the derived values."""

from __future__ import annotations

import dataclasses

import pytest

from sslam_fast.finetune.config import PRESETS, FinetuneConfig, load_finetune_config
from sslam_fast.train import PRESETS as TRAIN_PRESETS
from sslam_fast.train import ConfigError, load_config

# The recipe of every preset, field by field, as docs/ALGORITHM.md §9 and the upstream scripts give it (the source
# of each value is in the preset's comment in sslam_fast/finetune/config.py).
COMMON = dict(lr=5e-5, min_lr=1e-6, betas=(0.9, 0.95), adam_eps=1e-8, weight_decay=0.05, layer_decay=0.65,
              drop_path=0.1, clip_norm=0.0, mixup_prob=0.9, linear="false", linear_lr=1e-3, sample_rate=16000)
EXPECTED = {
    "as20k": dict(COMMON, batch_size=48, max_updates=40000, warmup_updates=4000, target_length=1024,
                  clip_seconds=10.0, roll_aug=True, noise_aug=False, mixup=0.8, mask_ratio=0.2, label_smoothing=0.0,
                  norm_mean=-4.268, norm_std=4.569, multilabel=True, num_classes=0, weighted_sampling=False, seed=1,
                  embed_dim=768, depth=12, num_heads=12),
    "as2m": dict(COMMON, batch_size=96, max_updates=400000, warmup_updates=40000, target_length=1024,
                 clip_seconds=10.0, roll_aug=True, noise_aug=False, mixup=0.8, mask_ratio=0.2, label_smoothing=0.0,
                 norm_mean=-4.268, norm_std=4.569, multilabel=True, weighted_sampling=True, epoch_draws=200000,
                 weights_file="", seed=1, embed_dim=768, depth=12, num_heads=12),
    "esc50": dict(COMMON, batch_size=48, max_updates=4000, warmup_updates=400, target_length=512, clip_seconds=5.0,
                  roll_aug=True, noise_aug=False, mixup=0.0, mask_ratio=0.4, label_smoothing=0.1, norm_mean=-6.627,
                  norm_std=5.359, multilabel=False, num_classes=50, fold=1, weighted_sampling=False, seed=1),
    "spc2": dict(COMMON | {"lr": 2e-4}, batch_size=256, max_updates=40000, warmup_updates=4000, target_length=128,
                 clip_seconds=1.0, roll_aug=True, noise_aug=True, mixup=0.8, mask_ratio=0.2, label_smoothing=0.1,
                 norm_mean=-6.846, norm_std=5.565, multilabel=False, num_classes=35, weighted_sampling=False,
                 seed=42),
    "spass": dict(COMMON, batch_size=48, max_updates=3906, warmup_updates=390, target_length=1024,
                  clip_seconds=10.0, roll_aug=True, noise_aug=False, mixup=0.8, mask_ratio=0.2, label_smoothing=0.0,
                  norm_mean=-5.275, norm_std=3.268, multilabel=True, num_classes=0, weighted_sampling=False, seed=1),
    "tiny": dict(COMMON | {"lr": 2e-3}, batch_size=16, max_updates=400, warmup_updates=40, target_length=256,
                 clip_seconds=2.56, roll_aug=True, mixup=0.8, mask_ratio=0.2, multilabel=True, num_classes=0,
                 data="", num_workers=0, embed_dim=64, depth=2, num_heads=4),
}


def test_every_preset_is_checked():
    assert set(PRESETS) == set(EXPECTED) == {"as20k", "as2m", "esc50", "spc2", "spass", "tiny"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_values_follow_upstream(name):
    cfg = PRESETS[name]
    wrong = {k: (getattr(cfg, k), v) for k, v in EXPECTED[name].items() if getattr(cfg, k) != v}
    assert not wrong, f"preset {name}: (got, expected) {wrong}"
    assert cfg.preset == name


def test_defaults_are_the_as20k_recipe():
    """The dataclass defaults are AS-20K's recipe; as20k differs only in its evaluation cadence and its name."""
    default, as20k = FinetuneConfig(), PRESETS["as20k"]
    diff = {f.name for f in dataclasses.fields(FinetuneConfig) if getattr(default, f.name) != getattr(as20k, f.name)}
    assert diff == {"preset", "eval_every", "save_every"}
    assert (default.eval_every, default.save_every, default.run_dir) == (4000, 4000, "runs/finetune")


def test_spass_updates_are_fifty_epochs_of_its_training_set():
    """finetuning_SPASS.sh: max_update = 3750 clips * 50 epochs // 48, warm-up a tenth of it."""
    assert PRESETS["spass"].max_updates == 3750 * 50 // 48
    assert PRESETS["spass"].warmup_updates == PRESETS["spass"].max_updates // 10


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_load_validate_and_build_a_model_config(name):
    cfg = load_finetune_config([f"--preset={name}"])
    assert cfg == PRESETS[name] and cfg is not PRESETS[name]
    mc = cfg.model_config()
    assert mc.grid == (cfg.target_length // 16, 8)
    assert (mc.embed_dim, mc.depth, mc.num_heads, mc.drop_path_rate) == (cfg.embed_dim, cfg.depth, cfg.num_heads,
                                                                          cfg.drop_path)


def test_default_preset_is_as20k():
    assert load_finetune_config([]) == PRESETS["as20k"]


def test_tiny_encoder_matches_the_tiny_pretraining_preset():
    """finetune.py --preset=tiny starts from a train.py --preset=tiny checkpoint: the encoder sizes must agree."""
    ft, pt = PRESETS["tiny"], TRAIN_PRESETS["tiny"]
    assert (ft.embed_dim, ft.depth, ft.num_heads) == (pt.embed_dim, pt.depth, pt.num_heads)
    assert (ft.target_length, ft.clip_seconds, ft.sample_rate) == (pt.target_length, pt.clip_seconds, pt.sample_rate)
    assert ft.num_workers in (0, 1)


def test_loss_and_label_smoothing_follow_upstreams_branches():
    """MaeImageClassificationModel.forward: BCE for multi-label and for SPC-2 under mixup; CE otherwise; smoothing only
    on the CE path without mixup (Mixup's targets are never smoothed)."""
    assert PRESETS["as20k"].loss == PRESETS["as2m"].loss == PRESETS["spass"].loss == "bce"
    assert PRESETS["esc50"].loss == "ce" and PRESETS["esc50"].train_label_smoothing == 0.1
    assert PRESETS["spc2"].loss == "bce" and PRESETS["spc2"].train_label_smoothing == 0.0
    no_mix = load_finetune_config(["--preset=spc2", "--mixup=0"])
    assert no_mix.loss == "ce" and no_mix.train_label_smoothing == 0.1
    mixed = load_finetune_config(["--preset=esc50", "--mixup=0.8"])
    assert mixed.loss == "ce" and mixed.train_label_smoothing == 0.0
    assert load_finetune_config(["--preset=esc50", "--multilabel=true"]).loss == "bce"


def test_linear_evaluation_uses_its_lr_and_no_warmup():
    cfg = load_finetune_config(["--preset=spass", "--linear=true"])
    assert (cfg.is_linear, cfg.peak_lr, cfg.schedule_warmup) == (True, 1e-3, 0)
    assert cfg.warmup_updates == 390  # the field keeps its value; only the schedule drops the warm-up
    ft = PRESETS["spass"]
    assert (ft.is_linear, ft.peak_lr, ft.schedule_warmup) == (False, 5e-5, 390)
    assert load_finetune_config(["--linear=cached"]).is_linear


def test_cli_yaml_and_precedence(tmp_path):
    f = tmp_path / "ft.yaml"
    f.write_text("batch_size: 8\nlr: 1.0e-4\nbetas: [0.8, 0.9]\nlinear: cached\n")
    cfg = load_finetune_config(["--batch_size=4", "--config", str(f), "--preset=esc50", "--fold", "3"])
    assert (cfg.batch_size, cfg.lr, cfg.betas, cfg.linear, cfg.fold) == (4, 1e-4, (0.8, 0.9), "cached", 3)
    assert cfg.target_length == 512  # from the preset, under the file and the CLI
    assert load_finetune_config(["--roll-aug=false", "--betas=0.9,0.99"]).roll_aug is False
    assert load_finetune_config(["--betas=0.9,0.99"]).betas == (0.9, 0.99)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--preset=nope"], "unknown preset"),
        (["--nope=1"], "unknown key 'nope'"),
        (["--batch_size=1", "--batch_size=2"], "given twice"),
        (["--batch_size=abc"], "batch_size"),
        (["--batch_size=0"], "batch_size"),
        (["--batch_size=47"], "batch_size must be even under mixup"),
        (["--lr=0"], "lr must be"),
        (["--min_lr=1e-3"], "min_lr"),
        (["--warmup_updates=50000"], "warmup_updates"),
        (["--layer_decay=1.5"], "layer_decay"),
        (["--drop_path=1"], "drop_path"),
        (["--mixup=-1"], "mixup"),
        (["--mixup_prob=1.5"], "mixup_prob"),
        (["--mask_ratio=1"], "mask_ratio"),
        (["--label_smoothing=1"], "label_smoothing"),
        (["--target_length=100"], "target_length"),
        (["--target_length=16384"], "target_length"),
        (["--fold=6"], "fold"),
        (["--folds=some"], "folds"),
        (["--linear=maybe"], "linear"),
        (["--linear_lr=-1"], "linear_lr"),
        (["--device=tpu"], "device"),
        (["--precision=fp16"], "precision"),
        (["--weights_file=w.csv"], "weighted_sampling is false"),
        (["--epoch_draws=0"], "epoch_draws"),
        (["--num_heads=5"], "num_heads"),
        (["--norm_std=0"], "norm_std"),
        (["--clip_seconds=0.01"], "clip_seconds"),
        (["--num_classes=-1"], "num_classes"),
        (["--max_bad_file_share=1"], "max_bad_file_share"),
        (["--eval_every=0"], "eval_every"),
        (["--preset_name=x"], "unknown key"),
        (["--preset=tiny", "--seed=-1"], "seed"),
        (["positional"], "unexpected argument"),
    ],
)
def test_bad_values_name_the_problem(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        load_finetune_config(argv)


def test_bad_yaml_is_a_config_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_finetune_config([f"--config={f}"])
    with pytest.raises(ConfigError, match="cannot read"):
        load_finetune_config([f"--config={tmp_path / 'missing.yaml'}"])


@pytest.mark.parametrize("name", list(PRESETS))
def test_dict_round_trip(name):
    cfg = dataclasses.replace(PRESETS[name], init_checkpoint="/ckpt/sslam.pt", fold=0, folds="all")
    d = cfg.to_dict()
    assert isinstance(d["betas"], list)
    assert all(isinstance(v, (str, int, float, bool, list)) for v in d.values())
    assert FinetuneConfig.from_dict(d) == cfg


def test_from_dict_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key 'stage'"):
        FinetuneConfig.from_dict({**FinetuneConfig().to_dict(), "stage": "eat"})
    with pytest.raises(ConfigError, match="layer_decay"):
        FinetuneConfig.from_dict({"layer_decay": 2.0})
    with pytest.raises(ConfigError, match="dict"):
        FinetuneConfig.from_dict(["lr", 1.0])


def test_train_and_finetune_share_one_parser():
    """Both command lines go through sslam_fast.train.config.parse_config_argv: the same forms and the same errors."""
    assert load_config(["--preset=tiny", "--batch_size", "4"]).batch_size == 4
    assert load_finetune_config(["--preset=tiny", "--batch_size", "4"]).batch_size == 4
    for loader in (load_config, load_finetune_config):
        with pytest.raises(ConfigError, match="needs a value"):
            loader(["--preset=tiny", "--batch_size"])
