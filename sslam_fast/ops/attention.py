"""Encoder self-attention (ALGORITHM §2.1): ``softmax_fp32(q k^T / sqrt(D)) v`` per head, no mask, as a dispatching op.

Backends:
- ``reference``: upstream's materialised path (``sslam_fast.reference.attention``), plain torch with its autograd.
- ``cpp`` (CPU tensors): ``torch.nn.functional.scaled_dot_product_attention``, i.e. ATen's fused C++ flash-attention
  CPU kernel (blocked online softmax, fp32 statistics) and its backward: a well-kept library kernel rather than
  hand-written C++ in ``csrc/``. SDPA falls back to its own math path for inputs its flash kernel does not take.
- ``cuda`` (CUDA tensors): ``flash_attn.flash_attn_func`` when the flash-attn package imports and the dtype is
  fp16 / bf16, else SDPA (which picks cuDNN / flash / memory-efficient itself). Both are autograd-aware ATen or
  flash ops, called directly: no custom-op wrapper.
- ``triton``: ``sslam_fast.kernels.attention``, a flash-attention forward and backward for these short sequences,
  wrapped as the custom op ``sslam_fast::flash_attention`` (forward, saves the log-sum-exp) with a registered
  autograd whose backward is the custom op ``sslam_fast::flash_attention_backward``, so ``torch.compile`` treats both
  as opaque.

All backends take the softmax statistics in fp32 and return the input dtype.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from sslam_fast import _backend
from sslam_fast._checks import check_tensor
from sslam_fast.reference import attention as ref

__all__ = ["attention"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- backends ---------------------------------------------------------------------------------------------------------


# Looked up once at import (``find_spec`` does not import the package, nor touch CUDA). Recent flash-attn releases
# wrap their kernels as torch.library ops, which ``torch.compile(fullgraph=True)`` traces through; with an older one
# the graph breaks there (not checked here: flash-attn is not installed on the CPU development machine).
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


# ATen's CPU flash kernel takes a row's maximum score with vector ops (NaN-propagating) over whole vectors of keys and
# with a scalar loop over the rest; only a row of fewer keys than one vector is all scalar and can lose its NaN.
# 16 fp32 keys is the widest vector it uses (AVX-512); measured: fp32 rows of 1-15 keys lose NaN, 16-199 keep it,
# while bf16 / fp16 rows lose it at every length tried (1-199), so those are always guarded. The model's fp32 rows
# have 26 keys (tiny) and more: the CPU training step does not pay for the guard (up to +10 % of the forward).
_FP32_VECTOR_KEYS = 16


def _nan_guard(q, k):
    """A (B, H, L, 1) fp32 tensor that is 0 where the reference's output row is finite and NaN where a non-finite q
    row or a NaN in k makes it NaN; added to SDPA's output, without a host sync.

    ATen's CPU flash kernel takes a row's running maximum with comparisons that skip NaN (its scalar path, for rows
    of fewer than 16 keys), so a row whose scores are all NaN looks fully masked and comes out as zeros: a NaN or
    +-inf in q with L <= 9 (measured), a NaN in k with L = 1. The reference gives NaN there:
      * a q row with NaN or +-inf: its scores hold NaN, inf - inf or 0 * inf, so the row is NaN. ``0 * min + 0 * max``
        of the row is 0 for finite values (no sum that could overflow) and NaN otherwise;
      * a NaN anywhere in k[b, h]: every score of the head is NaN, so the whole head is NaN. Only NaN: an infinity in
        k leaves some rows finite (a -inf score has weight 0), and the kernel already matches the reference there.
    NaN in v propagates through the kernel's sums. Computed out of autograd: the gradients stay SDPA's own."""
    with torch.no_grad():
        # amax and amin, not aminmax: the fused one is not vectorised over a short last dim (60x slower, measured)
        lo, hi = q.amin(dim=-1, keepdim=True), q.amax(dim=-1, keepdim=True)
        k_nan = torch.isnan(k.amax(dim=(-2, -1), keepdim=True))  # amax propagates NaN; (B, H, 1, 1)
        return lo.float() * 0.0 + hi.float() * 0.0 + torch.where(k_nan, float("nan"), 0.0)


def _attention_cpp(q, k, v):
    # ATen's CPU flash attention (``_scaled_dot_product_flash_attention_for_cpu``); same scale as upstream.
    out = F.scaled_dot_product_attention(q, k, v, scale=ref.softmax_scale(q.shape[-1]))
    if q.dtype == torch.float32 and k.shape[-2] >= _FP32_VECTOR_KEYS:  # the vectorised max sees every NaN: no guard
        return out
    guard = _nan_guard(q, k).to(out.dtype)  # NaN stays NaN, as the docstring promises
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return out + guard  # SDPA's backward saved out: no in-place change of it
    return out.add_(guard)  # no new (B, H, L, D) buffer (measured: the allocation cost more than the guard)


def _attention_cuda(q, k, v):
    scale = ref.softmax_scale(q.shape[-1])
    if HAS_FLASH_ATTN and q.dtype != torch.float32:  # flash-attn takes fp16 / bf16 only
        from flash_attn import flash_attn_func

        # flash-attn wants (B, L, H, D) with unit stride on D: a transposed view, no copy for upstream's qkv views.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _attention_triton(q, k, v):
    return _flash_attention_op(q, k, v)[0]


_backend.register_op(
    _backend.OpBackends(
        "attention",
        kernels={
            "reference": ref.attention,
            "cpp": _attention_cpp,
            "cuda": _attention_cuda,
            "triton": _attention_triton,
        },
        checks={"cpp": lambda d: True, "cuda": lambda d: True},  # SDPA is always there
    )
)


# --- custom ops (triton backend) --------------------------------------------------------------------------------------


@torch.library.custom_op("sslam_fast::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, L, D) in q's dtype, lse (B, H, L) fp32 natural log-sum-exp of the scaled scores)."""
    from sslam_fast.kernels.attention import flash_attention_fwd

    return flash_attention_fwd(q, k, v)


def _empty_blhd(like: torch.Tensor) -> torch.Tensor:
    # The kernels' layout: (B, H, L, D) views of (B, L, H, D) memory (see kernels/attention.py).
    B, H, L, D = like.shape
    return like.new_empty((B, L, H, D)).transpose(1, 2)


@_flash_attention_op.register_fake
def _(q, k, v):
    B, H, L, _ = q.shape
    return _empty_blhd(q), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("sslam_fast::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each (B, H, L, D) in q's dtype, recomputing P from ``lse``."""
    from sslam_fast.kernels.attention import flash_attention_bwd

    return flash_attention_bwd(grad_out, q, k, v, out, lse)


@_flash_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse):
    return _empty_blhd(q), _empty_blhd(q), _empty_blhd(q)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)  # a statistic for the backward, not a differentiable output


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attention_backward_op(grad_out, q, k, v, out, lse)
    return dq, dk, dv


_flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --- public function --------------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Multi-head self-attention of the encoder blocks, ``AltAttention`` from q, k, v on (ALGORITHM §2.1).

    Args:
        q, k, v: (B, H, L, D) float32 / float16 / bfloat16, identical shape, dtype and device; D in {16, 32, 64, 128}
            (64 in the model); B is any batch, e.g. clips x clones. Any strides (upstream's permuted ``qkv`` views
            are fine). No mask: every query attends to all L keys.
        backend: "auto" | "reference" | "cpp" | "cuda" | "triton" (see ``sslam_fast._backend``). auto picks cuda on
            CUDA tensors and cpp (ATen's SDPA CPU kernel) on CPU tensors.

    Returns:
        (B, H, L, D) in the input dtype: ``softmax((q @ k^T) * D**-0.5, dim=-1, dtype=float32).to(dtype) @ v``.
        Differentiable in q, k and v with every backend. Inputs are not checked for NaN (that would cost a device
        sync per layer); NaN propagates to the output.
    """
    check_tensor("q", q, ndim=4, dtypes=_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=_DTYPES, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if q.shape[-1] not in ref.HEAD_DIMS:
        raise ValueError(f"q: head dim (last dimension) must be one of {ref.HEAD_DIMS}, got {q.shape[-1]}")
    chosen = _backend.resolve("attention", backend, q.device)
    return _backend.kernel("attention", chosen)(q, k, v)
