"""Triton kernel for inverse block masks (ALGORITHM §3): ``inverse_block_mask_triton`` is the launcher.

One program handles ROWS mask rows, each row a vector of the BLOCK_L >= H*W tokens (512 for the EAT grid, so a row
fits in one block). Per row:

1. ``n_centers`` centres, uniform over the H*W tokens with replacement, from Philox (``tl.randint``);
2. the block indicator by a distance test: token (t, f) is in the block of centre (r, c) iff
   ``r - o <= t < r - o + mask_length`` and ``c - o <= f < c - o + mask_length`` (o = mask_length // 2). On the grid
   this is exactly upstream's clamped expansion (clamping folds outside cells onto cells the cut block contains);
3. the exact fix-up by a per-row rank selection: every token gets the distinct int64 key
   ``block << (32 + IDX_BITS) | noise << IDX_BITS | token`` (noise: 32 random bits) and the ``keep`` largest keys are
   kept. Block tokens outrank the others, so a row with n > keep keeps a uniformly random keep-subset of its blocks and
   a row with n < keep adds a uniformly random (keep - n)-subset of the rest: the distribution of upstream's
   ``torch.multinomial`` fix-up (up to noise ties, probability ~3e-5 a row, broken by the token index). The keep-th
   largest key is found by a bitwise binary search (KEY_BITS = 42 steps of compare-and-count over the row).

Why not ``tl.sort`` (a bitonic sort of 512 keys, 45 compare-and-swap stages): on a GPU either costs a few
microseconds a row, but the Triton interpreter evaluates the sort's xor-reductions element by element in Python (about
4 s a row), which would leave the kernel untestable on CPU; the search is ~40 vector compares and sums.

RNG: Philox keyed by the 64-bit ``seed``, counter (lo, hi) = (stream index, row): lo = j for centre j, lo = 2^31 + n
for the noise of token n. A row's output depends only on (seed, row), not on ROWS or on the launch grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_TOKENS = 1 << 16  # keys of 1 + 32 + log2(BLOCK_L) bits fit in int64 for any size; this bounds the registers
_NOISE_STREAM = 1 << 31  # Philox counter offset of the per-token noise (centres use 0 .. n_centers - 1)


@triton.jit(do_not_specialize=["seed", "rows", "n_centers", "keep"])
def _inverse_block_mask_fwd_kernel(
    out_ptr,  # (rows, H*W) uint8, 1 = masked
    seed,  # int64 Philox key
    rows,
    H,
    W,
    n_centers,
    mask_length,
    keep,  # kept tokens per row (read only with FIXUP)
    FIXUP: tl.constexpr,  # False: return the raw union of blocks (a test diagnostic)
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX_BITS: tl.constexpr,  # log2(BLOCK_L)
    KEY_BITS: tl.constexpr,  # 1 + 32 + IDX_BITS
    NOISE_STREAM: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_ok = row < rows
    n = tl.arange(0, BLOCK_L)  # token index t * W + f
    L = H * W
    tok_ok = n < L
    t = n // W
    f = n - t * W
    off = mask_length // 2
    counter_hi = row.to(tl.int64) << 32  # Philox counter hi word = row

    block = tl.zeros([ROWS, BLOCK_L], dtype=tl.int32)
    for j in range(n_centers):
        r = tl.randint(seed, counter_hi + j)  # [ROWS] uint32
        # uniform in [0, L): (r * L) >> 32, exact for power-of-two L, bias < L / 2^32 otherwise
        centre = ((r.to(tl.int64) * L) >> 32).to(tl.int32)
        t_lo = (centre // W - off)[:, None]
        f_lo = (centre % W - off)[:, None]
        hit = (t[None, :] >= t_lo) & (t[None, :] < t_lo + mask_length)
        hit = hit & (f[None, :] >= f_lo) & (f[None, :] < f_lo + mask_length)
        block = block | hit.to(tl.int32)

    if FIXUP:
        counter = counter_hi[:, None] | (n.to(tl.int64) + NOISE_STREAM)[None, :]
        noise = tl.randint(seed, counter).to(tl.int64)  # [ROWS, BLOCK_L], 32 random bits
        key = (block.to(tl.int64) << (32 + IDX_BITS)) | (noise << IDX_BITS) | n.to(tl.int64)[None, :]
        key = tl.where(tok_ok[None, :], key, -1)  # padding lanes rank last (valid keys are >= 0)
        # The keep-th largest key, bit by bit from the top: the largest threshold that at least `keep` keys reach.
        # Keys are distinct, so exactly `keep` keys reach the final one.
        threshold = tl.zeros([ROWS], dtype=tl.int64)
        for i in range(KEY_BITS):
            trial = threshold | (tl.full([ROWS], 1, tl.int64) << (KEY_BITS - 1 - i))
            reach = tl.sum((key >= trial[:, None]).to(tl.int32), axis=1)
            threshold = tl.where(reach >= keep, trial, threshold)
        kept = key >= threshold[:, None]
    else:
        kept = block != 0
    dst = out_ptr + row.to(tl.int64)[:, None] * L + n[None, :]
    tl.store(dst, tl.where(kept, 0, 1).to(tl.uint8), mask=row_ok[:, None] & tok_ok[None, :])


def inverse_block_mask_triton(
    rows: int,
    H: int,
    W: int,
    n_centers: int,
    mask_length: int,
    keep: int,
    seed: int,
    device: torch.device | str,
    rows_per_program: int | None = None,
) -> torch.Tensor:
    """(rows, H*W) bool on ``device``, True = masked. Arguments pre-validated by
    ``sslam_fast.ops.inverse_block_mask``.

    ``keep < 0`` skips the fix-up and returns the raw union of blocks (a test diagnostic).

    ``rows_per_program`` (a power of two) defaults to 1 on CUDA (a 512-token row per program keeps 4 warps busy
    and the grid has one program per row) and 64 under the interpreter, whose cost is per program, not per element.
    """
    L = H * W
    if L > _MAX_TOKENS:
        raise ValueError(f"grid: the triton backend handles up to {_MAX_TOKENS} tokens per row, got {H} x {W} = {L}")
    device = torch.device(device)
    out = torch.empty((rows, L), dtype=torch.uint8, device=device)
    if rows == 0:
        return out.view(torch.bool)
    if rows_per_program is None:
        rows_per_program = 1 if device.type == "cuda" else 64
    block_l = triton.next_power_of_2(L)
    idx_bits = block_l.bit_length() - 1
    grid = (triton.cdiv(rows, rows_per_program),)
    _inverse_block_mask_fwd_kernel[grid](
        out,
        int(seed),
        rows,
        H,
        W,
        n_centers,
        mask_length,
        max(keep, 0),
        FIXUP=keep >= 0,
        ROWS=rows_per_program,
        BLOCK_L=block_l,
        IDX_BITS=idx_bits,
        KEY_BITS=1 + 32 + idx_bits,
        NOISE_STREAM=_NOISE_STREAM,
        num_warps=4,
    )
    return out.view(torch.bool)
