"""The trainer's inputs: the data source of ``--data`` (the built-in set, a manifest, a folder of audio, HDF5 files in
upstream's ``h5_format`` layout or tar shards), its loader and resumable batch stream, and the features and masks of a
batch (ALGORITHM §1, §3).

Positions. A map-style source (manifest, folder, HDF5) is read in :class:`sslam_fast.data.ResumableSampler`'s order
and resumes exactly (``{"epoch", "batches_done"}``). Tar shards are streamed (:class:`sslam_fast.data.ShardDataset`)
and resume at shard granularity: each rank saves the shards it has finished this epoch, a resumed run reads the
others from their start (``sslam_fast/data/shards.py`` says what is replayed), and needs the same number of processes.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from sslam_fast.train.config import TrainConfig
from sslam_fast.train.distributed import DistEnv
from sslam_fast.train.runtime import Batches, NoReadableFile

__all__ = ["WorkerFeatures", "build_data", "default_data_root", "features", "make_batches", "masks"]


def default_data_root(run_dir: str | os.PathLike) -> Path:
    """Where the built-in synthetic set lives for ``cfg.data == ""``: ``<run_dir>/../default_data``."""
    return Path(run_dir).absolute().parent / "default_data"


def build_data(cfg: TrainConfig, env: DistEnv):
    """``(dataset, default_set)`` for ``cfg.data``: an ``AudioClipDataset`` (built-in set, manifest, folder), an
    ``HDF5ClipDataset`` or this rank's ``ShardDataset``; ``default_set`` is the built-in set or None. Raises
    ``DataError`` for a source with fewer clips than one batch on every rank (map-style sources)."""
    from sslam_fast.data import (
        AudioClipDataset,
        DataError,
        HDF5ClipDataset,
        ShardDataset,
        is_hdf5_source,
        is_shard_source,
        make_default_dataset,
    )

    default_set = None
    if cfg.data == "":
        default_set = make_default_dataset(default_data_root(cfg.run_dir))  # made by rank 0 beforehand: only reads
        source = default_set.train_manifest
    else:
        source = cfg.data
    if is_shard_source(str(source)):
        return ShardDataset(source, cfg.clip_samples, sample_rate=cfg.sample_rate, seed=cfg.seed, rank=env.rank,
                            world_size=env.world, shuffle_buffer=cfg.shuffle_buffer), None
    if is_hdf5_source(str(source)):
        dataset = HDF5ClipDataset(source, cfg.clip_samples, sample_rate=cfg.sample_rate, seed=cfg.seed)
    else:
        dataset = AudioClipDataset(source, cfg.clip_samples, sample_rate=cfg.sample_rate, seed=cfg.seed)
    need = cfg.batch_size * env.world  # what ResumableSampler needs for one batch on every rank
    if len(dataset) < need:
        raise DataError(f"{source} holds {len(dataset)} audio file(s), fewer than one batch: batch_size="
                        f"{cfg.batch_size} on each of {env.world} process(es) needs {need}; lower --batch_size or "
                        f"add data")
    return dataset, default_set


def make_batches(cfg: TrainConfig, env: DistEnv, dataset, saved: dict | None):
    """The loader of ``dataset`` and the batch stream the step reads: ``.next(bad) -> (batch, readable clips)`` and
    ``.position()`` (what a checkpoint saves for this rank). ``saved`` is the resumed checkpoint's trainer state (its
    ``position`` / ``positions``) or None. Audio leaves the workers as int16 (half float32's bytes) in pinned memory on
    a GPU run; fbank and masks are computed in the step (or in the workers with ``features_in_workers``)."""
    from sslam_fast.data import DataError, ResumableSampler, ShardBatches, ShardCollate, ShardDataset, collate

    inner = WorkerFeatures(cfg) if cfg.features_in_workers else collate
    if isinstance(dataset, ShardDataset):
        state = None
        if saved is not None:
            positions = saved.get("positions") or [saved.get("position")]
            if len(positions) != env.world or not isinstance(positions[env.rank], dict) \
                    or "shards_done" not in positions[env.rank]:
                raise DataError(f"the checkpoint's data position is not one of {cfg.data} on {env.world} "
                                f"process(es) (saved for {len(positions)} process(es), over "
                                f"{'shards' if 'shards_done' in (positions[0] or {}) else 'a manifest or folder'}); "
                                "resume with the data and process count the run started with")
            state = positions[env.rank]
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, drop_last=True,
                                             collate_fn=ShardCollate(dataset, inner),
                                             num_workers=cfg.num_workers, pin_memory=env.cuda)
        try:
            return ShardBatches(dataset, loader, batch_size=cfg.batch_size, state=state, error_type=NoReadableFile)
        except ValueError as e:  # a saved state of other shards
            raise DataError(f"{cfg.data}: cannot resume here: {e}") from None
    sampler = ResumableSampler(len(dataset), batch_size=cfg.batch_size, seed=cfg.seed, rank=env.rank,
                               world_size=env.world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=inner,
                                         num_workers=cfg.num_workers, pin_memory=env.cuda,
                                         generator=torch.Generator())  # not the global RNG: exact resume
    epoch, done = 0, 0
    if saved is not None:
        pos = saved["position"]
        if "shards_done" in pos:
            raise DataError(f"the checkpoint's data position is over tar shards, {cfg.data or 'the built-in set'} "
                            "is not; resume with the data the run started with")
        epoch, done = pos["epoch"], pos["batches_done"]
    return Batches(cfg, dataset, loader, sampler, epoch, done)


def features(cfg: TrainConfig, batch: dict, device) -> torch.Tensor:
    """(B, 1, T, 128) normalised log-mels of a collated batch, computed on ``device`` (int16 scaled to [-1, 1])."""
    from sslam_fast.ops import eat_features

    # pinned by the loader on a GPU run, so neither copy waits; int16 PCM is scaled by 1 / 32768 inside eat_features
    audio = batch["audio"].to(device, non_blocking=True)
    lengths = batch["lengths"].to(device, non_blocking=True)
    return eat_features(audio, lengths, sample_rate=cfg.sample_rate, target_length=cfg.target_length,
                        norm_mean=cfg.norm_mean, norm_std=cfg.norm_std)


def masks(cfg: TrainConfig, batch_size: int, device, *, generator: torch.Generator | None = None,
          seed: int | None = None) -> torch.Tensor:
    """The (batch_size * clones, patches) inverse-block masks of a batch (ALGORITHM §3)."""
    from sslam_fast.ops import inverse_block_mask

    return inverse_block_mask(batch_size, cfg.clones, grid=cfg.grid, mask_prob=cfg.mask_prob,
                              mask_length=cfg.mask_length, mask_prob_adjust=cfg.mask_prob_adjust,
                              generator=generator, seed=seed, device=device)


class WorkerFeatures:
    """The loader's ``collate_fn`` for ``features_in_workers=True``: collate, then fbank and masks on the CPU in the
    loader worker (where upstream computes them), added to the batch as ``fbank`` and ``masks``.

    The masks of a batch are seeded from ``cfg.seed`` and the batch's item indices in order, so they do not depend on
    which worker builds the batch, and a resumed run draws the same ones."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self, items: list) -> dict:
        from sslam_fast.data import collate

        batch = collate(items)
        B = batch["audio"].shape[0]
        if B == 0:
            return batch
        seed = zlib.crc32(batch["indices"].numpy().tobytes(), self.cfg.seed & 0xFFFFFFFF)
        with torch.no_grad():
            batch["fbank"] = features(self.cfg, batch, torch.device("cpu"))
            batch["masks"] = masks(self.cfg, B, torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
        return batch
