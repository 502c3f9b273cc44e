"""Triton kernels for the student's multi-clone input: gather + CLS + LayerNorm, and its backward (ALGORITHM §2.1).

``clone_gather_fwd_triton`` / ``clone_gather_bwd_triton`` are the launchers; ``sslam_fast.ops.clone_gather``
validates the arguments and calls them on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``). See
``sslam_fast.reference.clone_gather`` for the maths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile sizes and warps, checked with ptxas for sm_90 at D = 768 (BLOCK_D = 1024), fp16, no spills
# (tests/test_clone_gather.py compiles them): the forward uses 4096-element tiles (4 tokens) with 8 warps, 40-63
# registers a thread (4 CTAs = 32 warps an SM; 4 warps would need 96-123); the backward keeps ~6 live fp32 tiles, so it
# takes 2048-element tiles (2 tokens): 80 registers, 24 warps an SM (4096-element tiles there need 149 registers: 8
# warps an SM). Not timed on a GPU yet.
_TILE = 4096
_BWD_TILE = 2048
_NUM_WARPS = 8
_BWD_CHUNK = 16  # tokens (or CLS rows) per backward program: B * N / 16 programs (384 at SSLAM's shape), few partials


def _blocks(D: int, tile: int = _TILE) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_T): D padded to a power of two (at least 16), and the tokens of one tile."""
    block_d = max(16, triton.next_power_of_2(D))
    return block_d, max(1, tile // block_d)


# --- clone_gather forward ---------------------------------------------------------------------------------------------
#
# Grid (rows r of B*K, tiles of BLOCK_T output tokens). Output token t of row r reads the CLS token (t = 0) or
# x[r // K, ids_keep[r, t - 1]] straight from the (B, N, D) input: ``repeat_interleave(K)`` is never materialised, and
# the K clones of a clip read the same rows of x, which stay in L2 (12 x 512 x 768 fp16 = 9.4 MB at SSLAM's shape).
# Statistics in fp32, two passes over the registers (mean, then the centred variance: no cancellation).


@triton.jit
def _clone_gather_fwd_kernel(
    x_ptr,  # (B, N, D) contiguous
    ids_ptr,  # (R, KEEP) int64
    cls_ptr,  # (D,)
    w_ptr,  # (D,)
    b_ptr,  # (D,)
    out_ptr,  # (R, 1 + KEEP, D), x's dtype
    N,
    KEEP,
    D,
    CLONES,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    tmask = t < KEEP + 1
    is_tok = tmask & (t > 0)
    idx = tl.load(ids_ptr + r.to(tl.int64) * KEEP + (t - 1), mask=is_tok, other=0)
    src = ((r // CLONES).to(tl.int64) * N + idx) * D
    v = tl.load(x_ptr + src[:, None] + d[None, :], mask=is_tok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    c = tl.load(cls_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    v = tl.where((t == 0)[:, None], c[None, :], v)
    mean = tl.sum(v, axis=1) / D
    diff = tl.where(dmask[None, :], v - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / D + eps)
    w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    dst = (r.to(tl.int64) * (KEEP + 1) + t) * D
    tl.store(out_ptr + dst[:, None] + d[None, :], y.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


def clone_gather_fwd_triton(x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps) -> torch.Tensor:
    """(B, N, D), (B*K, k) -> (B*K, 1 + k, D): see ``sslam_fast.reference.clone_gather.clone_gather``. Pre-validated."""
    x, ids_keep = x.contiguous(), ids_keep.contiguous()
    N, D = x.shape[1:]
    R, keep = ids_keep.shape
    out = x.new_empty((R, keep + 1, D))
    if out.numel() == 0:
        return out
    block_d, block_t = _blocks(D)
    grid = (R, triton.cdiv(keep + 1, block_t))
    _clone_gather_fwd_kernel[grid](
        x,
        ids_keep,
        cls_token.contiguous(),
        norm_weight.contiguous(),
        norm_bias.contiguous(),
        out,
        N,
        keep,
        D,
        clones,
        float(eps),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
    )
    return out


# --- clone_gather backward --------------------------------------------------------------------------------------------
#
# dx[b, n] sums the LayerNorm input-gradients of every clone row of clip b that kept token n. Two ways to form it:
# (a) one program per output row scattering its tokens into an fp32 (B, N, D) buffer with atomics, then a cast pass;
# (b) one program per (clip, token) gathering its (at most K) contributions through an inverse map
#     inv[r, n] = j (ids_keep[r, j] = n) or -1.
# (b) is used: it is deterministic (a fixed clone order, no atomics), needs no zeroed fp32 buffer or cast pass (dx is
# written once, in x's dtype, tokens no clone kept get exact zeros), and it reads x[b, n] once per clip instead of once
# per clone row: the LayerNorm input of every clone's copy of token (b, n) is the same vector x[b, n], so mean, rstd and
# xhat are computed once and only the per-clone reductions mean(g), mean(g * xhat) (g = grad * w) repeat. The same
# sharing makes dw and db cheap: dw += xhat * sum_c grad_c, db += sum_c grad_c. The inverse map costs one (R, N) int32
# scatter (0.4 MB at SSLAM's shape); grad_out rows of tokens a clone did not keep are masked loads, never fetched.
# Programs beyond B * n_chunks handle the CLS position: one LayerNorm input (the CLS token) shared by all R rows.
# Every program writes fp32 partials (dw, db, dcls) that one torch.sum adds in a fixed order.


@triton.jit
def _clone_gather_bwd_kernel(
    grad_ptr,  # (R, 1 + KEEP, D) contiguous, x's dtype
    x_ptr,  # (B, N, D)
    inv_ptr,  # (R, N) int32: position of token n in ids_keep[r], or -1
    cls_ptr,  # (D,)
    w_ptr,  # (D,)
    dx_ptr,  # (B, N, D), x's dtype
    part_ptr,  # (P, 3, D) fp32: per-program dw, db, dcls
    N,
    KEEP,
    D,
    CLONES,
    R,
    N_CHUNKS,
    N_TOK_PROGS,
    eps,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    part = part_ptr + pid.to(tl.int64) * 3 * D + d
    if pid < N_TOK_PROGS:
        clip = pid // N_CHUNKS
        n0 = (pid % N_CHUNKS) * CHUNK
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        db = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(0, CHUNK, BLOCK_T):
            n = n0 + t0 + tl.arange(0, BLOCK_T)
            nmask = n < N
            m2 = nmask[:, None] & dmask[None, :]
            xrow = (clip.to(tl.int64) * N + n) * D
            v = tl.load(x_ptr + xrow[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
            mean = tl.sum(v, axis=1) / D
            diff = tl.where(m2, v - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / D + eps)
            xhat = diff * rstd[:, None]
            acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            gsum = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for c in range(CLONES):
                r = clip * CLONES + c
                j = tl.load(inv_ptr + r.to(tl.int64) * N + n, mask=nmask, other=-1)
                valid = j >= 0
                grow = (r.to(tl.int64) * (KEEP + 1) + 1 + j) * D
                go = tl.load(grad_ptr + grow[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
                go = go.to(tl.float32)
                g = go * w[None, :]
                c1 = tl.sum(g, axis=1) / D
                c2 = tl.sum(g * xhat, axis=1) / D
                # Rows this clone did not keep have go = 0, so c1 = c2 = 0 and they add exact zeros.
                acc += rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
                gsum += go
            tl.store(dx_ptr + xrow[:, None] + d[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m2)
            dw += tl.sum(gsum * xhat, axis=0)
            db += tl.sum(gsum, axis=0)
        tl.store(part, dw, mask=dmask)
        tl.store(part + D, db, mask=dmask)
        tl.store(part + 2 * D, tl.zeros([BLOCK_D], dtype=tl.float32), mask=dmask)
    else:
        r0 = (pid - N_TOK_PROGS) * CHUNK
        c = tl.load(cls_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        mean = tl.sum(c, axis=0) / D
        diff = tl.where(dmask, c - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(diff * diff, axis=0) / D + eps)
        xhat = diff * rstd
        dcls = tl.zeros([BLOCK_D], dtype=tl.float32)
        gsum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(0, CHUNK, BLOCK_T):
            rows = r0 + t0 + tl.arange(0, BLOCK_T)
            m2 = (rows < R)[:, None] & dmask[None, :]
            grow = rows.to(tl.int64) * (KEEP + 1) * D
            go = tl.load(grad_ptr + grow[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
            g = go * w[None, :]
            c1 = tl.sum(g, axis=1) / D
            c2 = tl.sum(g * xhat[None, :], axis=1) / D
            dcls += tl.sum(rstd * (g - c1[:, None] - xhat[None, :] * c2[:, None]), axis=0)
            gsum += tl.sum(go, axis=0)
        tl.store(part, gsum * xhat, mask=dmask)
        tl.store(part + D, gsum, mask=dmask)
        tl.store(part + 2 * D, dcls, mask=dmask)


def clone_gather_bwd_triton(grad, x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps):
    """Gradients wrt (x, cls_token, norm_weight, norm_bias): see ``reference.clone_gather.clone_gather_backward``.

    ``ids_keep`` rows must hold distinct indices (the op checks it): the inverse map has one slot per (row, token).
    """
    grad, x, ids_keep = grad.contiguous(), x.contiguous(), ids_keep.contiguous()
    B, N, D = x.shape
    R, keep = ids_keep.shape
    dx = torch.empty_like(x)
    if D == 0 or R == 0:
        sums = x.new_zeros((3, D), dtype=torch.float32)
        dx.zero_()
    else:
        inv = torch.full((R, N), -1, dtype=torch.int32, device=x.device)
        if keep:
            inv.scatter_(1, ids_keep, torch.arange(keep, dtype=torch.int32, device=x.device).expand(R, keep))
        n_chunks = triton.cdiv(N, _BWD_CHUNK)
        n_tok = B * n_chunks
        n_progs = n_tok + triton.cdiv(R, _BWD_CHUNK)
        part = torch.empty((n_progs, 3, D), dtype=torch.float32, device=x.device)
        block_d, block_t = _blocks(D, _BWD_TILE)
        block_t = min(block_t, _BWD_CHUNK)
        _clone_gather_bwd_kernel[(n_progs,)](
            grad,
            x,
            inv,
            cls_token.contiguous(),
            norm_weight.contiguous(),
            dx,
            part,
            N,
            keep,
            D,
            clones,
            R,
            n_chunks,
            n_tok,
            float(eps),
            CHUNK=_BWD_CHUNK,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=_NUM_WARPS,
        )
        sums = part.sum(0)  # (3, D): a fixed-order reduction, deterministic
    # copy=True: the custom op's outputs must not alias each other (they are rows of one buffer here).
    dw = sums[0].to(norm_weight.dtype, copy=True)
    db = sums[1].to(norm_bias.dtype, copy=True)
    dcls = sums[2].to(cls_token.dtype, copy=True).reshape(cls_token.shape)
    return dx, dcls, dw, db
