"""Triton kernels for the decoder's input: drop CLS, restore positions, fill in mask tokens, and its backward
(ALGORITHM §3).

``decoder_scatter_fwd_triton`` / ``decoder_scatter_bwd_triton`` are the launchers; ``sslam_fast.ops.decoder_scatter``
validates the arguments and calls them on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``). See
``sslam_fast.reference.decoder_scatter`` for the maths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile size and warps, checked with ptxas for sm_90 at D = 768 (BLOCK_D = 1024), fp16, no spills
# (tests/test_decoder_scatter.py compiles them): 4096-element tiles (4 tokens) with 8 warps, 40-63 registers a thread
# (4 CTAs = 32 warps an SM; 4 warps would need 96-123). Not timed on a GPU yet.
_TILE = 4096
_NUM_WARPS = 8


def _blocks(D: int, tile: int = _TILE) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_T): D padded to a power of two, and the tokens of one tile."""
    block_d = max(16, triton.next_power_of_2(D))  # >= 16 so that the 4-way noise split below has >= 4 lanes
    return block_d, max(1, tile // block_d)


# --- decoder_scatter --------------------------------------------------------------------------------------------------
#
# Forward grid (rows, tiles of output positions): position n of row r copies visible token j = ids_restore[r, n] when
# j < k, else writes a mask token. The noise is generated in registers (Philox, ``tl.randn4x``: four normals per
# counter, so the 10-round Philox is paid once per 4 outputs) from a seed the host draws from the caller's generator;
# the (R, N - k, D) noise tensor of upstream is never written or read. The counter of output element (r, n, d) is
# (r * N + n) * ceil(D / 4) + d // 4, unique per element group, so the noise does not depend on the tiling.
# Backward: ids_restore is a permutation, so every visible token's gradient is one grad row: a scatter with no
# collisions (deterministic, no atomics, no zero-fill). Masked positions' rows are never loaded.


@triton.jit
def _decoder_scatter_fwd_kernel(
    x_ptr,  # (R, 1 + KEEP, D) contiguous
    ids_ptr,  # (R, N) int64
    seed_ptr,  # (1,) int64, read only with HAS_NOISE
    out_ptr,  # (R, N, D), x's dtype
    N,
    KEEP,
    D,
    D4,
    std,
    HAS_NOISE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    nmask = n < N
    j = tl.load(ids_ptr + r.to(tl.int64) * N + n, mask=nmask, other=0)
    vis = nmask & (j < KEEP)
    src = (r.to(tl.int64) * (KEEP + 1) + 1 + j) * D
    v = tl.load(x_ptr + src[:, None] + d[None, :], mask=vis[:, None] & dmask[None, :], other=0.0)
    if HAS_NOISE:
        seed = tl.load(seed_ptr)
        q = tl.arange(0, BLOCK_D // 4)
        ctr = (r.to(tl.int64) * N + n)[:, None] * D4 + q[None, :]
        z0, z1, z2, z3 = tl.randn4x(seed, ctr)
        # [T, Q, 2, 2] -> [T, 4 Q]: element d = 4 q + 2 i + o takes z(2 o + i) of counter q.
        z = tl.reshape(tl.join(tl.join(z0, z1), tl.join(z2, z3)), [BLOCK_T, BLOCK_D])
        v = tl.where(vis[:, None], v, (z * std).to(v.dtype))
    dst = (r.to(tl.int64) * N + n) * D
    tl.store(out_ptr + dst[:, None] + d[None, :], v, mask=nmask[:, None] & dmask[None, :])


@triton.jit
def _decoder_scatter_bwd_kernel(
    grad_ptr,  # (R, N, D) contiguous
    ids_ptr,  # (R, N) int64, a permutation of [0, N) per row
    dx_ptr,  # (R, 1 + KEEP, D)
    N,
    KEEP,
    D,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    tile = tl.program_id(1)
    n = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    nmask = n < N
    j = tl.load(ids_ptr + r.to(tl.int64) * N + n, mask=nmask, other=KEEP)
    m2 = (nmask & (j < KEEP))[:, None] & dmask[None, :]
    go = tl.load(grad_ptr + ((r.to(tl.int64) * N + n) * D)[:, None] + d[None, :], mask=m2, other=0.0)
    row = r.to(tl.int64) * (KEEP + 1)
    tl.store(dx_ptr + ((row + 1 + j) * D)[:, None] + d[None, :], go, mask=m2)
    # The CLS position takes no gradient: the first tile of each row writes its zeros.
    tl.store(dx_ptr + row * D + d, tl.zeros([BLOCK_D], dtype=go.dtype), mask=dmask & (tile == 0))


def decoder_scatter_fwd_triton(x, ids_restore, seed, mask_noise_std) -> torch.Tensor:
    """(R, 1 + k, D), (R, N) -> (R, N, D); ``seed`` a (1,) int64 tensor, or None for zeros at masked positions."""
    x, ids_restore = x.contiguous(), ids_restore.contiguous()
    R, keep1, D = x.shape
    N = ids_restore.shape[1]
    out = x.new_empty((R, N, D))
    if out.numel() == 0:
        return out
    has_noise = seed is not None and mask_noise_std != 0
    block_d, block_t = _blocks(D)
    _decoder_scatter_fwd_kernel[(R, triton.cdiv(N, block_t))](
        x,
        ids_restore,
        seed if has_noise else ids_restore,
        out,
        N,
        keep1 - 1,
        D,
        triton.cdiv(D, 4),
        float(mask_noise_std),
        HAS_NOISE=has_noise,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
    )
    return out


def decoder_scatter_bwd_triton(grad, ids_restore, keep) -> torch.Tensor:
    """(R, N, D) -> (R, 1 + k, D): visible tokens take their positions' gradient, CLS zero."""
    grad, ids_restore = grad.contiguous(), ids_restore.contiguous()
    R, N, D = grad.shape
    dx = grad.new_empty((R, keep + 1, D))
    if dx.numel() == 0:
        return dx
    block_d, block_t = _blocks(D)
    _decoder_scatter_bwd_kernel[(R, max(1, triton.cdiv(N, block_t)))](
        grad,
        ids_restore,
        dx,
        N,
        keep,
        D,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
    )
    return dx
