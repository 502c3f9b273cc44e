"""Fine-tuning configuration: upstream's fine-tuning and linear-evaluation recipes as a ``FinetuneConfig``, its presets
and the ``finetune.py`` command line (docs/ALGORITHM.md §9).

Upstream sources of the values (each preset below names the file of each value):

- ``[E] config/finetuning.yaml`` (the base of every recipe; the SSLAM copies ``[S] SSLAM_Finetune/*/config/
  finetuning.yaml`` and ``[S] SPASS_Finetune_LinearEval/*/config/finetuning.yaml`` hold the same optimiser, schedule
  and model values);
- ``[E] models/EAT_audio_classification.py : MaeImageClassificationConfig`` (``drop_path_rate 0.1``, ``layer_decay
  0.65``, ``mixup_prob`` 0.9 from the yaml) and ``[F] optim/adam.py`` (``adam_eps 1e-8``), ``[F]
  dataclass/configs.py`` (``clip_norm 0``, ``seed 1``);
- the per-task scripts ``[S] SSLAM_Finetune/SSLAM_Ft_AS2M/scripts/finetuning_AS2M.sh``, ``[S]
  SSLAM_Finetune/SSLAM_Ft_AS20K/scripts/finetuning_AS20KOrig.sh``, ``[E] scripts/finetuning_ESC50.sh``, ``[E]
  scripts/finetuning_SPCv2.sh``, ``[S] SPASS_Finetune_LinearEval/SSLAM_Ft_SPASS/scripts/finetuning_SPASS.sh`` and
  ``.../SSLAM_LinearEval_SPASS/scripts/linear_eval_SPASS.sh``;
- the normalisation statistics from ``[E] data/raw_audio_dataset.py : FileAudioDataset.__getitem__`` (AudioSet,
  ESC-50, SPC-2) and ``[S] SPASS_Finetune_LinearEval/SSLAM_Ft_SPASS/data/raw_audio_dataset.py : DATA_STATS`` (SPASS).

Precedence in :func:`load_finetune_config`: dataclass defaults < ``--preset=NAME`` (default ``as20k``) < ``--config
FILE`` (YAML) < ``--key=value``, parsed by the pretrainer's parser (``sslam_fast.train.config.parse_config_argv``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from sslam_fast.models.config import ModelConfig
from sslam_fast.train.config import PATCH_SIZE, ConfigError, _apply, parse_config_argv

__all__ = ["FinetuneConfig", "PRESETS", "load_finetune_config"]

_MEL_PATCHES = 8  # 128 mel bins / 16: every EAT input has 8 frequency patches (ALGORITHM §2.1)
_MAX_TIME_PATCHES = ModelConfig.max_time_patches  # rows of the positional table


@dataclass
class FinetuneConfig:
    """Run settings and hyper-parameters of one fine-tuning (or linear-evaluation) run. The defaults are the AS-20K
    recipe; ``PRESETS`` holds the others."""

    # --- run -----------------------------------------------------------------------------------------------------
    init_checkpoint: str = ""  # pretrained encoder, any format sslam_fast.load_pretrained reads; "" = random encoder
    data: str = ""  # train manifest .tsv | folder root/<label>/*.wav | "" = the built-in synthetic set
    valid_data: str = ""  # same kinds; "" = the built-in held-out set, or for a folder the `fold` split
    labels: str = ""  # labels CSV index,mid,display_name; "" = from the data
    run_dir: str = "runs/finetune"
    seed: int = 1  # [F] dataclass/configs.py common.seed
    device: str = "auto"  # "auto" | "cpu" | "cuda" (as train.py)
    precision: str = "auto"  # "auto" | "fp32" | "bf16" (as train.py; upstream trains in fp16)
    compile: bool = False  # torch.compile the classifier's forward (as train.py --compile)
    num_workers: int = 8
    log_every: int = 100
    eval_every: int = 4000  # updates between evaluations (upstream: every epoch end)
    save_every: int = 4000  # updates between checkpoint_last.pt writes
    max_bad_file_share: float = 0.05
    trust_checkpoint: bool = False  # allow loading an init checkpoint that holds arbitrary pickled objects
    preset: str = ""  # the preset this config started from; "spc2" selects SPC-2's loss (see `loss`)
    # --- data ---------------------------------------------------------------------------------------------------
    sample_rate: int = 16000
    clip_seconds: float = 10.0
    target_length: int = 1024  # frames after pad / crop
    norm_mean: float = -4.268  # AudioSet ([E] data/raw_audio_dataset.py)
    norm_std: float = 4.569
    num_classes: int = 0  # 0 = from the labels
    multilabel: bool = True
    fold: int = 0  # ESC-50 held-out fold 1..5; 0 = not folded
    folds: str = ""  # "all": run folds 1..5 (fold is set per run) and report the mean
    # --- optimisation -------------------------------------------------------------------------------------------
    batch_size: int = 48  # clips per process (upstream ran every fine-tuning on 1 GPU)
    max_updates: int = 40000
    warmup_updates: int = 4000
    lr: float = 5e-5
    min_lr: float = 1e-6  # the cosine floor of every group (upstream does not scale it by the layer decay)
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # block i of depth L: lr_scale layer_decay ** (L - i); 0 = off (all 1.0), as upstream
    drop_path: float = 0.1  # stochastic depth, linear over the blocks -> ModelConfig.drop_path_rate
    clip_norm: float = 0.0  # 0 = no clipping (upstream's default)
    # --- augmentation -------------------------------------------------------------------------------------------
    roll_aug: bool = True  # waveform roll with a Beta(10, 10) + 0.5 gain
    noise_aug: bool = False  # SPC-2's fbank noise and time roll
    mixup: float = 0.8  # Beta(alpha, alpha) of the batch mixup; 0 = off
    mixup_prob: float = 0.9
    mask_ratio: float = 0.2  # SpecAugment: one frequency mask of < 128 r bins, one time mask of < T r frames
    label_smoothing: float = 0.0  # upstream applies it only without mixup on single-label sets: train_label_smoothing
    # --- sampling -----------------------------------------------------------------------------------------------
    weighted_sampling: bool = False  # AS-2M: draws per epoch without replacement, weighted by label rarity
    weights_file: str = ""  # per-clip weights (one per line or CSV last column); "" = computed from the labels
    epoch_draws: int = 200000  # clips drawn per epoch under weighted_sampling
    # --- linear evaluation --------------------------------------------------------------------------------------
    linear: str = "false"  # "false" | "true" (frozen encoder, augmented) | "cached" (features extracted once)
    linear_lr: float = 1e-3  # peak lr of linear evaluation, no warm-up
    # --- model size (as in TrainConfig) -------------------------------------------------------------------------
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)

    # --- derived values -----------------------------------------------------------------------------------------

    @property
    def loss(self) -> str:
        """``"bce"`` or ``"ce"``, as ``[E] models/EAT_audio_classification.py : MaeImageClassificationModel.forward``
        chooses it: BCE for multi-label sets (AudioSet, SPASS) and for SPC-2 under mixup (``spcv2_eval`` with a
        ``mixup_fn``), cross-entropy (soft-target under mixup) for the other single-label sets (ESC-50)."""
        if self.multilabel or (self.preset == "spc2" and self.mixup > 0):
            return "bce"
        return "ce"

    @property
    def train_label_smoothing(self) -> float:
        """The label smoothing upstream applies in training: ``label_smoothing`` on the cross-entropy path without
        mixup, 0 otherwise (its ``Mixup`` builds the mixed targets without smoothing, ``utils/mixup.py :
        mixup_target``, and the BCE path never smooths)."""
        return self.label_smoothing if self.loss == "ce" and self.mixup == 0 else 0.0

    @property
    def is_linear(self) -> bool:
        return self.linear != "false"

    @property
    def peak_lr(self) -> float:
        """The schedule's peak lr: ``linear_lr`` in linear evaluation, else ``lr``."""
        return self.linear_lr if self.is_linear else self.lr

    @property
    def schedule_warmup(self) -> int:
        """Warm-up updates of the schedule: none in linear evaluation (``linear_eval_SPASS.sh``), else
        ``warmup_updates``."""
        return 0 if self.is_linear else self.warmup_updates

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def grid(self) -> tuple[int, int]:
        """(time patches, frequency patches) of a ``target_length`` x 128 input."""
        return self.target_length // PATCH_SIZE, _MEL_PATCHES

    def model_config(self) -> ModelConfig:
        """The encoder's ``ModelConfig`` (``drop_path`` as ``drop_path_rate``); raises ConfigError if the sizes are
        inconsistent. The decoder and masking fields, unused by the classifier, are set to values valid for any
        width and depth."""
        try:
            return ModelConfig(
                embed_dim=self.embed_dim,
                depth=self.depth,
                num_heads=self.num_heads,
                grid=self.grid,
                decoder_dim=self.embed_dim,
                decoder_groups=math.gcd(16, self.embed_dim),
                average_top_k_layers=max(1, min(12, self.depth)),
                drop_path_rate=self.drop_path,
            )
        except ValueError as e:
            raise ConfigError(f"invalid model configuration: {e}") from e

    def to_dict(self) -> dict:
        """A plain dict (str, int, float, bool, lists) for saving inside checkpoints; ``from_dict`` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        """Rebuild (and validate) a config saved by ``to_dict``; unknown keys raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"a fine-tuning config must be a dict, got {type(d).__name__}")
        cfg = cls()
        _apply(cfg, dict(d), "dict", from_text=False)
        return cfg.validate()

    def validate(self) -> FinetuneConfig:
        """Raise ConfigError naming the first impossible value; returns self."""
        for ok, msg in _checks(self):
            if not ok:
                raise ConfigError(msg)
        self.model_config()
        return self


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _checks(c: FinetuneConfig) -> typing.Iterator[tuple[bool, str]]:
    yield c.device in ("auto", "cpu", "cuda"), f"device must be 'auto', 'cpu' or 'cuda', got {c.device!r}"
    yield c.precision in ("auto", "fp32", "bf16"), f"precision must be 'auto', 'fp32' or 'bf16', got {c.precision!r}"
    yield bool(c.run_dir), "run_dir must not be empty"
    yield c.seed >= 0, f"seed must be >= 0, got {c.seed}"
    yield c.num_workers >= 0, f"num_workers must be >= 0, got {c.num_workers}"
    for name in ("log_every", "eval_every", "save_every"):
        yield getattr(c, name) >= 1, f"{name} must be >= 1, got {getattr(c, name)}"
    yield 0 <= c.max_bad_file_share < 1, f"max_bad_file_share must lie in [0, 1), got {c.max_bad_file_share}"
    yield c.preset in ("", *PRESETS), f"preset must be '' or one of {', '.join(PRESETS)}, got {c.preset!r}"
    # data
    yield c.sample_rate > 0, f"sample_rate must be positive, got {c.sample_rate}"
    yield c.clip_seconds > 0 and _finite(c.clip_seconds), f"clip_seconds must be positive, got {c.clip_seconds}"
    yield c.clip_samples >= 400 * c.sample_rate // 16000, (
        f"clip_seconds={c.clip_seconds} is shorter than one 25 ms fbank frame")
    yield (
        c.target_length >= PATCH_SIZE and c.target_length % PATCH_SIZE == 0
        and c.target_length <= _MAX_TIME_PATCHES * PATCH_SIZE,
        f"target_length must be a positive multiple of {PATCH_SIZE} up to {_MAX_TIME_PATCHES * PATCH_SIZE}, "
        f"got {c.target_length}",
    )
    yield c.norm_std > 0, f"norm_std must be positive, got {c.norm_std}"
    yield c.num_classes >= 0, f"num_classes must be >= 0 (0 = from the labels), got {c.num_classes}"
    yield 0 <= c.fold <= 5, f"fold must be 1..5 (the ESC-50 held-out fold) or 0 (not folded), got {c.fold}"
    yield c.folds in ("", "all"), f"folds must be '' or 'all', got {c.folds!r}"
    # optimisation
    yield c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}"
    yield c.max_updates >= 1, f"max_updates must be >= 1, got {c.max_updates}"
    yield 0 <= c.warmup_updates <= c.max_updates, (
        f"warmup_updates must lie in [0, max_updates={c.max_updates}], got {c.warmup_updates}")
    for name in ("lr", "linear_lr"):
        v = getattr(c, name)
        yield v > 0 and _finite(v), f"{name} must be a positive finite number, got {v}"
    yield c.min_lr >= 0, f"min_lr must be >= 0, got {c.min_lr}"
    yield c.min_lr <= c.peak_lr, f"min_lr ({c.min_lr}) must not exceed the peak lr ({c.peak_lr})"
    yield len(c.betas) == 2 and all(0 <= b < 1 for b in c.betas), f"betas must be two values in [0, 1), got {c.betas}"
    yield c.adam_eps > 0, f"adam_eps must be positive, got {c.adam_eps}"
    yield c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}"
    yield 0 <= c.layer_decay <= 1, f"layer_decay must lie in [0, 1] (0 = off), got {c.layer_decay}"
    yield 0 <= c.drop_path < 1, f"drop_path must lie in [0, 1), got {c.drop_path}"
    yield c.clip_norm >= 0, f"clip_norm must be >= 0 (0 disables), got {c.clip_norm}"
    # augmentation
    yield c.mixup >= 0, f"mixup must be >= 0 (the Beta alpha; 0 = off), got {c.mixup}"
    yield 0 <= c.mixup_prob <= 1, f"mixup_prob must lie in [0, 1], got {c.mixup_prob}"
    yield c.mixup == 0 or c.batch_size % 2 == 0, (
        f"batch_size must be even under mixup (upstream's Mixup asserts it), got {c.batch_size}")
    yield 0 <= c.mask_ratio < 1, f"mask_ratio must lie in [0, 1), got {c.mask_ratio}"
    yield 0 <= c.label_smoothing < 1, f"label_smoothing must lie in [0, 1), got {c.label_smoothing}"
    # sampling
    yield c.epoch_draws >= 1, f"epoch_draws must be >= 1, got {c.epoch_draws}"
    yield c.weighted_sampling or not c.weights_file, (
        f"weights_file is set ({c.weights_file!r}) but weighted_sampling is false")
    # linear evaluation
    yield c.linear in ("false", "true", "cached"), f"linear must be 'false', 'true' or 'cached', got {c.linear!r}"


# --- presets -------------------------------------------------------------------------------------------------------

PRESETS: dict[str, FinetuneConfig] = {
    # AS-20K: [S] SSLAM_Ft_AS20K/scripts/finetuning_AS20KOrig.sh = [E] scripts/finetuning_AS20K.sh: batch 48, 40k
    # updates, 4k warm-up, T 1024, roll_aug, mixup 0.8, mask_ratio 0.2; lr 5e-5, min_lr 1e-6, betas, weight decay,
    # mixup_prob 0.9 from config/finetuning.yaml; drop path 0.1, layer decay 0.65 from MaeImageClassificationConfig.
    # Upstream validates at each epoch end (about 20k clips / 48 = 420 updates).
    "as20k": FinetuneConfig(preset="as20k", eval_every=400, save_every=400),
    # AS-2M: [S] SSLAM_Ft_AS2M/scripts/finetuning_AS2M.sh: batch 96, lr 5e-5, 400k updates, 40k warm-up,
    # AS2M_finetune (weighted sampling), num_samples 200000 draws per epoch, T 1024, roll_aug, mixup 0.8,
    # mask_ratio 0.2. ([E] scripts/finetuning_AS2M.sh leaves the yaml's 300k / 30k.) One epoch = 200000 / 96 clips.
    "as2m": FinetuneConfig(
        preset="as2m", batch_size=96, max_updates=400000, warmup_updates=40000, weighted_sampling=True,
        epoch_draws=200000, eval_every=2084, save_every=2084,
    ),
    # ESC-50: [E] scripts/finetuning_ESC50.sh: batch 48, 4k updates, 400 warm-up, T 512, roll_aug, mixup 0.0,
    # mask_ratio 0.4, label_smoothing 0.1, 50 classes, esc50_eval (single-label, accuracy); normalisation
    # -6.627 / 5.359 ([E] data/raw_audio_dataset.py); 5 s clips. The script runs one fold per run (test02 = fold 2).
    # One epoch = 1600 clips / 48 = 34 updates.
    "esc50": FinetuneConfig(
        preset="esc50", clip_seconds=5.0, target_length=512, norm_mean=-6.627, norm_std=5.359, num_classes=50,
        multilabel=False, fold=1, max_updates=4000, warmup_updates=400, mixup=0.0, mask_ratio=0.4,
        label_smoothing=0.1, eval_every=100, save_every=100,
    ),
    # SPC-2: [E] scripts/finetuning_SPCv2.sh: seed 42, batch 256, lr 2e-4, 40k updates, 4k warm-up, T 128, noise,
    # roll_aug, mixup 0.8, mask_ratio 0.2, label_smoothing 0.1 (inert under mixup, see train_label_smoothing), 35
    # classes, spcv2_eval (single-label, BCE under mixup, accuracy); normalisation -6.846 / 5.565; 1 s clips.
    # One epoch = 84843 clips / 256 = 332 updates.
    "spc2": FinetuneConfig(
        preset="spc2", seed=42, clip_seconds=1.0, target_length=128, norm_mean=-6.846, norm_std=5.565,
        num_classes=35, multilabel=False, batch_size=256, lr=2e-4, noise_aug=True, label_smoothing=0.1,
        eval_every=332, save_every=332,
    ),
    # SPASS (one scene per run): [S] SPASS_Finetune_LinearEval/SSLAM_Ft_SPASS/scripts/finetuning_SPASS.sh: batch 48,
    # lr 5e-5, 50 epochs of the 3750 training clips = 3750 * 50 // 48 = 3906 updates, warm-up 3906 // 10 = 390, T 1024,
    # roll_aug, mixup 0.8, mask_ratio 0.2, multi-label (BCE, mAP), classes from label_descriptors.csv (22-29);
    # normalisation -5.275 / 3.268 (SSLAM_Ft_SPASS/data/raw_audio_dataset.py : DATA_STATS). Linear evaluation
    # (--linear=true): SSLAM_LinearEval_SPASS/scripts/linear_eval_SPASS.sh, lr 1e-3, no warm-up, the rest the same.
    # One epoch = 3750 / 48 = 79 updates.
    "spass": FinetuneConfig(
        preset="spass", norm_mean=-5.275, norm_std=3.268, max_updates=3906, warmup_updates=390, eval_every=79,
        save_every=79,
    ),
    # The built-in synthetic polyphonic set (10 classes, 2.56 s clips) on the tiny encoder of train.py --preset=tiny
    # (ModelConfig.tiny(): D 64, 2 blocks, 4 heads): 256 x 128 inputs, 16 updates per epoch, a few minutes on 2 CPU
    # cores. The recipe is AS-20K's with a learning rate sized for a 2-block model.
    "tiny": FinetuneConfig(
        preset="tiny", run_dir="runs/finetune-tiny", clip_seconds=2.56, target_length=256, batch_size=16,
        max_updates=400, warmup_updates=40, lr=2e-3, num_workers=0, log_every=10, eval_every=100, save_every=100,
        embed_dim=64, depth=2, num_heads=4,
    ),
}


def load_finetune_config(argv: typing.Sequence[str] | None = None) -> FinetuneConfig:
    """Parse ``[--preset=NAME] [--config FILE] [--key=value ...]`` (default preset ``as20k``) into a validated
    FinetuneConfig; the same command line as ``train.py``. Raises ConfigError."""
    cfg, _ = parse_config_argv(argv, PRESETS, "as20k")
    return cfg.validate()
