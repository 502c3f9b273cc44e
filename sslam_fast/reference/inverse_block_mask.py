"""Plain-PyTorch inverse block masks: ALGORITHM §3 in code, the reference backend of the op and the test oracle.

Mirrors ``[E] utils/data_utils.py : compute_block_mask_2d`` (the EAT fork of
``[F] fairseq/data/data_utils.py : compute_block_mask_2d``) with the arguments EAT/SSLAM use through
``[E] data/mae_image_dataset.py : MaeImageDataset.__getitem__``: ``inverse_mask=True, require_same_masks=True,
mask_dropout=0, expand_adjcent=False, non_overlapping=False, flexible_mask=False, img_shape=(H, W)``. One call of
:func:`clip_block_mask` is one upstream call (one clip, ``clones`` rows) and consumes the generator exactly as
upstream consumes the global one: one ``torch.randint`` for the centres of all rows, then one ``torch.multinomial``
per row that needs a fix-up, in row order. So with the same generator state the output is bit-identical to upstream.

:func:`inverse_block_mask` is the batch as the upstream collater builds it (a generator, like upstream);
:func:`inverse_block_mask_from_seed` is the same loop in the form of the op's kernels (one 64-bit seed), the
``reference`` backend of ``sslam_fast.ops.inverse_block_mask``.

:func:`inverse_block_mask_batched` is a batched pure-PyTorch formulation with the same distribution (no Python loop
over rows); it is not the reference, only a comparison point for the benchmark and a device-agnostic fallback."""

from __future__ import annotations

import torch


def mask_counts(grid: tuple[int, int], mask_prob: float, mask_length: int, mask_prob_adjust: float) -> tuple[int, int]:
    """``(n_centers, keep)`` with upstream's float expressions (``mask_dropout = 0``).

    With ``inverse_mask`` upstream first sets ``mask_prob = 1 - mask_prob`` (0.19999999999999996 for 0.8), then draws
    ``int(L * ((mask_prob + mask_prob_adjust) / mask_length**2) * (1 + mask_dropout))`` centres per row and fixes every
    row up to ``int(L * mask_prob)`` kept tokens. For the defaults (64 x 8, 0.8, 5, 0.07): n_centers = int(5.5296) = 5
    and keep = int(102.39999999999998) = 102.
    """
    L = grid[0] * grid[1]
    p_keep = 1 - mask_prob
    n_centers = int(L * ((p_keep + mask_prob_adjust) / mask_length**2) * (1 + 0))
    keep = int(L * p_keep)
    return n_centers, keep


def clip_block_mask_before_fixup(
    clones: int, grid: tuple[int, int], n_centers: int, mask_length: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The union of blocks of one clip before the count fix-up: (clones, H*W) float32, 1 = KEPT (visible).

    ``n_centers`` centres per row are drawn with replacement (``torch.randint``; duplicates collapse); each centre
    (r, c) expands to ``{(clamp(r+i-o, 0, H-1), clamp(c+j-o, 0, W-1)) : 0 <= i, j < mask_length}``,
    ``o = mask_length // 2``, so blocks are cut at the border of the grid.
    """
    H, W = grid
    L = H * W
    mask = torch.zeros((clones, H, W))
    mask_inds = torch.randint(0, L, size=(clones, n_centers), generator=generator)
    mask.view(clones, -1).scatter_(1, mask_inds, 1)
    centers = mask.nonzero(as_tuple=True)
    inds: tuple[list, list, list] = ([], [], [])
    offset = mask_length // 2
    for i in range(mask_length):
        for j in range(mask_length):
            inds[0].append(centers[0])
            inds[1].append(centers[1] + (i - offset))
            inds[2].append(centers[2] + (j - offset))
    i0 = torch.cat(inds[0])
    i1 = torch.cat(inds[1]).clamp_(min=0, max=H - 1)
    i2 = torch.cat(inds[2]).clamp_(min=0, max=W - 1)
    mask[(i0, i1, i2)] = 1
    return mask.reshape(clones, L)


def fix_up_rows_(kept: torch.Tensor, keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Upstream's ``require_same_masks`` loop, in place on a (rows, L) float 0/1 tensor (1 = kept): every row ends
    with exactly ``keep`` ones. A row with n > keep loses ``n - keep`` of its ones, a row with n < keep gains
    ``keep - n`` of its zeros, each chosen by ``torch.multinomial`` without replacement on the 0/1 row (a uniformly
    random subset)."""
    n_masks = kept.sum(dim=-1)
    for i in range(len(kept)):
        n = n_masks[i]
        m = kept[i]
        if n > keep:
            m[torch.multinomial(m, int(n - keep), replacement=False, generator=generator)] = 0
        elif n < keep:
            m[torch.multinomial(1 - m, int(keep - n), replacement=False, generator=generator)] = 1
    return kept


def clip_block_mask(
    clones: int,
    grid: tuple[int, int] = (64, 8),
    mask_prob: float = 0.8,
    mask_length: int = 5,
    mask_prob_adjust: float = 0.07,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One upstream ``compute_block_mask_2d((clones, H*W), ...)`` call: (clones, H*W) float32, 1 = MASKED.

    Exactly ``H*W - keep`` ones per row (410 of 512 for the defaults). ``generator`` None uses the default CPU
    generator, as upstream does.
    """
    n_centers, keep = mask_counts(grid, mask_prob, mask_length, mask_prob_adjust)
    kept = clip_block_mask_before_fixup(clones, grid, n_centers, mask_length, generator)
    fix_up_rows_(kept, keep, generator)
    return 1 - kept


def inverse_block_mask(
    batch_size: int,
    clones: int,
    grid: tuple[int, int] = (64, 8),
    mask_prob: float = 0.8,
    mask_length: int = 5,
    mask_prob_adjust: float = 0.07,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The masks of a batch as the upstream collater builds them: (batch_size * clones, H*W) bool, True = masked.

    Clip-major: row ``b * clones + k`` is clone k of clip b, i.e. the ``torch.cat`` of one :func:`clip_block_mask`
    call per clip, in clip order (slow by design: a Python loop over rows, as each upstream DataLoader worker runs).
    """
    clips = []
    for _ in range(batch_size):
        clips.append(clip_block_mask(clones, grid, mask_prob, mask_length, mask_prob_adjust, generator))
    return torch.cat(clips).bool().to(device if device is not None else "cpu")


def inverse_block_mask_from_seed(
    batch_size: int,
    clones: int,
    H: int,
    W: int,
    n_centers: int,
    mask_length: int,
    keep: int,
    seed: int,
    device: torch.device | str,
) -> torch.Tensor:
    """The op's reference kernel: (batch_size * clones, H*W) bool on ``device``, True = masked.

    One :func:`clip_block_mask` loop per clip, in clip order (clip-major rows), on a private CPU generator seeded with
    ``seed``; the result is copied to ``device`` after. ``keep < 0`` skips the fix-up and returns the union of blocks
    (a test diagnostic).
    """
    g = torch.Generator().manual_seed(seed)
    clips = []
    for _ in range(batch_size):  # one upstream call per clip, in clip order: clip-major rows
        kept = clip_block_mask_before_fixup(clones, (H, W), n_centers, mask_length, g)
        if keep >= 0:
            fix_up_rows_(kept, keep, g)
        clips.append(kept == 0)
    return torch.cat(clips).to(device)


def inverse_block_mask_batched(
    rows: int,
    grid: tuple[int, int],
    n_centers: int,
    mask_length: int,
    keep: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The same distribution for all rows at once: (rows, H*W) bool, True = masked.

    The block indicator is the distance test ``r - o <= t < r - o + mask_length`` (and likewise for f), which is
    the clamped expansion restricted to the grid. The fix-up keeps the ``keep`` largest of ``block + u``, u iid
    uniform in [0, 1) (float64, so ties have probability ~1e-13): all block tokens outrank all others, so a row with
    n > keep keeps a uniformly random keep-subset of its blocks and a row with n < keep adds a uniformly random
    (keep - n)-subset of the rest, which is the distribution of upstream's multinomial fix-up.
    """
    H, W = grid
    L = H * W
    centres = torch.randint(0, L, (rows, n_centers), generator=generator, device=device)
    tok = torch.arange(L, device=device)
    t, f = tok // W, tok % W
    lo_t = (centres // W - mask_length // 2).unsqueeze(-1)
    lo_f = (centres % W - mask_length // 2).unsqueeze(-1)
    hit = (t >= lo_t) & (t < lo_t + mask_length) & (f >= lo_f) & (f < lo_f + mask_length)
    block = hit.any(dim=1).to(torch.float64) if n_centers else torch.zeros(rows, L, dtype=torch.float64, device=device)
    keys = block + torch.rand((rows, L), generator=generator, device=device, dtype=torch.float64)
    top = keys.topk(keep, dim=1, sorted=False).indices
    return torch.ones((rows, L), dtype=torch.bool, device=device).scatter_(1, top, False)

