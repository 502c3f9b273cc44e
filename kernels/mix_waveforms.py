"""Triton kernels for additive mixing of waveform pairs at a given SNR: ``a + g b`` with a per-row gain.

``mix_waveforms_triton`` is the launcher; ``sslam_fast.ops.mix_waveforms`` validates the arguments and calls it on
CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_MIX_BLOCK = 1024  # elements per program: 8 fp16 / 4 fp32 per thread with 4 warps, i.e. 128-bit accesses
_POWER_BLOCK = 1024  # vector width of the sum-of-squares accumulators
_POWER_CHUNK = 8192  # samples of one row per program in the sum-of-squares kernel
_MAX_CHUNKS = 256  # longer rows get longer chunks, so the scale kernel never reduces more than this many partials
_LN10_OVER_20 = math.log(10.0) / 20.0

# Two launches. (1) ``_mix_waveforms_power_kernel``: grid (chunks of a row, rows); each program reads one chunk of a
# AND b and writes the chunk's two fp32 sums of squares to a (B, n_chunks, 2) buffer. (2) ``_mix_waveforms_fwd_kernel``:
# grid (tiles of a row, rows); each program adds up its row's partials (<= 256 values, from L2), forms the gain and
# writes a + g b for its tile.
#
# Why not one program per row: the workload is B ~ 12-96 rows of 160000 samples, and 12 programs would leave ~90 % of
# an H100's 132 SMs idle while each streams 1.3 MB alone. Chunks of 8192 samples give 20 programs per row (240 for
# B = 12), enough to fill the GPU. Why not atomic_add into a (B, 2) buffer: the buffer would need zeroing (one more
# launch) and fp32 atomics add in a varying order, so the gain would change in the last bits from run to run; the
# partials buffer is written without atomics and reduced in a fixed order, so results are deterministic.


@triton.jit
def _mix_waveforms_power_kernel(
    a_ptr,  # (B, N) contiguous
    b_ptr,  # (B, N) contiguous
    part_ptr,  # (B, NCHUNK, 2) fp32: per-chunk sum of a^2, sum of b^2
    N,
    NCHUNK,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, CHUNK, BLOCK):
        offs = start + k + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(a_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        y = tl.load(b_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        acc_a += x * x
        acc_b += y * y
    dst = part_ptr + (row * NCHUNK + chunk) * 2
    tl.store(dst, tl.sum(acc_a, axis=0))
    tl.store(dst + 1, tl.sum(acc_b, axis=0))


@triton.jit
def _mix_waveforms_fwd_kernel(
    a_ptr,
    b_ptr,
    out_ptr,  # (B, N), a's dtype
    part_ptr,  # (B, NCHUNK, 2) fp32 from the power kernel
    snr_ptr,  # (B,) float, read only when SNR_PER_ROW
    snr_scalar,  # fp32, used when not SNR_PER_ROW
    N,
    NCHUNK,
    LN10_OVER_20: tl.constexpr,
    SNR_PER_ROW: tl.constexpr,
    NCHUNK_P2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    row = tl.program_id(1)
    c = tl.arange(0, NCHUNK_P2)
    parts = part_ptr + (row * NCHUNK + c) * 2
    sa = tl.sum(tl.load(parts, mask=c < NCHUNK, other=0.0), axis=0)
    sb = tl.sum(tl.load(parts + 1, mask=c < NCHUNK, other=0.0), axis=0)
    if SNR_PER_ROW:
        snr = tl.load(snr_ptr + row).to(tl.float32)
    else:
        snr = snr_scalar
    amp = tl.exp(snr * LN10_OVER_20)  # 10^(snr/20)
    # g = sqrt(P_a / (P_b 10^(snr/10))) = sqrt(S_a) / (sqrt(S_b) 10^(snr/20)): N cancels, so the sums stand in for the
    # means, and square roots taken first keep a tiny non-zero S_b from overflowing the ratio. A silent b gives g = 0.
    silent_b = sb <= 0.0
    g = tl.div_rn(tl.sqrt_rn(sa), tl.sqrt_rn(tl.where(silent_b, 1.0, sb)) * amp)
    g = tl.where(silent_b, 0.0, g)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    base = row.to(tl.int64) * N
    x = tl.load(a_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(b_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + offs, (x + g * y).to(out_ptr.dtype.element_ty), mask=m)


def mix_waveforms_triton(
    a: torch.Tensor, b: torch.Tensor, snr_row: torch.Tensor | None, snr_scalar: float
) -> torch.Tensor:
    """``a + g b`` per row: see ``sslam_fast.reference.mix_waveforms.mix_waveforms``. Arguments pre-validated.

    ``snr_row`` is the (B,) per-row SNR in dB, or None to use ``snr_scalar`` for every row.
    """
    a = a.contiguous()
    b = b.contiguous()
    B, N = a.shape
    out = torch.empty_like(a)
    if out.numel() == 0:
        return out
    chunk = max(_POWER_CHUNK, triton.next_power_of_2(triton.cdiv(N, _MAX_CHUNKS)))
    nchunk = triton.cdiv(N, chunk)
    part = torch.empty((B, nchunk, 2), dtype=torch.float32, device=a.device)
    _mix_waveforms_power_kernel[(nchunk, B)](a, b, part, N, nchunk, CHUNK=chunk, BLOCK=_POWER_BLOCK, num_warps=4)
    per_row = snr_row is not None
    snr_arg = snr_row.contiguous() if per_row else part  # a placeholder pointer, never read
    _mix_waveforms_fwd_kernel[(triton.cdiv(N, _MIX_BLOCK), B)](
        a,
        b,
        out,
        part,
        snr_arg,
        float(snr_scalar),
        N,
        nchunk,
        LN10_OVER_20=_LN10_OVER_20,
        SNR_PER_ROW=per_row,
        NCHUNK_P2=triton.next_power_of_2(nchunk),
        BLOCK=_MIX_BLOCK,
        num_warps=4,
    )
    return out
