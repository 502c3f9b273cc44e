"""Triton kernels for the CNN decoder block tail: ``GELU(LayerNorm_C(y)) + z`` and its backward (ALGORITHM §2.2).

``ln_gelu_residual_fwd_triton`` and ``ln_gelu_residual_bwd_triton`` are the launchers;
``sslam_fast.ops.ln_gelu_residual`` validates the arguments and calls them with (R, C, H, W) tensors on CUDA, or on CPU
under ``TRITON_INTERPRET=1``.

Layout. The LayerNorm runs over C at every (r, h, w) position, i.e. over the rows of an (R*H*W, C) matrix. Both memory
formats address a position as ``r * stride_r + p * stride_p`` with p = h*W + w (because stride_h = W * stride_w in
either format), so the kernels take those two strides and the channel stride and never copy: channels-last (the
format of the decoder on CUDA, where the (R, 512, 768) token tensor *is* the channels-last (R, 768, 64, 8) feature
map) gives unit channel stride and fully coalesced rows; channels-first works too, coalesced along positions.

One program normalises BLOCK_M positions x all C channels in fp32 registers (C = 768 -> 1024 lanes, 4 positions).
The forward reads y and z once and writes out once. The backward recomputes the statistics from y (one extra
reduction in registers, no saved (R*H*W, 2) buffers and no extra op output) and writes grad_y; the gradient for z is
grad_out itself, so the op hands it back without a copy.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_TILE = 4096  # fp32 elements per (BLOCK_M, C) tile
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@triton.jit
def _ln_gelu_residual_fwd_kernel(
    y_ptr,
    z_ptr,
    out_ptr,
    M,  # R * H * W positions
    HW,
    C,
    y_sr, y_sp, y_sc,
    z_sr, z_sp, z_sc,
    o_sr, o_sp, o_sc,
    eps,
    INV_SQRT2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    r = rows // HW
    p = rows % HW
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    m = rm[:, None] & cm[None, :]
    y = tl.load(y_ptr + (r * y_sr + p * y_sp)[:, None] + c[None, :] * y_sc, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(y, axis=1) / C
    yc = tl.where(m, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / C + eps)  # biased variance, as F.layer_norm
    xh = yc * rstd[:, None]
    g = 0.5 * xh * (1.0 + tl.erf(xh * INV_SQRT2))  # exact GELU (nn.GELU default)
    z = tl.load(z_ptr + (r * z_sr + p * z_sp)[:, None] + c[None, :] * z_sc, mask=m, other=0.0).to(tl.float32)
    out = (g + z).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (r * o_sr + p * o_sp)[:, None] + c[None, :] * o_sc, out, mask=m)


@triton.jit
def _ln_gelu_residual_bwd_kernel(
    go_ptr,
    y_ptr,
    gy_ptr,
    M,
    HW,
    C,
    g_sr, g_sp, g_sc,
    y_sr, y_sp, y_sc,
    o_sr, o_sp, o_sc,
    eps,
    INV_SQRT2: tl.constexpr,
    INV_SQRT_2PI: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    r = rows // HW
    p = rows % HW
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    m = rm[:, None] & cm[None, :]
    y = tl.load(y_ptr + (r * y_sr + p * y_sp)[:, None] + c[None, :] * y_sc, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(y, axis=1) / C
    yc = tl.where(m, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / C + eps)
    xh = yc * rstd[:, None]
    go = tl.load(go_ptr + (r * g_sr + p * g_sp)[:, None] + c[None, :] * g_sc, mask=m, other=0.0).to(tl.float32)
    # GELU'(x) = Phi(x) + x phi(x); then the LayerNorm backward without affine:
    # grad_y = rstd * (g - mean_C(g) - x^ mean_C(g x^)), g = grad_out * GELU'(x^).
    cdf = 0.5 * (1.0 + tl.erf(xh * INV_SQRT2))
    pdf = tl.exp(-0.5 * xh * xh) * INV_SQRT_2PI
    g = tl.where(m, go * (cdf + xh * pdf), 0.0)
    mean_g = tl.sum(g, axis=1) / C
    mean_gx = tl.sum(g * xh, axis=1) / C
    gy = rstd[:, None] * (g - mean_g[:, None] - xh * mean_gx[:, None])
    tl.store(gy_ptr + (r * o_sr + p * o_sp)[:, None] + c[None, :] * o_sc, gy.to(gy_ptr.dtype.element_ty), mask=m)


def _position_strides(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(tensor, (stride_r, stride_p, stride_c)) with p = h*W + w; copies only if h and w cannot be merged."""
    _, _, H, W = t.shape
    if H > 1 and t.stride(2) != W * t.stride(3):
        t = t.contiguous()
    sp = t.stride(3) if W > 1 else t.stride(2)  # W == 1: p = h
    return t, (t.stride(0), sp, t.stride(1))


def _blocks(C: int) -> tuple[int, int, int]:
    block_c = triton.next_power_of_2(C)
    block_m = max(1, _TILE // block_c)
    return block_m, block_c, 8 if block_c >= 1024 else 4  # <= 16 fp32 per thread per tile: no spills


def ln_gelu_residual_fwd_triton(y: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(R, C, H, W) y, z -> ``GELU(LN_C(y)) + z`` in y's dtype and memory format; ``eps`` is
    ``sslam_fast.reference.ln_gelu_residual.NORM_EPS``. Arguments pre-validated."""
    out = torch.empty_like(y)
    R, C, H, W = y.shape
    M = R * H * W
    if out.numel() == 0:
        return out
    y, ys = _position_strides(y)
    z, zs = _position_strides(z)
    out_w, os_ = _position_strides(out)
    block_m, block_c, warps = _blocks(C)
    _ln_gelu_residual_fwd_kernel[(triton.cdiv(M, block_m),)](
        y, z, out_w, M, H * W, C, *ys, *zs, *os_, float(eps),
        INV_SQRT2=_INV_SQRT2, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    if out_w is not out:  # only for a y whose strides empty_like could not mirror densely
        out.copy_(out_w)
    return out


def ln_gelu_residual_bwd_triton(grad_out: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Gradient wrt y of ``GELU(LN_C(y)) + z`` (R, C, H, W), in y's dtype and memory format; ``eps`` as in the
    forward. Pre-validated."""
    grad_y = torch.empty_like(y)
    R, C, H, W = y.shape
    M = R * H * W
    if grad_y.numel() == 0:
        return grad_y
    go, gs = _position_strides(grad_out)
    y, ys = _position_strides(y)
    gy_w, os_ = _position_strides(grad_y)
    block_m, block_c, warps = _blocks(C)
    _ln_gelu_residual_bwd_kernel[(triton.cdiv(M, block_m),)](
        go, y, gy_w, M, H * W, C, *gs, *ys, *os_, float(eps),
        INV_SQRT2=_INV_SQRT2, INV_SQRT_2PI=_INV_SQRT_2PI, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    if gy_w is not grad_y:
        grad_y.copy_(gy_w)
    return grad_y
