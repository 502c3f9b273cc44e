"""Triton kernel for SSLAM's partial max-mix of log-mels (ALGORITHM §5.1).

``partial_max_mix_triton`` is the launcher; ``sslam_fast.ops.partial_max_mix`` validates the arguments and calls it on
CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MIX_BLOCK = 1024  # elements per program: 8 fp16 / 4 fp32 per thread with 4 warps, i.e. 128-bit accesses

# Grid (tiles of T*F elements, rows): every program reads its tile of row i and of the partner row i-1 and writes the
# mix (and, with CONCAT, the copy of row i into the first half of the output). The partner tile is a second read of
# data another program also reads; SSLAM's input (12 x 1024 x 128 fp16 = 3 MB) sits in L2, so DRAM still sees one
# read of each input element, while every program stays independent (no serial loop over rows). Inside the windows
# the partner is not loaded at all: the masked load yields -inf, exactly upstream's ``roll1[..., s:s+W, :] = -inf``.
# s1 and s2 change every step: they are read from a 2-element device tensor, so a new draw neither recompiles the
# kernel nor needs a host value (the trainer draws them on the host and never reads them back).


@triton.jit
def _partial_max_mix_fwd_kernel(
    spec_ptr,  # (B, T*F) contiguous
    out_ptr,  # (B, T*F), or (2B, T*F) with CONCAT
    windows_ptr,  # (2,) int64: s1, s2
    B,
    TF,
    F,
    W,
    CONCAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    row = tl.program_id(1)
    s1 = tl.load(windows_ptr)
    s2 = tl.load(windows_ptr + 1)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    inb = offs < TF
    # The frame of element ``offs`` is t = offs // F, and t in [s, s + W) <=> offs in [s*F, (s + W)*F): the same
    # window test without a per-element integer division.
    lo1 = s1 * F
    hi1 = lo1 + W * F
    lo2 = s2 * F
    hi2 = lo2 + W * F
    in_win = ((offs >= lo1) & (offs < hi1)) | ((offs >= lo2) & (offs < hi2))
    partner = (row + B - 1) % B  # cyclic: partner(0) = B - 1; B = 1 pairs a row with itself
    row_base = row.to(tl.int64) * TF
    x = tl.load(spec_ptr + row_base + offs, mask=inb)
    p = tl.load(spec_ptr + partner.to(tl.int64) * TF + offs, mask=inb & ~in_win, other=float("-inf"))
    # The max of two values is one of them: computing it in fp32 is exact for fp16 / bf16 and avoids the interpreter's
    # broken bf16 arithmetic. NaN propagates like torch.max.
    mix = tl.maximum(x.to(tl.float32), p.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)
    mix = mix.to(out_ptr.dtype.element_ty)
    if CONCAT:
        tl.store(out_ptr + row_base + offs, x, mask=inb)
        tl.store(out_ptr + (row + B).to(tl.int64) * TF + offs, mix, mask=inb)
    else:
        tl.store(out_ptr + row_base + offs, mix, mask=inb)


def partial_max_mix_triton(spec: torch.Tensor, windows: torch.Tensor, window_frames: int, concat: bool) -> torch.Tensor:
    """(B, 1, T, F) -> (B or 2B, 1, T, F): see ``sslam_fast.reference.partial_max_mix.partial_max_mix``; ``windows``
    is (s1, s2) as a (2,) int64 tensor on spec's device. Arguments pre-validated."""
    spec = spec.contiguous()
    windows = windows.to(torch.int64).contiguous()
    B, C, T, F = spec.shape
    out = spec.new_empty((2 * B if concat else B, C, T, F))
    TF = C * T * F  # C == 1 (checked by the op)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(TF, _MIX_BLOCK), B)
    _partial_max_mix_fwd_kernel[grid](
        spec, out, windows, B, TF, F, int(window_frames), CONCAT=bool(concat), BLOCK=_MIX_BLOCK, num_warps=4
    )
    return out
