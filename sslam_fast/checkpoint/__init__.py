"""Upstream checkpoint formats (ALGORITHM §8): read fairseq EAT / SSLAM pre-training and fine-tuned files and HF
safetensors
ports without fairseq and without unrestricted unpickling; write fairseq-layout files atomically.

``load_pretrained(path)`` -> ``EATEncoder`` or ``AudioClassifier``; ``load_pretraining(path, stage, clones)`` ->
``PretrainingModel``; ``detect_format`` / ``map_state_dict`` for the dict level. Files written here carry a
per-tensor checksum that every read checks (``CorruptCheckpointError`` for damaged bytes).
"""

from sslam_fast.checkpoint._api import (
    detect_format,
    fairseq_pretrain_cfg,
    infer_config,
    load_checkpoint,
    load_module_state,
    load_pretrained,
    load_pretraining,
    save_finetuned_checkpoint,
    save_pretraining_checkpoint,
)
from sslam_fast.checkpoint._io import (
    CheckpointError,
    CorruptCheckpointError,
    atomic_torch_save,
    read_checkpoint_file,
    safe_globals,
    tensor_checksums,
    verify_checksums,
)
from sslam_fast.checkpoint._keys import FORMATS, map_state_dict

__all__ = [
    "FORMATS",
    "CheckpointError",
    "CorruptCheckpointError",
    "atomic_torch_save",
    "detect_format",
    "fairseq_pretrain_cfg",
    "infer_config",
    "load_checkpoint",
    "load_module_state",
    "load_pretrained",
    "load_pretraining",
    "map_state_dict",
    "read_checkpoint_file",
    "safe_globals",
    "save_finetuned_checkpoint",
    "save_pretraining_checkpoint",
    "tensor_checksums",
    "verify_checksums",
]
