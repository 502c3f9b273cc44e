"""Triton kernels for the EAT / SSLAM teacher targets (ALGORITHM §4 make_targets, §5.3 token subsets).

``layer_targets_triton`` is the launcher; ``sslam_fast.ops.layer_targets`` validates the arguments and calls it with the
stacked top-k FFN outputs (k, B, T, D) (any strides over k, B and T; unit stride over D) on CUDA, or on CPU under
``TRITON_INTERPRET=1``.

Two launches, because the two normalisations reduce over different axes: the instance norm over tokens (a column
reduction of each (T, D) layer) and the LayerNorm over channels (a row reduction of the layer mean).
1. ``_layer_targets_stats_kernel``: grid (k * B * channel blocks). Each program walks the T tokens of one (layer,
   sample) for BLOCK_D channels and writes the fp32 mean and 1/sqrt(var + eps) of each channel, (k, B, D) values.
   Statistics merge block by block with Chan's parallel update (exact two-pass mean and M2 inside a block), so a
   channel with a large offset (|mean| >> std, common in FFN outputs) loses no precision to E[x^2] - E[x]^2.
2. ``_layer_targets_fwd_kernel``: grid (B * token blocks). Each program holds BLOCK_T tokens x all D channels in
   fp32, adds the k normalised layers (in layer order, like upstream's ``y.add_``), divides by k, applies the channel
   LayerNorm and writes the fp32 target.
So the input is read twice (once per pass) and the fp32 target written once; upstream materialises an fp32 copy per
layer for the instance norm, the running sum, and the LayerNorm output (~4 fp32 passes per layer). With
``token_index`` both passes read the listed tokens only (a gather by row), so teacher B's instance norm runs over its
272 kept tokens without materialising the subset. The fwd tile holds all D channels of a token (D <= ~16k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_STATS_BLOCK_T = 32  # tokens per step of the statistics walk
_STATS_BLOCK_D = 128  # channels per statistics program: 256 B of fp16 per token row, coalesced
_FWD_TILE = 4096  # fp32 elements of the (BLOCK_T, D) accumulator per program: 4 tokens at D = 768 (1024 lanes)


@triton.jit
def _layer_targets_stats_kernel(
    x_ptr,  # (K, B, T_in, D), unit stride over D
    idx_ptr,  # (T,) int64 token indices, read only when HAS_INDEX
    mean_ptr,  # (K, B, D) fp32 out
    rstd_ptr,  # (K, B, D) fp32 out
    B,
    T,  # tokens used (len(token_index) when HAS_INDEX)
    D,
    stride_l,
    stride_b,
    stride_t,
    n_dblk,
    eps,
    HAS_INDEX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    lb = pid // n_dblk
    dblk = pid % n_dblk
    layer = lb // B
    b = lb % B
    d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    base = layer.to(tl.int64) * stride_l + b.to(tl.int64) * stride_b
    mean = tl.zeros([BLOCK_D], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_a = tl.sum(tl.zeros([BLOCK_T], dtype=tl.float32), axis=0)  # tokens merged so far (an fp32 scalar)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        if HAS_INDEX:
            src = tl.load(idx_ptr + t, mask=tm, other=0)
        else:
            src = t.to(tl.int64)
        m = tm[:, None] & dm[None, :]
        x = tl.load(x_ptr + base + src[:, None] * stride_t + d[None, :], mask=m, other=0.0).to(tl.float32)
        n_b = tl.sum(tm.to(tl.float32), axis=0)
        n_ab = n_a + n_b
        bmean = tl.sum(x, axis=0) / n_b
        xc = tl.where(m, x - bmean[None, :], 0.0)
        bm2 = tl.sum(xc * xc, axis=0)
        delta = bmean - mean
        mean = mean + delta * (n_b / n_ab)
        m2 = m2 + bm2 + delta * delta * (n_a * n_b / n_ab)
        n_a = n_ab
    var = m2 / T  # biased, as F.instance_norm
    rstd = 1.0 / tl.sqrt(var + eps)
    out = lb.to(tl.int64) * D + d
    tl.store(mean_ptr + out, mean, mask=dm)
    tl.store(rstd_ptr + out, rstd, mask=dm)


@triton.jit
def _layer_targets_fwd_kernel(
    x_ptr,  # (K, B, T_in, D), unit stride over D
    idx_ptr,  # (T,) int64, read only when HAS_INDEX
    mean_ptr,  # (K, B, D) fp32 from the statistics kernel
    rstd_ptr,
    out_ptr,  # (B, T, D) fp32 contiguous
    K,
    B,
    T,
    D,
    stride_l,
    stride_b,
    stride_t,
    n_tblk,
    eps,
    HAS_INDEX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_tblk
    t = (pid % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m = tm[:, None] & dm[None, :]
    if HAS_INDEX:
        src = tl.load(idx_ptr + t, mask=tm, other=0)
    else:
        src = t.to(tl.int64)
    row_off = src[:, None] * stride_t + d[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    # Pointers advance by one layer per step (64-bit pointer arithmetic, no int32 layer * stride product).
    x_l = x_ptr + b.to(tl.int64) * stride_b + row_off
    mean_l = mean_ptr + b.to(tl.int64) * D + d
    rstd_l = rstd_ptr + b.to(tl.int64) * D + d
    for _ in range(K):
        x = tl.load(x_l, mask=m, other=0.0).to(tl.float32)
        mu = tl.load(mean_l, mask=dm, other=0.0)
        rs = tl.load(rstd_l, mask=dm, other=0.0)
        acc += (x - mu[None, :]) * rs[None, :]
        x_l += stride_l
        mean_l += B * D
        rstd_l += B * D
    acc = tl.where(m, acc / K, 0.0)
    row_mean = tl.sum(acc, axis=1) / D
    c = tl.where(m, acc - row_mean[:, None], 0.0)
    row_var = tl.sum(c * c, axis=1) / D
    y = c * (1.0 / tl.sqrt(row_var + eps))[:, None]
    dst = (b.to(tl.int64) * T + t.to(tl.int64))[:, None] * D + d[None, :]
    tl.store(out_ptr + dst, y, mask=m)


def layer_targets_triton(layers: torch.Tensor, token_index: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """(k, B, T, D) -> (B, T or T', D) fp32: see ``sslam_fast.reference.layer_targets.layer_targets``; ``eps`` is its
    ``NORM_EPS``. Pre-validated."""
    if layers.stride(3) != 1:
        layers = layers.contiguous()
    K, B, T_in, D = layers.shape
    T = token_index.shape[0] if token_index is not None else T_in
    out = torch.empty((B, T, D), dtype=torch.float32, device=layers.device)
    if out.numel() == 0:
        return out
    has_index = token_index is not None
    idx = token_index.contiguous() if has_index else out  # a placeholder pointer, never read
    stats = torch.empty((2, K, B, D), dtype=torch.float32, device=layers.device)
    mean, rstd = stats[0], stats[1]
    sl, sb, st = layers.stride(0), layers.stride(1), layers.stride(2)

    block_d = min(_STATS_BLOCK_D, triton.next_power_of_2(D))
    n_dblk = triton.cdiv(D, block_d)
    _layer_targets_stats_kernel[(K * B * n_dblk,)](
        layers, idx, mean, rstd, B, T, D, sl, sb, st, n_dblk, float(eps),
        HAS_INDEX=has_index, BLOCK_T=_STATS_BLOCK_T, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip

    block_d = triton.next_power_of_2(D)
    block_t = max(1, min(triton.next_power_of_2(T), _FWD_TILE // block_d))
    n_tblk = triton.cdiv(T, block_t)
    _layer_targets_fwd_kernel[(B * n_tblk,)](
        layers, idx, mean, rstd, out, K, B, T, D, sl, sb, st, n_tblk, float(eps),
        HAS_INDEX=has_index, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=8 if block_d >= 1024 else 4,
    )  # fmt: skip
    return out
