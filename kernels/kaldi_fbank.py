"""Triton kernel for the batched Kaldi log-mel filterbank (the ``triton`` backend of ``kaldi_fbank`` and
``eat_features``: sslam_fast.ops.kaldi_fbank.fused_fbank).

One program computes ``BLOCK_T`` consecutive frames of one row, from the raw waveform to the normalised log-mel, in
one pass: framing (a strided gather), offset and per-frame DC removal, pre-emphasis, the window, the power spectrum
as real-DFT matmuls (``tl.dot``), the mel projection as a second ``tl.dot``, the log floor, ``(x - shift) * scale``
and the cast at the store. Nothing but the output is written to memory. The reductions are blocked: ``BLOCK_K``
samples per DFT step, ``BLOCK_F`` DFT columns per mel step, so the live state is two (or four) DFT accumulators of
``BLOCK_T x BLOCK_F`` and the mel accumulator ``BLOCK_T x BLOCK_M``.

Two formulations of the real DFT (``W = exp(-2 pi i / n_fft)``, ``H = n_fft / 2``), chosen by ``DFT_SPLIT``:

* direct: ``re + i im = frame @ [cos | -sin]`` over the ``frame_length`` samples, bins ``0..H-1`` (the Nyquist bin
  is skipped: its mel weight is 0 by contract). ``frame_length * 2H`` multiply-adds a frame (205 K at 400 / 512).
* split (default), one radix-2 decimation-in-frequency step, the first stage of an FFT: with ``u[n] = y[n] + y[n+H]``
  and ``d[n] = y[n] - y[n+H]`` for ``n < H``, ``X[2k] = sum_n u[n] W^(2nk)`` and ``X[2k+1] = sum_n d[n] W^(n(2k+1))``
  for ``k < H/2``: ``min(frame_length, H) * 2H`` multiply-adds a frame (131 K at 400 / 512). The butterflies are in
  the time domain, so no bin comes out of a cancellation of aliased partial sums, as in a decimation in time (even /
  odd samples), whose bins ~90 dB under a pure tone's mirror image lose ~1e-2 on the log-mel. Measured against the
  exact DFT of the same frames, both forms here are as accurate as torch's own fp32 rFFT.

Precision: the DFT needs about fp32 accuracy, not TF32: the log of low-energy mel bands is set by cancellation in the
DFT sums, and TF32 operands (10-bit mantissa) put a noise floor ~66 dB under the frame's peak, giving log-mel errors of
0.1 (noise) to 6 (sweeps) against the fp32 reference. The dots therefore run with ``input_precision="tf32x3"`` on the
GPU (three TF32 tensor-core products, close to fp32); ``DOT_PRECISION`` switches to ``"ieee"`` (fp32 FMA, slow) or
``"tf32"`` (fast, inaccurate). The interpreter computes every dot in fp32.
"""

from __future__ import annotations

import math
import struct
import threading
import weakref

import torch
import triton
import triton.language as tl

from sslam_fast._checks import MODEL_DTYPES, check_positive_int, check_real, check_tensor

# One fixed configuration per form (no autotune), checked by compiling for sm_90 (ptxas -v): no register spills,
# wgmma m64n32 (DFT) and m64n128 (mel) tiles, 64 KB of shared memory, one 8-warp program per SM. Live fp32 state per
# program: 2 (direct) or 4 (split) DFT accumulators of BLOCK_T x BLOCK_F and the mel accumulator BLOCK_T x BLOCK_M.
BLOCK_T = 128  # frames per program: two warpgroups of 64 rows
BLOCK_K = 16  # frame samples (direct) or butterfly outputs (split) per step of the DFT reduction
BLOCK_F = 32  # DFT columns per step of the mel reduction
NUM_WARPS = 8
NUM_STAGES = {False: 2, True: 1}  # per form (DFT_SPLIT): the split form spills with a 2-stage pipeline
DOT_PRECISION = "tf32x3"  # "tf32x3" | "ieee" | "tf32" (see the module docstring)
DFT_SPLIT = True  # one decimation-in-frequency step first: 0.6x the tensor-core work of the direct form

PREEMPHASIS = 0.97
LOG_FLOOR = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, torchaudio's log floor
_MAX_GRID_Y = 65535  # CUDA limit on gridDim.y; larger batches are launched in slices of rows


@triton.jit
def _emphasised(row_ptr, base, n, N, frame_ok, offset, mean, win_ptr, FRAME_LENGTH: tl.constexpr,
                PREEMPH: tl.constexpr):
    """The windowed, pre-emphasised samples n (BLOCK_K,) of BLOCK_T frames starting at ``base`` (BLOCK_T,).

    ``y = x - offset - mean``; ``y'[n] = (y[n] - 0.97 y[n-1]) * window[n]`` with ``y[-1] := y[0]``; zero for
    ``n >= FRAME_LENGTH``, samples at or past ``N`` and masked frames.
    """
    ok_n = n < FRAME_LENGTH
    idx = base[:, None] + n[None, :]
    idx_p = base[:, None] + tl.maximum(n - 1, 0)[None, :]
    mask = frame_ok[:, None] & ok_n[None, :] & (idx < N)
    x = tl.load(row_ptr + idx, mask=mask, other=0.0)
    x_p = tl.load(row_ptr + idx_p, mask=mask, other=0.0)
    y = (x - offset) - mean[:, None]
    y_p = (x_p - offset) - mean[:, None]
    w = tl.load(win_ptr + n, mask=ok_n, other=0.0)
    return tl.where(mask, (y - PREEMPH * y_p) * w[None, :], 0.0)


@triton.jit
def _to_output(x, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even.

    The GPU's conversion rounds to nearest even; the interpreter's truncates, so there (``BF16_BY_HAND``) bfloat16 is
    rounded with integer ops. Not on the GPU: the integer rounding of a 128 x 128 tile costs registers that make the
    kernel spill on sm_90.
    """
    if BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# sm_90 spills: 148 bytes (bf16 output only, with the GPU's own conversion; fp32 and fp16 outputs compile with none)
# The trainer computes its features in fp32, so the training step never launches the bf16 specialisation; a caller of
# eat_features(dtype=torch.bfloat16) pays 148 bytes of L1-resident local memory per thread.
@triton.jit
def _fbank_fwd_kernel(
    wav_ptr,  # (B, N) float32, rows contiguous
    len_ptr,  # (B,) int64
    off_ptr,  # (B,) float32
    win_ptr,  # (FRAME_LENGTH,) float32
    basis_ptr,  # direct: (2, K_PAD, F_PAD) [cos, -sin]; split: (4, K_PAD, F_PAD) [cos, -sin] even, odd bins
    mel_ptr,  # direct: (F_PAD, BLOCK_M) bin k; split: (2, F_PAD, BLOCK_M) bin 2k, bin 2k + 1. Zero-padded.
    out_ptr,  # (B, out_frames, M), last dim contiguous
    N,
    stride_wb,
    stride_ob,
    stride_ot,
    num_frames,
    out_frames,
    M,
    shift,
    scale,
    FRAME_LENGTH: tl.constexpr,
    FRAME_SHIFT: tl.constexpr,
    K_PAD: tl.constexpr,  # DFT reduction length: min(FRAME_LENGTH, HALF) for the split form; padded to BLOCK_K
    F_PAD: tl.constexpr,  # DFT columns: HALF (direct) or HALF / 2 (split), padded to BLOCK_F
    HALF: tl.constexpr,  # n_fft / 2
    SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PREEMPH: tl.constexpr,
    EPS: tl.constexpr,
    PRECISION: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t0 = pid_t * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    fill = (0.0 - shift) * scale

    length = tl.load(len_ptr + b)
    row_frames = tl.where(length >= FRAME_LENGTH, (length - FRAME_LENGTH) // FRAME_SHIFT + 1, 0)
    n_valid = tl.minimum(row_frames, num_frames)

    if t0 < n_valid:
        row_ptr = wav_ptr + b * stride_wb
        offset = tl.load(off_ptr + b)
        frame_ok = offs_t < n_valid
        base = offs_t * FRAME_SHIFT

        # Per-frame mean of x - offset over the FRAME_LENGTH samples (torchaudio's remove_dc_offset).
        total = tl.zeros([BLOCK_T], dtype=tl.float32)
        for n0 in range(0, FRAME_LENGTH, BLOCK_K):
            n = n0 + tl.arange(0, BLOCK_K)
            idx = base[:, None] + n[None, :]
            mask = frame_ok[:, None] & (n < FRAME_LENGTH)[None, :] & (idx < N)
            x = tl.load(row_ptr + idx, mask=mask, other=0.0)
            total += tl.sum(tl.where(mask, x - offset, 0.0), axis=1)
        mean = total / FRAME_LENGTH

        mel = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
        for f0 in range(0, F_PAD, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            if SPLIT:
                re_u = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
                im_u = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
                re_d = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
                im_d = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
                for k0 in range(0, K_PAD, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    y_lo = _emphasised(row_ptr, base, offs_k, N, frame_ok, offset, mean, win_ptr, FRAME_LENGTH, PREEMPH)
                    y_hi = _emphasised(
                        row_ptr, base, offs_k + HALF, N, frame_ok, offset, mean, win_ptr, FRAME_LENGTH, PREEMPH
                    )
                    u = y_lo + y_hi
                    d = y_lo - y_hi
                    bp = basis_ptr + offs_k[:, None] * F_PAD + offs_f[None, :]
                    re_u = tl.dot(u, tl.load(bp), re_u, input_precision=PRECISION)
                    im_u = tl.dot(u, tl.load(bp + K_PAD * F_PAD), im_u, input_precision=PRECISION)
                    re_d = tl.dot(d, tl.load(bp + 2 * K_PAD * F_PAD), re_d, input_precision=PRECISION)
                    im_d = tl.dot(d, tl.load(bp + 3 * K_PAD * F_PAD), im_d, input_precision=PRECISION)
                mp = mel_ptr + offs_f[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
                mel = tl.dot(re_u * re_u + im_u * im_u, tl.load(mp), mel, input_precision=PRECISION)
                mel = tl.dot(re_d * re_d + im_d * im_d, tl.load(mp + F_PAD * BLOCK_M), mel, input_precision=PRECISION)
            else:
                re = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
                im = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
                for k0 in range(0, K_PAD, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    a = _emphasised(row_ptr, base, offs_k, N, frame_ok, offset, mean, win_ptr, FRAME_LENGTH, PREEMPH)
                    bp = basis_ptr + offs_k[:, None] * F_PAD + offs_f[None, :]
                    re = tl.dot(a, tl.load(bp), re, input_precision=PRECISION)
                    im = tl.dot(a, tl.load(bp + K_PAD * F_PAD), im, input_precision=PRECISION)
                mp = mel_ptr + offs_f[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
                mel = tl.dot(re * re + im * im, tl.load(mp), mel, input_precision=PRECISION)

        # The floor as a select, not tl.maximum: that drops NaN (an overflowed power spectrum would come out as
        # log(eps), finite and wrong), where torch.max in torchaudio and the other backends keep it.
        logmel = (tl.log(tl.where(mel < EPS, EPS, mel)) - shift) * scale
        res = tl.where(frame_ok[:, None], logmel, fill)
    else:
        res = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32) + fill
    # Output pointers built last: a BLOCK_T x BLOCK_M tile of 64-bit pointers would otherwise stay live in registers.
    offs_m = tl.arange(0, BLOCK_M)
    store_mask = (offs_t < out_frames)[:, None] & (offs_m < M)[None, :]
    out_ptrs = out_ptr + b * stride_ob + offs_t[:, None].to(tl.int64) * stride_ot + offs_m[None, :]
    tl.store(out_ptrs, _to_output(res, out_ptr.dtype.element_ty, BF16_BY_HAND), mask=store_mask)


# --- host-side operands -----------------------------------------------------------------------------------------------

_cache_lock = threading.Lock()
_basis_cache: dict[tuple, torch.Tensor] = {}
_mel_cache: dict[int, tuple] = {}  # id(mel_banks) -> (weakref, version, key, operand)
_MEL_CACHE_SIZE = 8


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _geometry(frame_length: int, n_fft: int, split: bool) -> tuple[int, int, int]:
    """(DFT columns, K_PAD, F_PAD) of the chosen formulation."""
    half = n_fft // 2
    if split:
        return half // 2, _round_up(min(frame_length, half), BLOCK_K), _round_up(half // 2, BLOCK_F)
    return half, _round_up(frame_length, BLOCK_K), _round_up(half, BLOCK_F)


def _dft_basis(frame_length: int, n_fft: int, split: bool, device: torch.device) -> torch.Tensor:
    """The DFT operand of ``_fbank_fwd_kernel`` in float32, built in float64, cached per geometry and device.

    Direct: [cos, -sin] of ``2 pi n k / n_fft``. Split: the same for the even bins ``2k`` and the odd bins ``2k + 1``.
    """
    key = (frame_length, n_fft, split, BLOCK_K, BLOCK_F, str(device))
    with _cache_lock:
        hit = _basis_cache.get(key)
    if hit is not None:
        return hit
    cols, k_pad, f_pad = _geometry(frame_length, n_fft, split)
    n = torch.arange(k_pad, dtype=torch.int64)[:, None]
    k = torch.arange(f_pad, dtype=torch.int64)[None, :]
    keep = (n < min(frame_length, n_fft // 2 if split else n_fft)) & (k < cols)
    parts = []
    for bins in ((2 * k, 2 * k + 1) if split else (k,)):
        angle = (n * bins % n_fft).to(torch.float64) * (2.0 * math.pi / n_fft)  # exact phase reduction first
        parts += [torch.where(keep, torch.cos(angle), 0.0), torch.where(keep, -torch.sin(angle), 0.0)]
    basis = torch.stack(parts).to(torch.float32).contiguous().to(device)
    with _cache_lock:
        _basis_cache[key] = basis
    return basis


def _version_of(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _mel_operand(mel_banks: torch.Tensor, n_fft: int, split: bool, block_m: int) -> torch.Tensor:
    """The mel operand, (F_PAD, BLOCK_M) or (2, F_PAD, BLOCK_M) float32, zero-padded.

    Direct: row k weighs bin k. Split: row k of [0] weighs bin 2k, row k of [1] bin 2k + 1. Cached on
    the identity and version counter of ``mel_banks`` (held by a weak reference, so a freed tensor whose memory is
    reused never hits); another tensor or an in-place change rebuilds it (a few small device ops).
    """
    cols, _, f_pad = _geometry(1, n_fft, split)
    key = (n_fft, split, block_m, BLOCK_F, tuple(mel_banks.shape), str(mel_banks.device))
    version = _version_of(mel_banks)
    with _cache_lock:
        hit = _mel_cache.get(id(mel_banks))
    if hit is not None and version is not None:
        ref, hit_version, hit_key, operand = hit
        if ref() is mel_banks and hit_version == version and hit_key == key:
            return operand
    num_bins, dev = mel_banks.shape[0], mel_banks.device
    operand = torch.zeros((2 if split else 1, f_pad, block_m), dtype=torch.float32, device=dev)
    if split:
        operand[0, :cols, :num_bins] = mel_banks[:, 0 : 2 * cols : 2].t()
        operand[1, :cols, :num_bins] = mel_banks[:, 1 : 2 * cols : 2].t()
    else:
        operand[0, :cols, :num_bins] = mel_banks[:, :cols].t()
    if version is not None:
        with _cache_lock:
            if len(_mel_cache) >= _MEL_CACHE_SIZE:
                _mel_cache.pop(next(iter(_mel_cache)))
            _mel_cache[id(mel_banks)] = (weakref.ref(mel_banks), version, key, operand)
    return operand


# --- launcher ---------------------------------------------------------------------------------------------------------


def _is_interpreted() -> bool:
    return type(_fbank_fwd_kernel).__name__ == "InterpretedFunction"


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest float32 (to nearest even; +-inf past the float32 range)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _fp32_scalar(name: str, value) -> float:
    """A finite number, rounded to fp32: the interpreter then computes with it as the GPU does (in fp32)."""
    rounded = _fp32(check_real(name, value))
    if not math.isfinite(rounded):
        raise ValueError(f"{name} must be finite in float32, got {value}")
    return rounded


def _check_count(name: str, value) -> int:
    """A frame count: an int >= 0 (a Python int: it reaches the kernel as is)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be at least 0, got {value}")
    return value


def _check_operand(name: str, x, ndim: int, dtype: torch.dtype, shape: tuple, device) -> None:
    """A contiguous tensor of ``ndim`` dimensions, ``dtype`` and ``shape`` (None: any size) on ``device``."""
    check_tensor(name, x, ndim=ndim, dtypes=(dtype,), device=device)
    for i, want in enumerate(shape):
        if want is not None and x.shape[i] != want:
            raise ValueError(
                f"{name} must have shape {tuple('*' if s is None else s for s in shape)}, got {tuple(x.shape)}"
            )
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _validate(waveforms, lengths, offsets, window, mel_banks, frame_length, frame_shift, n_fft, num_frames,
              out_frames, shift, scale, out_dtype) -> tuple[float, float]:
    _check_operand("waveforms", waveforms, 2, torch.float32, (None, None), None)
    dev = waveforms.device
    if dev.type != "cuda" and not _is_interpreted():
        raise ValueError(f"waveforms must be on a CUDA device (got {dev}); CPU tensors need TRITON_INTERPRET=1 set "
                         "before triton is imported")
    B, N = waveforms.shape
    if N >= 2**31:
        raise ValueError(f"waveforms rows must be shorter than 2**31 samples, got {N}")
    frame_length = check_positive_int("frame_length", frame_length)
    check_positive_int("frame_shift", frame_shift)
    n_fft = check_positive_int("n_fft", n_fft)
    if n_fft % 4:
        raise ValueError(f"n_fft must be a multiple of 4, got {n_fft}")
    if n_fft < frame_length:
        raise ValueError(f"n_fft ({n_fft}) must be at least frame_length ({frame_length})")
    _check_count("num_frames", num_frames)
    _check_count("out_frames", out_frames)
    _check_operand("lengths", lengths, 1, torch.int64, (B,), dev)
    _check_operand("offsets", offsets, 1, torch.float32, (B,), dev)
    _check_operand("window", window, 1, torch.float32, (frame_length,), dev)
    _check_operand("mel_banks", mel_banks, 2, torch.float32, (None, n_fft // 2 + 1), dev)
    if mel_banks.shape[0] < 1:
        raise ValueError("mel_banks must have at least one filter (row)")
    shift = _fp32_scalar("shift", shift)
    scale = _fp32_scalar("scale", scale)
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype, got {type(out_dtype).__name__}")
    if out_dtype not in MODEL_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, float16, bfloat16, got {out_dtype}")
    return shift, scale


def _bf16_by_hand(device_type: str) -> bool:
    """Whether the kernel rounds bfloat16 output with integer ops: only under the interpreter (see ``_to_output``)."""
    return device_type != "cuda"


def _aligned_rows(waveforms: torch.Tensor) -> torch.Tensor:
    """``waveforms`` with a row stride that is a multiple of 16 samples (a padded copy when it is not).

    Triton specialises an integer argument divisible by 16 (it knows the row starts are 64-byte aligned); without
    that hint the framing addresses of the sm_90 kernel take more registers and it spills (480 bytes, ptxas). Clips of
    a whole number of 10 ms hops at 16 kHz (160 samples) are already aligned; other lengths pay one copy."""
    if waveforms.stride(0) % 16 == 0:
        return waveforms
    B, N = waveforms.shape
    padded = waveforms.new_empty((B, -(-N // 16) * 16))[:, :N]
    return padded.copy_(waveforms)


def _launch(out, waveforms, lengths, offsets, window, mel_banks, frame_length, frame_shift, n_fft, num_frames,
            out_frames, shift, scale, split=None):
    """Run the kernel into ``out`` (B, out_frames, M), which it overwrites completely. Arguments already validated."""
    split = DFT_SPLIT if split is None else bool(split)
    waveforms = _aligned_rows(waveforms)
    B, N = waveforms.shape
    num_bins = mel_banks.shape[0]
    if B == 0 or out_frames == 0:
        return out
    if N < frame_length:  # no row has a frame (and an empty waveforms tensor has no pointer to pass)
        return out.fill_(_fp32((0.0 - shift) * scale))  # shift, scale are fp32: their exact product, rounded once
    block_m = max(16, triton.next_power_of_2(num_bins))
    _, k_pad, f_pad = _geometry(frame_length, n_fft, split)
    basis = _dft_basis(frame_length, n_fft, split, waveforms.device)
    mel_op = _mel_operand(mel_banks, n_fft, split, block_m)
    n_tiles = triton.cdiv(out_frames, BLOCK_T)
    for b0 in range(0, B, _MAX_GRID_Y):
        b1 = min(B, b0 + _MAX_GRID_Y)
        _fbank_fwd_kernel[(n_tiles, b1 - b0)](
            waveforms[b0:b1], lengths[b0:b1], offsets[b0:b1], window, basis, mel_op, out[b0:b1],
            N, waveforms.stride(0), out.stride(0), out.stride(1), num_frames, out_frames, num_bins, shift, scale,
            FRAME_LENGTH=frame_length, FRAME_SHIFT=frame_shift, K_PAD=k_pad, F_PAD=f_pad, HALF=n_fft // 2,
            SPLIT=split,
            BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_F=BLOCK_F, BLOCK_M=block_m,
            PREEMPH=PREEMPHASIS, EPS=LOG_FLOOR, PRECISION=DOT_PRECISION,
            BF16_BY_HAND=_bf16_by_hand(waveforms.device.type), num_warps=NUM_WARPS, num_stages=NUM_STAGES[split],
        )
    return out


def fbank_triton(waveforms, lengths, offsets, window, mel_banks, frame_length: int, frame_shift: int, n_fft: int,
                 num_frames: int, out_frames: int, shift: float, scale: float, out_dtype=torch.float32) -> torch.Tensor:
    """Batched Kaldi log-mel filterbank, normalised: (B, out_frames, M) in ``out_dtype``.

    Args:
        waveforms: (B, N) float32 contiguous.
        lengths: (B,) int64 valid samples per row.
        offsets: (B,) float32, subtracted from every sample of its row first.
        window: (frame_length,) float32.
        mel_banks: (M, n_fft // 2 + 1) float32 filters; the last (Nyquist) column must be 0 and is not read.
        frame_length, frame_shift, n_fft: frame geometry (``n_fft`` a multiple of 4, at least ``frame_length``).
        num_frames: frames computed per row at most (row b has ``min(F_b, num_frames)``, ``F_b`` its own count).
        out_frames: output frames; the others hold ``(0 - shift) * scale``.
        shift, scale: ``out = (log(max(mel, eps)) - shift) * scale``.
        out_dtype: float32, float16 or bfloat16 (computed in fp32, cast at the store).
    """
    shift, scale = _validate(waveforms, lengths, offsets, window, mel_banks, frame_length, frame_shift, n_fft,
                             num_frames, out_frames, shift, scale, out_dtype)
    B = waveforms.shape[0]
    out = torch.empty((B, out_frames, mel_banks.shape[0]), dtype=out_dtype, device=waveforms.device)
    if waveforms.device.type == "cuda":
        with torch.cuda.device(waveforms.device):
            return _launch(out, waveforms, lengths, offsets, window, mel_banks, frame_length, frame_shift, n_fft,
                           num_frames, out_frames, shift, scale)
    return _launch(out, waveforms, lengths, offsets, window, mel_banks, frame_length, frame_shift, n_fft, num_frames,
                   out_frames, shift, scale)
