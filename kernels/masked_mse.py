"""Triton kernels for the masked patch loss: ``sum_{masked} (pred - target)^2 / sqrt(D)`` and its gradient (
ALGORITHM §4).

``masked_mse_fwd_triton`` and ``masked_mse_bwd_triton`` are the launchers; ``sslam_fast.ops.loss`` validates the
arguments and calls them on CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

Upstream gathers the masked tokens (``x[masked_b]``, ``y[masked_b]``, 80 % of the decoder output: a 0.4 GB copy per
step at SSLAM's 192 x 512 x 768) and repeat-interleaves the teacher target over the K clones (another copy). Here
the mask is applied as a predicate on the loads (an unmasked token is never read) and target row r // clones is
addressed directly, so neither copy exists.

Forward: grid (R * token blocks); each program sums BLOCK_N tokens x D channels of one row in fp32 and writes one
partial to a buffer, which is then summed in a fixed order: deterministic, unlike fp32 atomics, and no zero-fill
launch. Backward: grid (R * token blocks * channel blocks); writes ``2 (pred - target) mask / sqrt(D) * grad``
everywhere (zeros at unmasked tokens), reading the upstream gradient from its 0-dim tensor (no host sync).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_BLOCK_N = 16  # tokens per program
_BLOCK_D = 128  # channels per step: 256 B of fp16 per token row, ~90 registers (256 needs ~180)
_BWD_BLOCK_D = 256


@triton.jit
def _masked_mse_fwd_kernel(
    pred_ptr,
    target_ptr,
    mask_ptr,  # (R, N) uint8 view of the bool mask
    part_ptr,  # (R * n_nblk,) fp32 out
    N,
    D,
    clones,
    p_sr, p_sn,
    t_sr, t_sn,
    m_sr, m_sn,
    n_nblk,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r = (pid // n_nblk).to(tl.int64)
    n = (pid % n_nblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    n64 = n.to(tl.int64)
    sel = nm & (tl.load(mask_ptr + r * m_sr + n64 * m_sn, mask=nm, other=0) != 0)
    p_row = pred_ptr + r * p_sr + n64[:, None] * p_sn
    t_row = target_ptr + (r // clones) * t_sr + n64[:, None] * t_sn
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = sel[:, None] & (d < D)[None, :]
        p = tl.load(p_row + d[None, :], mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_row + d[None, :], mask=m, other=0.0).to(tl.float32)
        diff = p - t
        acc += diff * diff  # 0 where not loaded
    tl.store(part_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0) * scale)


@triton.jit
def _masked_mse_bwd_kernel(
    grad_ptr,  # 0-dim upstream gradient
    pred_ptr,
    target_ptr,
    mask_ptr,
    gp_ptr,  # (R, N, D) contiguous out, pred's dtype
    N,
    D,
    clones,
    p_sr, p_sn,
    t_sr, t_sn,
    m_sr, m_sn,
    n_nblk,
    n_dblk,
    scale2,  # 2 / sqrt(D)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    dblk = pid % n_dblk
    rn = pid // n_dblk
    r = (rn // n_nblk).to(tl.int64)
    n = (rn % n_nblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    nm = n < N
    inb = nm[:, None] & (d < D)[None, :]
    n64 = n.to(tl.int64)
    sel = nm & (tl.load(mask_ptr + r * m_sr + n64 * m_sn, mask=nm, other=0) != 0)
    m = sel[:, None] & inb
    p = tl.load(pred_ptr + r * p_sr + n64[:, None] * p_sn + d[None, :], mask=m, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + (r // clones) * t_sr + n64[:, None] * t_sn + d[None, :], mask=m, other=0.0)
    g = tl.load(grad_ptr).to(tl.float32) * scale2
    gp = tl.where(m, (p - t.to(tl.float32)) * g, 0.0)
    dst = gp_ptr + (r * N + n64)[:, None] * D + d[None, :]
    tl.store(dst, gp.to(gp_ptr.dtype.element_ty), mask=inb)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def masked_mse_fwd_triton(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, clones: int) -> torch.Tensor:
    """fp32 0-dim ``sum_{r, n: mask} sum_d (pred[r,n,d] - target[r // clones,n,d])^2 / sqrt(D)``. Pre-validated."""
    pred, target = _unit_last(pred), _unit_last(target)
    R, N, D = pred.shape
    if R == 0 or N == 0 or D == 0:
        return torch.zeros((), dtype=torch.float32, device=pred.device)
    m8 = mask.view(torch.uint8)
    n_nblk = triton.cdiv(N, _BLOCK_N)
    part = torch.empty((R * n_nblk,), dtype=torch.float32, device=pred.device)
    _masked_mse_fwd_kernel[(R * n_nblk,)](
        pred, target, m8, part, N, D, int(clones),
        pred.stride(0), pred.stride(1), target.stride(0), target.stride(1), m8.stride(0), m8.stride(1),
        n_nblk, 1.0 / math.sqrt(D),
        BLOCK_N=_BLOCK_N, BLOCK_D=min(_BLOCK_D, triton.next_power_of_2(D)), num_warps=4,
    )  # fmt: skip
    return part.sum()


def masked_mse_bwd_triton(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, clones: int
) -> torch.Tensor:
    """(R, N, D) contiguous gradient wrt pred, in pred's dtype. Pre-validated."""
    out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if out.numel() == 0:
        return out
    pred, target = _unit_last(pred), _unit_last(target)
    R, N, D = pred.shape
    m8 = mask.view(torch.uint8)
    block_d = min(_BWD_BLOCK_D, triton.next_power_of_2(D))
    n_nblk = triton.cdiv(N, _BLOCK_N)
    n_dblk = triton.cdiv(D, block_d)
    _masked_mse_bwd_kernel[(R * n_nblk * n_dblk,)](
        grad.float().contiguous(), pred, target, m8, out, N, D, int(clones),
        pred.stride(0), pred.stride(1), target.stride(0), target.stride(1), m8.stride(0), m8.stride(1),
        n_nblk, n_dblk, 2.0 / math.sqrt(D),
        BLOCK_N=_BLOCK_N, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out
