"""Encoder self-attention (ALGORITHM §2.1): ``softmax_fp32(q k^T / sqrt(D)) v`` per head, no mask.

The custom op ``sslam_fast::attention(q, k, v, backend) -> (out, lse)`` returns the output and the softmax statistics
its backward needs; its backward is the custom op ``sslam_fast::attention_backward(grad_out, q, k, v, out, lse)
-> (dq, dk, dv)``, run by the backend that ran the forward. ``torch.compile`` treats both as opaque with every backend.

Backends:
- ``reference``: upstream's materialised path (``sslam_fast.reference.attention``); lse (B, H, L) fp32 from the
  inputs; the backward is torch's autograd of the reference, recomputed (the upstream gradient, not a fast path).
- ``cpp`` (CPU tensors): ATen's fused flash-attention CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``:
  blocked online softmax, fp32 statistics) and its backward, the kernels ``F.scaled_dot_product_attention`` runs on
  CPU for these inputs: a well-kept library kernel rather than hand-written C++ in ``csrc/``. lse is (B, H, L) fp32
  (a view of (B, L, H) memory).
- ``cuda`` (CUDA tensors): ATen's FlashAttention-2 kernel (``_scaled_dot_product_flash_attention``) for fp16 / bf16,
  its memory-efficient kernel (``_scaled_dot_product_efficient_attention``) for fp32 (flash takes 16-bit inputs
  only), forward and backward. The memory-efficient kernel's lse is (B, H, L rounded up to a multiple of 32). The
  flash-attn package is not used: its kernels are not reachable as an opaque op without its private ops, and
  PyTorch's flash kernel is the same FlashAttention-2 algorithm.
- ``triton``: ``sslam_fast.kernels.attention``, a flash-attention forward and backward for these short sequences; lse
  (B, H, L) fp32.

All backends take the softmax statistics in fp32 and return the input dtype.
"""

from __future__ import annotations

import torch

from sslam_fast import _backend
from sslam_fast._checks import MODEL_DTYPES, check_tensor
from sslam_fast.reference import attention as ref

__all__ = ["attention"]


# --- checks -----------------------------------------------------------------------------------------------------------


def _validate(q, k, v) -> None:
    """q, k, v: (B, H, L, D) tensors of one shape, dtype and device, D in ``HEAD_DIMS`` (metadata only)."""
    check_tensor("q", q, ndim=4, dtypes=MODEL_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=MODEL_DTYPES, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if q.shape[-1] not in ref.HEAD_DIMS:
        raise ValueError(f"q: head dim (last dimension) must be one of {ref.HEAD_DIMS}, got {q.shape[-1]}")


def _validate_backward(grad_out, q, k, v, out, lse) -> None:
    _validate(q, k, v)
    for name, t in (("grad_out", grad_out), ("out", out)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    check_tensor("lse", lse, ndim=3, dtypes=(torch.float32,), device=q.device)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _scale(q: torch.Tensor) -> float:
    return ref.softmax_scale(q.shape[-1])  # upstream's head_dim ** -0.5


# --- reference --------------------------------------------------------------------------------------------------------


def _attention_reference(q, k, v):
    return ref.attention(q, k, v).contiguous(), ref.attention_lse(q, k)


def _attention_backward_reference(grad_out, q, k, v, out, lse):
    return tuple(g.contiguous() for g in ref.attention_backward(grad_out, q, k, v))


# --- cpp: ATen's CPU flash-attention kernels --------------------------------------------------------------------------

# ATen's CPU flash kernel takes a row's maximum score with vector ops (NaN-propagating) over whole vectors of keys and
# with a scalar loop over the rest; only a row of fewer keys than one vector is all scalar and can lose its NaN.
# 16 fp32 keys is the widest vector it uses (AVX-512); measured: fp32 rows of 1-15 keys lose NaN, 16-199 keep it,
# while bf16 / fp16 rows lose it at every length tried (1-199), so those are always guarded. The model's fp32 rows
# have 26 keys (tiny) and more: the CPU training step does not pay for the guard (up to +10 % of the forward).
_FP32_VECTOR_KEYS = 16


def _guarded(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel can lose a NaN for these inputs, so the forward adds :func:`_nan_guard`."""
    return not (q.dtype == torch.float32 and k.shape[-2] >= _FP32_VECTOR_KEYS)


def _nan_guard(q, k):
    """A (B, H, L, 1) fp32 tensor that is 0 where the reference's output row is finite and NaN where a non-finite q
    row or a NaN in k makes it NaN; added to the kernel's output, without a host sync.

    ATen's CPU flash kernel takes a row's running maximum with comparisons that skip NaN (its scalar path, for rows
    of fewer than 16 keys), so a row whose scores are all NaN looks fully masked and comes out as zeros: a NaN or
    +-inf in q with L <= 9 (measured), a NaN in k with L = 1. The reference gives NaN there:
      * a q row with NaN or +-inf: its scores hold NaN, inf - inf or 0 * inf, so the row is NaN. ``0 * min + 0 * max``
        of the row is 0 for finite values (no sum that could overflow) and NaN otherwise;
      * a NaN anywhere in k[b, h]: every score of the head is NaN, so the whole head is NaN. Only NaN: an infinity in
        k leaves some rows finite (a -inf score has weight 0), and the kernel already matches the reference there.
    NaN in v propagates through the kernel's sums."""
    # amax and amin, not aminmax: the fused one is not vectorised over a short last dim (60x slower, measured)
    lo, hi = q.amin(dim=-1, keepdim=True), q.amax(dim=-1, keepdim=True)
    k_nan = torch.isnan(k.amax(dim=(-2, -1), keepdim=True))  # amax propagates NaN; (B, H, 1, 1)
    return lo.float() * 0.0 + hi.float() * 0.0 + torch.where(k_nan, float("nan"), 0.0)


def _flash_cpu(q, k, v):
    """(out, lse) of ATen's CPU flash kernel, as ``F.scaled_dot_product_attention`` calls it; lse (B, H, L) fp32."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=_scale(q))


def _attention_cpp(q, k, v):
    out, lse = _flash_cpu(q, k, v)
    if _guarded(q, k):
        out.add_(_nan_guard(q, k).to(out.dtype))  # NaN stays NaN, as the docstring promises; in place: no new buffer
    return out, lse


def _attention_backward_cpp(grad_out, q, k, v, out, lse):
    if _guarded(q, k) and bool(out.isnan().any()):
        # The forward's guard may have put NaN where the kernel wrote a number: the gradient is the kernel's own,
        # from the kernel's own output (recomputed; only for non-finite inputs).
        out, lse = _flash_cpu(q, k, v)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, scale=_scale(q)
    )


# --- cuda: ATen's CUDA flash (fp16 / bf16) and memory-efficient (fp32) kernels ----------------------------------------


def _cuda_outputs(q):
    """Empty (out, lse) laid out as the CUDA kernels lay them out: flash allocates out like q (``empty_like`` of the
    (B, L, H, D) view it works on: q's stride order), lse (B, H, L); the memory-efficient kernel allocates out as
    (B, L, H, D) memory and pads lse to a multiple of 32 queries."""
    B, H, L, D = q.shape
    if q.dtype == torch.float32:
        return q.new_empty((B, L, H, D)).transpose(1, 2), q.new_empty((B, H, -(-L // 32) * 32), dtype=torch.float32)
    return torch.empty_like(q), q.new_empty((B, H, L), dtype=torch.float32)


def _cuda_grads(q, k, v):
    """Empty (dq, dk, dv) laid out as the CUDA backward kernels lay them out (flash: like each input; memory-efficient:
    (B, L, H, D) memory)."""
    if q.dtype == torch.float32:
        return tuple(t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).transpose(1, 2) for t in (q, k, v))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_cuda(q, k, v):
    q, k, v = (_unit_last(t) for t in (q, k, v))  # both kernels need a unit stride on D
    if q.numel() == 0:  # the flash kernel refuses an empty batch
        return _cuda_outputs(q)
    if q.dtype == torch.float32:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=_scale(q)
        )
        return out, lse
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=_scale(q))
    return out, lse


def _attention_backward_cuda(grad_out, q, k, v, out, lse):
    q, k, v = (_unit_last(t) for t in (q, k, v))
    if q.numel() == 0:
        return _cuda_grads(q, k, v)
    # The forward's other results, as SDPA's autograd passes them (torch's derivatives.yaml): with dropout 0 the
    # philox seed and offset are never read, and the cumulative sequence lengths are undefined (no varlen batch).
    if q.dtype == torch.float32:
        seed, offset = q.new_empty((), dtype=torch.int64), q.new_empty((), dtype=torch.int64)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], False, scale=_scale(q)
        )
        return dq, dk, dv
    L = q.shape[2]
    seed, offset = q.new_empty((2,), dtype=torch.uint64), q.new_empty((), dtype=torch.uint64)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out, q, k, v, out, lse, None, None, L, L, 0.0, False, seed, offset, scale=_scale(q)
    )


# --- the op -----------------------------------------------------------------------------------------------------------


def _empty_blhd(like: torch.Tensor) -> torch.Tensor:
    # The Triton kernels' layout: (B, H, L, D) views of (B, L, H, D) memory (see kernels/attention.py).
    B, H, L, D = like.shape
    return like.new_empty((B, L, H, D)).transpose(1, 2)


def _fake(q, k, v, backend):
    b = _backend.base_name(backend)
    if b == "cpp":
        return _flash_cpu(q, k, v)  # the ATen kernel's own meta
    if b == "cuda":
        return _cuda_outputs(_unit_last(q))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return (_empty_blhd(q) if b == "triton" else q.new_empty(q.shape)), lse


def _fake_backward(grad_out, q, k, v, out, lse, backend):
    b = _backend.base_name(backend)
    if b == "cpp":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, scale=_scale(q)
        )
    if b == "cuda":
        return _cuda_grads(*(_unit_last(t) for t in (q, k, v)))
    if b == "triton":
        return _empty_blhd(q), _empty_blhd(q), _empty_blhd(q)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _save(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)  # a statistic for the backward, not a differentiable output
    ctx.set_materialize_grads(False)  # lse's gradient is never read: no tensor of zeros for it


def _grads(ctx, run_backward, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:  # the output's gradient is zero (not materialised)
        return None, None, None
    dq, dk, dv = run_backward(grad_out, q, k, v, out, lse)
    return dq, dk, dv


_op = _backend.define_op(
    "attention",
    "(Tensor q, Tensor k, Tensor v) -> (Tensor out, Tensor lse)",
    fake=_fake,
    kernels={
        "reference": _attention_reference,
        "cpp": _attention_cpp,
        "cuda": _attention_cuda,
        "triton": _backend.triton_kernel("attention", "flash_attention_fwd"),
    },
    checks={"cpp": _backend.always, "cuda": _backend.always},
    validate=_validate,
    backward=_backend.Backward(
        "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse) -> (Tensor dq, Tensor dk, Tensor dv)",
        fake=_fake_backward,
        kernels={
            "reference": _attention_backward_reference,
            "cpp": _attention_backward_cpp,
            "cuda": _attention_backward_cuda,
            "triton": _backend.triton_kernel("attention", "flash_attention_bwd"),
        },
        validate=_validate_backward,
        save=_save,
        grads=_grads,
    ),
)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Multi-head self-attention of the encoder blocks, ``AltAttention`` from q, k, v on (ALGORITHM §2.1).

    Args:
        q, k, v: (B, H, L, D) float32 / float16 / bfloat16, identical shape, dtype and device; D in {16, 32, 64, 128}
            (64 in the model); B is any batch, e.g. clips x clones. Any strides (upstream's permuted ``qkv`` views
            are fine). No mask: every query attends to all L keys.
        backend: "auto" | "reference" | "cpp" | "cuda" | "triton" (see ``sslam_fast._backend``). auto picks cuda on
            CUDA tensors and cpp (ATen's CPU flash kernel) on CPU tensors.

    Returns:
        (B, H, L, D) in the input dtype: ``softmax((q @ k^T) * D**-0.5, dim=-1, dtype=float32).to(dtype) @ v``.
        Differentiable in q, k and v with every backend. Inputs are not checked for NaN (that would cost a device
        sync per layer); NaN propagates to the output.
    """
    _validate(q, k, v)
    chosen = _backend.resolve("attention", backend, q.device)
    return _op(q, k, v, chosen)[0]
