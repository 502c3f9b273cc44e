"""Trainer configuration: every hyper-parameter of ALGORITHM §6-§7 plus the run settings, presets and a small CLI
parser.

Upstream sources: ``[E] config/pretraining_AS2M.yaml`` and ``scripts/pretraining_AS2M.sh`` (stage 1, EAT),
``[S] S2/scripts/pretrain_stage2.sh`` (stage 2, SSLAM overrides on the same yaml).

Precedence in :func:`load_config`: dataclass defaults < ``--preset=NAME`` < ``--config FILE`` (YAML) < ``--key=value``.
Every value is validated before any work starts; a bad one raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from sslam_fast.models.config import ModelConfig

__all__ = ["ConfigError", "PRESETS", "TrainConfig", "load_config"]

# ALGORITHM §2.1: 16 x 16 patches; frames are 10 ms apart with a 25 ms window (Kaldi fbank, ALGORITHM §1)
PATCH_SIZE = 16
_FRAME_SHIFT = 160  # samples at 16 kHz
_FRAME_LENGTH = 400


class ConfigError(ValueError):
    """An unknown key, a malformed value or an impossible combination in the training configuration."""


@dataclass
class TrainConfig:
    """Run settings and hyper-parameters. Defaults are stage 1 (EAT, ALGORITHM §7); see ``PRESETS`` for stage 2 and
    tiny."""

    # --- run -----------------------------------------------------------------------------------------------------
    stage: str = "eat"  # "eat" (stage 1) | "sslam" (stage 2)
    init_checkpoint: str = ""  # stage 2 starts from an EAT checkpoint (student from model, teacher from _ema)
    data: str = ""  # manifest path, folder, or "" for the built-in default set
    run_dir: str = "runs/default"
    seed: int = 1  # common.seed; torch.manual_seed(seed + num_updates) every step (ALGORITHM §6)
    batch_size: int = 12  # clips per process
    clip_seconds: float = 10.0
    sample_rate: int = 16000
    target_length: int = 1024  # frames after crop / pad (ALGORITHM §1)
    grad_accum: int = 1
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK when CUDA is present, else CPU) | "cpu" | "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16" (bf16 autocast, CPU too)
    compile: bool = False  # torch.compile the model's forward + losses (inductor)
    num_workers: int = 8
    features_in_workers: bool = False  # fbank + masks in the loader workers (upstream's placement), not in the step
    shuffle_buffer: int = 1000  # clips each loader worker shuffles through when --data names tar shards
    log_every: int = 100
    tensorboard: bool = False  # also write TensorBoard scalars to <run_dir>/tensorboard (needs tensorboard)
    save_every_updates: int = 10000
    keep_checkpoints: int = 3  # numbered checkpoints kept besides checkpoint_last.pt; 0 keeps all
    max_bad_file_share: float = 0.05
    max_nonfinite_in_row: int = 20
    # --- optimiser and schedule (ALGORITHM §6) ------------------------------------------------------------------------
    lr: float = 5e-4
    warmup_updates: int = 53333
    max_updates: int = 400000
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    weight_decay: float = 0.05
    clip_norm: float = 4.0  # global L2 norm after normalisation; 0 disables
    # --- EMA teacher (ALGORITHM §4) -----------------------------------------------------------------------------------
    ema_start: float = 0.9998
    ema_end: float = 0.99999
    ema_end_step: int = 100000
    # --- masking and objectives (ALGORITHM §3-§5) ---------------------------------------------------------------------
    clones: int = 16
    mask_prob: float = 0.8
    mask_length: int = 5
    mask_prob_adjust: float = 0.07
    mask_noise_std: float = 0.01
    average_top_k_layers: int = 12
    cls_loss_weight: float = 1.0
    mix_window_frames: int = 240
    norm_mean: float = -4.268
    norm_std: float = 4.569
    # --- model size (names as in sslam_fast.models.ModelConfig) --------------------------------------------------
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    grid: tuple[int, int] = (64, 8)  # (time patches = target_length / 16, frequency patches)
    decoder_layers: int = 6
    decoder_groups: int = 16

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.grid = tuple(int(g) for g in self.grid)

    def model_config(self) -> ModelConfig:
        """The ``ModelConfig`` of this run (raises ConfigError if the model fields are inconsistent)."""
        try:
            return ModelConfig(decoder_dim=self.embed_dim, **{name: getattr(self, name) for name in _MODEL_FIELDS})
        except ValueError as e:
            raise ConfigError(f"invalid model configuration: {e}") from e

    def to_dict(self) -> dict:
        """A plain dict (str, int, float, bool, lists) for saving inside checkpoints; ``from_dict`` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild (and validate) a config saved by ``to_dict``; unknown keys raise ConfigError."""
        cfg = cls()
        _apply(cfg, dict(d), "dict", from_text=False)
        cfg.validate()
        return cfg

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    def validate(self) -> TrainConfig:
        """Raise ConfigError on any impossible value; returns self."""
        err = _first_error(self)
        if err:
            raise ConfigError(err)
        self.model_config()
        return self


def _first_error(c: TrainConfig) -> str | None:
    checks = [
        (c.stage in ("eat", "sslam"), f"stage must be 'eat' or 'sslam', got {c.stage!r}"),
        (c.device in ("auto", "cpu", "cuda"), f"device must be 'auto', 'cpu' or 'cuda', got {c.device!r}"),
        (c.precision in ("auto", "fp32", "bf16"), f"precision must be 'auto', 'fp32' or 'bf16', got {c.precision!r}"),
        (c.lr > 0 and math.isfinite(c.lr), f"lr must be a positive finite number, got {c.lr}"),
        (c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}"),
        (c.grad_accum >= 1, f"grad_accum must be >= 1, got {c.grad_accum}"),
        (c.max_updates >= 1, f"max_updates must be >= 1, got {c.max_updates}"),
        (c.warmup_updates >= 0, f"warmup_updates must be >= 0, got {c.warmup_updates}"),
        (
            c.warmup_updates <= c.max_updates,
            f"warmup_updates ({c.warmup_updates}) must not exceed max_updates ({c.max_updates})",
        ),
        (
            c.target_length >= PATCH_SIZE and c.target_length % PATCH_SIZE == 0,
            f"target_length must be a positive multiple of {PATCH_SIZE}, got {c.target_length}",
        ),
        (
            c.grid[0] * PATCH_SIZE == c.target_length,
            f"grid[0] * {PATCH_SIZE} ({c.grid[0] * PATCH_SIZE}) must equal target_length ({c.target_length})",
        ),
        (len(c.grid) == 2 and c.grid[1] >= 1, f"grid must be (time patches, frequency patches), got {c.grid}"),
        (c.sample_rate > 0, f"sample_rate must be positive, got {c.sample_rate}"),
        (c.clip_seconds > 0 and math.isfinite(c.clip_seconds), f"clip_seconds must be positive, got {c.clip_seconds}"),
        (
            _num_frames(c) >= PATCH_SIZE,
            f"clip_seconds={c.clip_seconds} at sample_rate={c.sample_rate} gives {_num_frames(c)} fbank frames, "
            f"shorter than one patch ({PATCH_SIZE} frames)",
        ),
        (len(c.betas) == 2 and all(0 <= b < 1 for b in c.betas), f"betas must be two values in [0, 1), got {c.betas}"),
        (c.adam_eps > 0, f"adam_eps must be positive, got {c.adam_eps}"),
        (c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}"),
        (c.clip_norm >= 0, f"clip_norm must be >= 0 (0 disables), got {c.clip_norm}"),
        (0 < c.ema_start <= c.ema_end <= 1, f"need 0 < ema_start <= ema_end <= 1, got {c.ema_start}, {c.ema_end}"),
        (c.ema_end_step >= 1, f"ema_end_step must be >= 1, got {c.ema_end_step}"),
        (c.clones >= 1, f"clones must be >= 1, got {c.clones}"),
        (0 <= c.mask_prob < 1, f"mask_prob must lie in [0, 1), got {c.mask_prob}"),
        (c.mask_length >= 1, f"mask_length must be >= 1, got {c.mask_length}"),
        (c.mask_noise_std >= 0, f"mask_noise_std must be >= 0, got {c.mask_noise_std}"),
        (c.norm_std > 0, f"norm_std must be positive, got {c.norm_std}"),
        (c.num_workers >= 0, f"num_workers must be >= 0, got {c.num_workers}"),
        (c.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {c.shuffle_buffer}"),
        (c.log_every >= 1, f"log_every must be >= 1, got {c.log_every}"),
        (c.save_every_updates >= 1, f"save_every_updates must be >= 1, got {c.save_every_updates}"),
        (c.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0 (0 keeps all), got {c.keep_checkpoints}"),
        (0 <= c.max_bad_file_share < 1, f"max_bad_file_share must lie in [0, 1), got {c.max_bad_file_share}"),
        (c.max_nonfinite_in_row >= 1, f"max_nonfinite_in_row must be >= 1, got {c.max_nonfinite_in_row}"),
        (
            c.mix_window_frames <= c.target_length or c.stage == "eat",
            f"mix_window_frames ({c.mix_window_frames}) must not exceed target_length ({c.target_length})",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            return msg
    return None


# TrainConfig fields that are ModelConfig fields of the same name (the decoder width follows embed_dim).
_MODEL_FIELDS = (
    "embed_dim", "depth", "num_heads", "grid", "decoder_layers", "decoder_groups", "clones", "mask_prob",
    "mask_length", "mask_prob_adjust", "mask_noise_std", "average_top_k_layers", "cls_loss_weight", "stage",
    "mix_window_frames",
)


def _model_fields(model: ModelConfig) -> dict:
    return {name: getattr(model, name) for name in _MODEL_FIELDS}


def _num_frames(c: TrainConfig) -> int:
    n = int(round(c.clip_seconds * 16000))  # fbank frames are 25 ms / 10 ms at 16 kHz whatever the file rate
    return 0 if n < _FRAME_LENGTH else 1 + (n - _FRAME_LENGTH) // _FRAME_SHIFT


# --- presets -----------------------------------------------------------------------------------------------------

PRESETS: dict[str, TrainConfig] = {
    # Stage 1, ALGORITHM §7: 4 x 12 clips, K = 16, 5e-4 / 53,333 / 400,000.
    "eat-as2m": TrainConfig(),
    # Stage 2, ALGORITHM §7: from EAT epoch 10, K = 8 on a doubled batch, 5e-5 / 25,000 / 200,000, save each epoch.
    "sslam-as2m": TrainConfig(
        stage="sslam", clones=8, lr=5e-5, warmup_updates=25000, max_updates=200000, save_every_updates=40262
    ),
    # CPU smoke run on ModelConfig.tiny(): 256 frames = 2.56 s clips.
    "tiny": TrainConfig(
        run_dir="runs/tiny",
        **_model_fields(ModelConfig.tiny()),
        target_length=256,
        clip_seconds=2.56,
        batch_size=8,
        lr=1e-3,
        warmup_updates=40,
        max_updates=800,
        ema_end_step=400,
        num_workers=0,
        log_every=10,
        save_every_updates=100,
    ),
}


# --- parsing -------------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_types(cls: type = TrainConfig) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(name: str, tp: typing.Any, value: typing.Any, from_text: bool, where: str) -> typing.Any:
    """Convert ``value`` to the field type ``tp``; strings are parsed, other values (YAML) are type-checked."""

    def bad(why: str = "") -> ConfigError:
        return ConfigError(f"{where}: bad value {value!r} for {name} (expected {_type_name(tp)}){why}")

    if typing.get_origin(tp) is tuple:
        elem = typing.get_args(tp)
        if isinstance(value, str):
            parts = [p.strip() for p in value.strip("()[] ").split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise bad()
        if len(parts) != len(elem):
            raise bad(f": needs {len(elem)} comma-separated values")
        return tuple(_convert(name, t, p, isinstance(p, str), where) for t, p in zip(elem, parts))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad(" (true/false/1/0)")
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                raise bad() from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not math.isfinite(out):
            raise bad(": must be finite")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not from_text:
            return str(value)
        raise bad()
    raise bad()  # pragma: no cover - every field has one of the types above


def _type_name(tp: typing.Any) -> str:
    if typing.get_origin(tp) is tuple:
        return "tuple of " + ",".join(_type_name(t) for t in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _apply(cfg, updates: dict, where: str, from_text: bool) -> set[str]:
    """Set the fields named in ``updates`` on the config dataclass ``cfg`` (any of them: ``TrainConfig``, the
    fine-tuning config) after converting each value to its field type; returns the keys set."""
    types = _field_types(type(cfg))
    for key, value in updates.items():
        if not isinstance(key, str) or key not in types:
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {', '.join(sorted(types))})")
        setattr(cfg, key, _convert(key, types[key], value, from_text, where))
    return set(updates)


def _load_yaml(path: str) -> dict:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - pyyaml is in requirements.txt
        raise ConfigError("--config needs PyYAML (pip install pyyaml)") from e
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of field -> value, got {type(data).__name__}")
    return data


def load_config(argv: typing.Sequence[str] | None = None) -> TrainConfig:
    """Parse ``[--preset=NAME] [--config FILE] [--key=value ...]`` into a validated TrainConfig.

    The preset (default ``eat-as2m``) is applied first, then the YAML file, then the ``--key=value`` overrides, whatever
    their order on the command line. ``--key value`` is accepted too. If only one of ``target_length`` / ``grid`` is
    set by the file or the CLI, the other follows it (grid[0] = target_length / 16). Raises ConfigError.
    """
    cfg, touched = parse_config_argv(argv, PRESETS, "eat-as2m")
    if "target_length" in touched and "grid" not in touched and cfg.target_length % PATCH_SIZE == 0:
        cfg.grid = (cfg.target_length // PATCH_SIZE, cfg.grid[1])
    elif "grid" in touched and "target_length" not in touched:
        cfg.target_length = cfg.grid[0] * PATCH_SIZE
    return cfg.validate()


def config_help(doc: str, presets: dict, argv: typing.Sequence[str]) -> str | None:
    """The ``--help`` / ``-h`` text of ``train.py`` / ``finetune.py`` when ``argv`` asks for it, else None: ``doc``,
    then every setting with its value in the preset named by ``--preset=NAME`` (default: the first preset listed)."""
    if not any(a in ("-h", "--help") for a in argv):
        return None
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), next(iter(presets)))
    if name not in presets:
        name = next(iter(presets))
    cfg = presets[name]
    lines = [doc.strip(), "", f"Settings, as --key=value (values of --preset={name}; presets: {', '.join(presets)}):"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        lines.append(f"  --{f.name}={value}")
    return "\n".join(lines)


def parse_config_argv(argv: typing.Sequence[str] | None, presets: dict, default_preset: str) -> tuple[typing.Any, set]:
    """The command-line layering shared by ``train.py`` and ``finetune.py``: returns (config, keys set by the file or
    the CLI), not yet validated.

    ``argv`` (default ``sys.argv[1:]``) holds ``--preset=NAME`` (a key of ``presets``, default ``default_preset``),
    ``--config FILE`` (YAML) and ``--key=value`` / ``--key value`` overrides; dashes in keys read as underscores. The
    preset is applied first, then the file, then the overrides, whatever their order. Raises ConfigError.
    """
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    preset, config_file, overrides = None, None, {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r} (use --key=value)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"{arg} needs a value (use --key=value)")
            key, value = arg[2:], args[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if key == "preset":
            preset = value
        elif key == "config":
            config_file = value
        elif key in overrides:
            raise ConfigError(f"--{key} given twice")
        else:
            overrides[key] = value
    name = preset if preset is not None else default_preset
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(presets)})")
    cfg = dataclasses.replace(presets[name])
    touched = set()
    if config_file is not None:
        touched |= _apply(cfg, _load_yaml(config_file), f"--config {config_file}", from_text=False)
    touched |= _apply(cfg, overrides, "command line", from_text=True)
    return cfg, touched
