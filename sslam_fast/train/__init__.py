"""The lean pre-training trainer behind ``train.py`` (single process or ``torchrun``): configuration, the training loop,
optimiser / schedule, run-state helpers and the end-of-run linear probe."""

from sslam_fast.train.config import PRESETS, ConfigError, TrainConfig, load_config
from sslam_fast.train.loop import TrainingError, default_data_root, train
from sslam_fast.train.optim import build_optimizer, build_scheduler, lr_at, param_groups
from sslam_fast.train.probe import linear_probe
from sslam_fast.train.state import GracefulExit, capture_rng_state, find_latest_checkpoint, restore_rng_state

__all__ = [
    "PRESETS",
    "ConfigError",
    "GracefulExit",
    "TrainConfig",
    "TrainingError",
    "build_optimizer",
    "build_scheduler",
    "capture_rng_state",
    "default_data_root",
    "find_latest_checkpoint",
    "linear_probe",
    "load_config",
    "lr_at",
    "param_groups",
    "restore_rng_state",
    "train",
]
