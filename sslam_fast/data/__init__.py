"""Trainer data: manifests and clip decoding (``dataset``) and the synthetic default set (``synthetic``)."""

from .dataset import AudioClipDataset, BadFileMonitor, DataError, ResumableSampler, collate, read_manifest
from .synthetic import CLASS_NAMES, DefaultSet, make_default_dataset

__all__ = [
    "CLASS_NAMES",
    "AudioClipDataset",
    "BadFileMonitor",
    "DataError",
    "DefaultSet",
    "ResumableSampler",
    "collate",
    "make_default_dataset",
    "read_manifest",
]
