"""Gather and restore indices of a mask (ALGORITHM §3, ``make_maskinfo``): mask_indices against the definition and
upstream's argsort, and its validation."""

from __future__ import annotations

import pytest
import torch

from sslam_fast.ops.mask_indices import mask_indices
from sslam_fast.reference import mask_indices as ref


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("R,N,k", [(1, 17, 5), (7, 512, 102), (3, 13, 0), (4, 31, 31)], ids=lambda v: str(v))
def test_mask_indices(R, N, k, dtype):
    g = torch.Generator().manual_seed(R * N + k)
    keep = torch.rand(R, N, generator=g).argsort(1)[:, :k]
    mask = torch.ones(R, N, dtype=torch.bool).scatter_(1, keep, False).to(dtype)
    ids_keep, ids_restore = mask_indices(mask)
    assert ids_keep.dtype == ids_restore.dtype == torch.int64 and ids_keep.shape == (R, k)
    for r in range(R):
        assert ids_keep[r].tolist() == (mask[r] == 0).nonzero().flatten().tolist()  # kept, ascending
    x = torch.randn(R, N, 3, generator=g)
    masked_ids = torch.stack([(mask[r] != 0).nonzero().flatten() for r in range(R)]) if k < N else ids_keep[:, :0]
    parts = [x.gather(1, ids_keep[..., None].expand(-1, -1, 3)), x.gather(1, masked_ids[..., None].expand(-1, -1, 3))]
    assert torch.equal(torch.cat(parts, 1).gather(1, ids_restore[..., None].expand(-1, -1, 3)), x)
    # upstream's unstable argsort keeps the same set of tokens
    upstream = torch.argsort(mask.to(torch.uint8), dim=1)[:, :k]
    assert torch.equal(upstream.sort(1).values, ids_keep)


def test_mask_indices_bad_input():
    with pytest.raises(ValueError, match="same number"):
        mask_indices(torch.tensor([[True, False, False], [True, True, False]]))
    with pytest.raises(ValueError, match="mask must have 2"):
        mask_indices(torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        mask_indices([[0, 1]])
    with pytest.raises(TypeError, match="mask"):
        mask_indices(torch.zeros(2, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="mask contains non-finite"):
        mask_indices(torch.tensor([[0.0, float("nan")]]))


def test_reference_takes_the_kept_count_or_reads_it():
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(6, 40, generator=g).argsort(1)[:, :9]
    mask = torch.ones(6, 40, dtype=torch.bool).scatter_(1, keep, False)
    want_keep, want_restore = mask_indices(mask)
    for num_keep in (None, 9):
        ids_keep, ids_restore = ref.mask_indices(mask, num_keep)
        assert torch.equal(ids_keep, want_keep) and torch.equal(ids_restore, want_restore)
    ids_keep, ids_restore = ref.mask_indices(mask[:0])
    assert ids_keep.shape == (0, 0) and ids_restore.shape == (0, 40)
