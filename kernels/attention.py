"""Triton flash attention for the encoder's short sequences (ALGORITHM §2.1): forward and backward, no mask.

``flash_attention_fwd`` and ``flash_attention_bwd`` are the launchers: the ``triton`` backend of the custom ops
``sslam_fast::attention`` and ``sslam_fast::attention_backward`` (``sslam_fast.ops.attention`` validates the arguments),
on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

Shapes: q, k, v (B, H, L, D), D in {16, 32, 64, 128}; L is 103 (student: 1 CLS + 102 visible tokens), 513 (teacher)
or 273 (SSLAM's dropped teacher), with B*H up to 192 x 12. Clones and clips are just a larger batch: one program per
(query block, batch-head), no padding of L and no loop over clones; every tail of L is masked.

Layout: inputs may be any strided (B, H, L, D) view with unit stride on D, e.g. ``qkv.reshape(B, L, 3, H, D)
.permute(2, 0, 3, 1, 4)[i]`` as upstream builds them, so no copy is made. The output and the gradients are (B, H, L, D)
views of (B, L, H, D) memory: upstream's next step, ``out.transpose(1, 2).reshape(B, L, H * D)``, is then free.

Numerics (as FlashAttention-2): scores and softmax statistics in fp32, ``exp2`` with ``scale * log2(e)`` folded into
the scores; P is cast to the input dtype before ``P @ V`` (upstream casts the fp32 softmax to the input dtype too).
``tl.dot`` runs in the input dtype with fp32 accumulation; fp32 inputs use ``input_precision="ieee"`` (no TF32), as
torch's fp32 matmul does by default. The forward saves the natural log-sum-exp (B, H, L) fp32; the backward recomputes
P from it: a preprocessing kernel for delta = rowsum(dO * O), a dK/dV kernel (one program per key block, looping over
query blocks) and a dQ kernel (one program per query block, looping over key blocks). dQ gets its own pass instead of
fp32 atomics, so the gradients are deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # 1 / ln 2
LN2 = 0.6931471805599453

# GPU tiles, checked by compiling every kernel for sm_90 and reading ptxas's register report (no GPU run yet):
# - fp16 / bf16, D <= 64 (the model): 64 x 64 tiles, 4 warps (16 query rows per warp of the warpgroup mma), about 200
#   registers a thread, no spills. 64 rather than 128 query rows: for L = 103 / 273 / 513 a 64-row tile pads L to
#   128 / 320 / 576 positions, a 128-row tile to 128 / 384 / 640.
# - D = 128, any dtype: 8 warps (with 4 the dK/dV kernel spills, and in fp32 the forward too).
# - fp32 (``ieee`` dots on the FMA units, not the training path): 32 x 32 tiles; 64 x 64 spills.
# Two pipeline stages: the K/V loops are 2 to 9 iterations long at these L, and more stages only cost registers.
GPU_BLOCK = 64
GPU_BLOCK_FP32 = 32
GPU_NUM_STAGES = 2
# The interpreter runs every tile op in numpy: small tiles keep the loops (and the tests' tails) short and cheap.
INTERPRET_BLOCK = 32


def tile_config(
    device_type: str, dtype: torch.dtype, head_dim: int, block_m: int | None = None, block_n: int | None = None
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a device type, dtype and head dim; block_m / block_n override."""
    if device_type != "cuda":
        block = INTERPRET_BLOCK
    else:
        block = GPU_BLOCK_FP32 if dtype == torch.float32 else GPU_BLOCK
    num_warps = 8 if head_dim > 64 else 4
    return block_m or block, block_n or block, num_warps


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 operands read it; 16-bit dots are exact products


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def empty_blhd(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A (B, H, L, D) tensor stored as (B, L, H, D): the layout of the output and of the gradients."""
    B, H, L, D = shape
    return torch.empty((B, L, H, D), dtype=dtype, device=device).transpose(1, 2)


# --- forward ----------------------------------------------------------------------------------------------------------


@triton.jit
def _flash_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,  # q, k, v, o: (B, H, L, D) strided, unit stride on D; lse: (B*H, L) fp32
    H, L, NUM_M_BLOCKS,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    qk_scale,  # head_dim ** -0.5 * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # 1-D grid over (query block, batch-head), query blocks of one head adjacent so they share K/V in L2; a 1-D grid has
    # no 65535 limit on B*H.
    pid = tl.program_id(0)
    bh = pid // NUM_M_BLOCKS
    m_block = pid % NUM_M_BLOCKS
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :], mask=mask_m[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the log2-domain scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        kt = tl.load(k_base + offs_n[None, :] * skl + offs_d[:, None], mask=mask_n[None, :], other=0.0)  # (D, N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))  # keys past L take no weight
        # Every block has at least one key < L, so m_new is finite and the first alpha is exp2(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_base = o_ptr + b * sob + h * soh
    tl.store(o_base + offs_m[:, None] * sol + offs_d[None, :], acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log-sum-exp of the scaled scores
    tl.store(lse_ptr + bh.to(tl.int64) * L + offs_m, lse, mask=mask_m)


def flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int | None = None, block_n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) x3 -> (out (B, H, L, D) in q's dtype, stored as (B, L, H, D); lse (B, H, L) fp32).

    Arguments are pre-validated (same shape, dtype and device; D in {16, 32, 64, 128}). ``block_m`` / ``block_n``
    override the tile sizes (powers of two >= 16); the tests use them to exercise more block boundaries.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, L, D = q.shape
    out = empty_blhd(q.shape, q.dtype, q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    BM, BN, num_warps = tile_config(q.device.type, q.dtype, D, block_m, block_n)
    num_m = triton.cdiv(L, BM)
    _flash_attention_fwd_kernel[(num_m * B * H,)](
        q, k, v, out, lse,
        H, L, num_m,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        LOG2E / math.sqrt(D),
        HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=GPU_NUM_STAGES,
    )  # fmt: skip
    return out, lse


# --- backward ---------------------------------------------------------------------------------------------------------


@triton.jit
def _flash_attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,  # o, do: (B, H, L, D) strided; delta: (B*H, L) fp32
    H, L, NUM_M_BLOCKS,
    sob, soh, sol, sdb, sdh, sdl,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the row term of the softmax backward, dS = P * (dP - delta).
    pid = tl.program_id(0)
    bh = pid // NUM_M_BLOCKS
    m_block = pid % NUM_M_BLOCKS
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    o = tl.load(o_ptr + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * L + offs_m, delta, mask=mask_m)


@triton.jit
def _flash_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, L, NUM_N_BLOCKS,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sgb, sgh, sgl,  # sg*: strides of dk and dv
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # One program owns a block of keys and accumulates dK, dV over every query block, working on transposed tiles
    # (keys x queries) so that dV = P^T dO and dK = dS^T Q are plain dots.
    pid = tl.program_id(0)
    bh = pid // NUM_N_BLOCKS
    n_block = pid % NUM_N_BLOCKS
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdb + h * sdh
    row_base = bh.to(tl.int64) * L

    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < L
    k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=mask_n[:, None], other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=mask_n[:, None], other=0.0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < L
        qt = tl.load(q_base + offs_m[None, :] * sql + offs_d[:, None], mask=mask_m[None, :], other=0.0)  # (D, M)
        do = tl.load(do_base + offs_m[:, None] * sdl + offs_d[None, :], mask=mask_m[:, None], other=0.0)  # (M, D)
        lse2 = tl.load(lse_ptr + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + offs_m, mask=mask_m, other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (N, M), log2 domain
        pt = tl.exp2(st - lse2[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)  # queries past L contribute nothing (their dO is 0 too)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (N, M) = (dO V^T)^T
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)

    dk = dk * sm_scale  # S = scale * Q K^T
    g_off = b * sgb + h * sgh + offs_n[:, None] * sgl + offs_d[None, :]
    tl.store(dk_ptr + g_off, dk.to(dk_ptr.dtype.element_ty), mask=mask_n[:, None])
    tl.store(dv_ptr + g_off, dv.to(dv_ptr.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _flash_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, L, NUM_M_BLOCKS,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sgb, sgh, sgl,  # sg*: strides of dq
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # One program owns a block of queries and accumulates dQ = dS K over every key block.
    pid = tl.program_id(0)
    bh = pid // NUM_M_BLOCKS
    m_block = pid % NUM_M_BLOCKS
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    row_base = bh.to(tl.int64) * L

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_base + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        kt = tl.load(k_base + offs_n[None, :] * skl + offs_d[:, None], mask=mask_n[None, :], other=0.0)  # (D, N)
        vt = tl.load(v_base + offs_n[None, :] * svl + offs_d[:, None], mask=mask_n[None, :], other=0.0)  # (D, N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        # Keys past L take no weight. (Their k rows load as 0, so dS @ K would drop them anyway; the mask keeps the
        # result independent of the fill value.)
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)

    dq = dq * sm_scale
    g_off = b * sgb + h * sgh + offs_m[:, None] * sgl + offs_d[None, :]
    tl.store(dq_ptr + g_off, dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None])


def flash_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), each (B, H, L, D) in q's dtype stored as (B, L, H, D), from the forward's out and lse."""
    grad_out, q, k, v, out = (_unit_last(t) for t in (grad_out, q, k, v, out))
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    lse = lse.contiguous()
    B, H, L, D = q.shape
    dq = empty_blhd(q.shape, q.dtype, q.device)
    dk = empty_blhd(q.shape, q.dtype, q.device)
    dv = empty_blhd(q.shape, q.dtype, q.device)
    if q.numel() == 0:
        return dq, dk, dv
    BM, BN, num_warps = tile_config(q.device.type, q.dtype, D, block_m, block_n)
    sm_scale = 1.0 / math.sqrt(D)
    prec = dot_precision(q.dtype)
    num_m, num_n = triton.cdiv(L, BM), triton.cdiv(L, BN)

    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _flash_attention_bwd_preprocess_kernel[(num_m * B * H,)](
        out, grad_out, delta, H, L, num_m,
        out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        HEAD_DIM=D, BLOCK_M=BM, num_warps=4,
    )  # fmt: skip
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )  # fmt: skip
    _flash_attention_bwd_dkdv_kernel[(num_n * B * H,)](
        q, k, v, grad_out, lse, delta, dk, dv, H, L, num_n,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2),
        sm_scale, sm_scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, PRECISION=prec, num_warps=num_warps, num_stages=GPU_NUM_STAGES,
    )  # fmt: skip
    _flash_attention_bwd_dq_kernel[(num_m * B * H,)](
        q, k, v, grad_out, lse, delta, dq, H, L, num_m,
        *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        sm_scale, sm_scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, PRECISION=prec, num_warps=num_warps, num_stages=GPU_NUM_STAGES,
    )  # fmt: skip
    return dq, dk, dv
