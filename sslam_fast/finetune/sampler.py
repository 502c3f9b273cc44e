"""AS-2M's weighted sampling: per-clip weights from label rarity and a fixed number of draws per epoch without
replacement (docs/ALGORITHM.md §9).

Upstream: ``[E] data/mae_image_dataset.py : MaeImageDataset.ordered_indices`` with ``AS2M_finetune``: the weights of
``task.weights_file`` (``np.loadtxt``: one value per line), normalised, and ``torch.multinomial(weights,
num_samples=200000, replacement=False)`` as the order of each epoch. The weights file is AudioMAE's: label weight
``1000 / (count + 0.01)`` over the training labels, clip weight = the sum of its labels' weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sslam_fast.data.dataset import DataError

__all__ = ["WeightedEpochSampler", "label_weights", "read_weights"]

LABEL_WEIGHT_SCALE = 1000.0
LABEL_COUNT_OFFSET = 0.01


def label_weights(labels: torch.Tensor) -> torch.Tensor:
    """(N, C) label matrix (bool, or numbers where > 0 means present) -> (N,) float64 clip weights: each label c
    weighs ``1000 / (count_c + 0.01)`` with ``count_c`` the clips that carry it, each clip the sum over its labels
    (0 for a clip without labels)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an (N, C) tensor, got {got}")
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        raise ValueError("labels contains non-finite values")
    present = (labels > 0).to(torch.float64)
    label_weight = LABEL_WEIGHT_SCALE / (present.sum(0) + LABEL_COUNT_OFFSET)
    return present @ label_weight


def read_weights(path: str | os.PathLike, n: int) -> torch.Tensor:
    """The ``n`` per-clip weights of a weights file as (n,) float64: one number per line, or per CSV line its last
    column (a first line that is not a number is a header). Raises :class:`DataError` for a missing file, a line that
    is not a number, a count other than ``n``, negative or non-finite weights, or all zeros."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file {path}: no such file")
    values = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"weights file {path} is not a text file") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        field = line.rsplit(",", 1)[-1].strip()
        try:
            values.append(float(field))
        except ValueError:
            if lineno == 1:
                continue  # a CSV header
            raise DataError(f"weights file {path} line {lineno}: expected a number, got {line!r}") from None
    w = torch.tensor(values, dtype=torch.float64)
    if len(w) != n:
        raise DataError(f"weights file {path} holds {len(w)} weights but the training set has {n} clips")
    _check_weights(w, f"weights file {path}", DataError)
    return w


def _check_weights(w: torch.Tensor, what: str, error: type[Exception]) -> None:
    if not bool(torch.isfinite(w).all()):
        raise error(f"{what} holds non-finite weights")
    if bool((w < 0).any()):
        raise error(f"{what} holds negative weights (min {float(w.min())})")
    if not bool((w > 0).any()):
        raise error(f"{what} holds only zero weights")


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit seed for (seed, epoch), distinct for distinct pairs (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


class WeightedEpochSampler(torch.utils.data.Sampler[int]):
    """Each epoch, ``torch.multinomial(weights, num_draws, replacement=False)`` with a CPU generator seeded by (seed,
    epoch): the same draws on every rank, which then takes every ``world_size``-th of the first ``num_draws //
    world_size * world_size`` (no clip twice in an epoch, none on two ranks; the ``num_draws % world_size`` last are
    dropped so that ranks stay in step).

    ``set_epoch(e)`` selects the epoch and restarts it; ``set_start(k)`` then skips this rank's first ``k`` indices of
    the epoch (resuming after ``k`` clips); ``len()`` is the count still to come.
    """

    def __init__(self, weights, num_draws: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        w = weights.detach() if isinstance(weights, torch.Tensor) else torch.as_tensor(np.asarray(weights, np.float64))
        if w.dim() != 1:
            raise ValueError(f"weights must be 1-D (one per clip), got shape {tuple(w.shape)}")
        w = w.to("cpu", torch.float64)
        _check_weights(w, "weights", ValueError)
        for name, v in (("num_draws", num_draws), ("seed", seed), ("rank", rank), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank} of {world_size}")
        positive = int((w > 0).sum())
        if not world_size <= num_draws <= positive:
            raise ValueError(
                f"num_draws must lie in [world_size={world_size}, {positive}] (draws without replacement need as "
                f"many clips of positive weight), got {num_draws}")
        self.weights, self.num_draws, self.seed = w, num_draws, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = num_draws // world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch, self.start = epoch, 0

    def set_start(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.per_rank:
            raise ValueError(f"start must be an int in [0, {self.per_rank}] (this rank's draws per epoch), got {k!r}")
        self.start = k

    def epoch_indices(self) -> torch.Tensor:
        """This rank's (per_rank,) int64 indices of the current epoch, before ``set_start``'s skip."""
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, self.num_draws, replacement=False, generator=g)
        return draws[self.rank : self.per_rank * self.world_size : self.world_size]

    def __iter__(self):
        return iter(self.epoch_indices()[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
