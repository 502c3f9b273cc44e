"""Trainer data: manifests and clip decoding (``dataset``), tar shards (``shards``), HDF5 audio (``hdf5``) and the
synthetic default set (``synthetic``)."""

from .dataset import AudioClipDataset, BadFileMonitor, DataError, ResumableSampler, collate, read_manifest
from .hdf5 import HDF5ClipDataset, is_hdf5_source
from .shards import ShardBatches, ShardCollate, ShardDataset, is_shard_source
from .synthetic import CLASS_NAMES, DefaultSet, make_default_dataset

__all__ = [
    "CLASS_NAMES",
    "AudioClipDataset",
    "BadFileMonitor",
    "DataError",
    "DefaultSet",
    "HDF5ClipDataset",
    "ResumableSampler",
    "ShardBatches",
    "ShardCollate",
    "ShardDataset",
    "collate",
    "is_hdf5_source",
    "is_shard_source",
    "make_default_dataset",
    "read_manifest",
]
