"""The gather and restore indices of a mask (``make_maskinfo``, ALGORITHM §3).

``mask_indices`` is a plain function, not a custom op: a stable sort and a scatter, two ATen calls that run on every
device and that ``torch.compile`` traces through. A custom op would add nothing but an opaque node with a
data-dependent output width (the kept count k), which would need an unbacked SymInt in its fake kernel.
"""

from __future__ import annotations

import torch

from sslam_fast._checks import FLOAT_DTYPES, INT_DTYPES, check_finite, check_tensor
from sslam_fast.reference import mask_indices as ref

__all__ = ["mask_indices"]


def mask_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather and restore indices of a mask (``make_maskinfo``, ALGORITHM §3).

    Args:
        mask: (R, N) bool, integer or float (finite); nonzero = masked. Every row must keep the same count k.

    Returns:
        ``ids_keep`` (R, k) int64: the kept (zero) token indices of each row, ascending; ``ids_restore`` (R, N) int64:
        the inverse of the permutation ``[kept ascending, masked ascending]``, so
        ``torch.cat([kept_tokens, masked_tokens], 1).gather(1, ids_restore)`` restores the original token order.
        Validation costs one host sync (the kept counts decide k).
    """
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool, *INT_DTYPES, *FLOAT_DTYPES))
    check_finite("mask", mask)
    kept = (mask == 0).sum(dim=1)
    lo, hi = (int(v) for v in torch.stack([kept.min(), kept.max()]).tolist()) if mask.shape[0] else (0, 0)
    if lo != hi:
        raise ValueError(f"mask must keep the same number of tokens on every row, got kept counts from {lo} to {hi}")
    return ref.mask_indices(mask, lo)
