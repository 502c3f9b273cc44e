"""The gather and restore indices of a mask in plain PyTorch (ALGORITHM §3): the definition and the test oracle.

Builds the two index tensors of ``[E] models/base.py : make_maskinfo`` with a stable sort.
"""

from __future__ import annotations

import torch


def mask_indices(mask: torch.Tensor, num_keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_keep, ids_restore)`` of a (R, N) mask (nonzero = masked) with the same kept count k on every row.

    ``ids_keep`` (R, k) lists the kept tokens ascending; ``ids_restore`` (R, N) inverts the permutation
    ``[kept ascending, masked ascending]``, so ``cat(kept, masked).gather(1, ids_restore)`` is the original order.
    ``num_keep`` is k when the caller knows it (else read from row 0). Upstream (``[E] models/base.py :
    make_maskinfo``) builds the same two index tensors with an unstable ``argsort``, so its kept tokens come in an
    arbitrary order; ALGORITHM §3 shows the order is immaterial, and a stable sort makes it ascending.
    """
    masked = (mask != 0).to(torch.uint8)
    ids_shuffle = torch.sort(masked, dim=1, stable=True).indices  # kept (0) ascending, then masked (1) ascending
    if num_keep is None:
        num_keep = mask.shape[1] - int(masked[0].sum()) if mask.shape[0] else 0
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(ids_shuffle)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, pos)
    return ids_shuffle[:, :num_keep], ids_restore
