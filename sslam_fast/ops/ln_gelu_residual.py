"""The fused tail of the CNN decoder block: ``ln_gelu_residual`` (ALGORITHM §2.2).

``ln_gelu_residual(y, z)`` = ``GELU(LayerNorm_C(y)) + z`` on (R, C, H, W) feature maps: LayerNorm over the C channels
at each position (no affine, eps 1e-5), exact GELU and the residual, one read of y and z and one write. Its backward
(``sslam_fast::ln_gelu_residual_backward``) recomputes the statistics from y and returns grad_out as z's gradient.
Upstream runs this tail as five kernels (two transposes, LayerNorm, GELU, add).

Both memory formats are handled without a copy: channels-last (the decoder's (R, H*W, C) token tensor viewed as
(R, C, H, W)) normalises contiguous rows of C values; contiguous NCHW runs the channel reduction with the positions as
vector lanes. The output has y's memory format.

Backends: ``reference`` (``sslam_fast.reference.ln_gelu_residual``, any device), ``cpp`` (csrc/ln_gelu_residual.cpp,
CPU, fp32 / fp16 / bf16, the auto choice on CPU) and ``triton`` (kernels/ln_gelu_residual.py; CUDA, or CPU under
``TRITON_INTERPRET=1``). Differentiable in y and z.
"""

from __future__ import annotations

import torch

from sslam_fast import _backend
from sslam_fast._checks import MODEL_DTYPES, check_tensor
from sslam_fast.reference import ln_gelu_residual as ref

__all__ = ["ln_gelu_residual"]


def _check(y: torch.Tensor, z: torch.Tensor) -> None:
    """Two (R, C, H, W) tensors of one shape, model dtype and device."""
    check_tensor("y", y, ndim=4, dtypes=MODEL_DTYPES)
    check_tensor("z", z, ndim=4, dtypes=MODEL_DTYPES, device=y.device)
    if z.shape != y.shape:
        raise ValueError(f"z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
    if z.dtype != y.dtype:
        raise TypeError(f"z must have y's dtype ({y.dtype}), got {z.dtype}")


def _validate_backward(grad_out: torch.Tensor, y: torch.Tensor) -> None:
    check_tensor("y", y, ndim=4, dtypes=MODEL_DTYPES)
    check_tensor("grad_out", grad_out, ndim=4, dtypes=MODEL_DTYPES, device=y.device)
    if grad_out.shape != y.shape:
        raise ValueError(f"grad_out must have y's shape {tuple(y.shape)}, got {tuple(grad_out.shape)}")


def _reference(y, z):
    # laid out as empty_like(y): the strides of the other backends and of the fake
    return torch.empty_like(y).copy_(ref.ln_gelu_residual(y, z))


def _reference_backward(grad_out, y):
    return torch.empty_like(y).copy_(ref.ln_gelu_residual_backward(grad_out, y))


def _save(ctx, inputs, output):
    y, _z = inputs
    ctx.save_for_backward(y)


def _grads(ctx, run_backward, grad_out):
    (y,) = ctx.saved_tensors
    grad_y = run_backward(grad_out, y) if ctx.needs_input_grad[0] else None
    grad_z = grad_out if ctx.needs_input_grad[1] else None  # the residual passes the gradient through unchanged
    return grad_y, grad_z


_op = _backend.define_op(
    "ln_gelu_residual",
    "(Tensor y, Tensor z) -> Tensor",
    fake=lambda y, z, backend: torch.empty_like(y),
    kernels={
        "reference": _reference,
        "cpp": _backend.compiled("ln_gelu_residual"),
        "triton": _backend.triton_kernel("ln_gelu_residual", "ln_gelu_residual_fwd_triton"),
    },
    checks={"cpp": _backend.compiled_available("ln_gelu_residual")},
    validate=_check,
    backward=_backend.Backward(
        "(Tensor grad_out, Tensor y) -> Tensor",
        fake=lambda grad_out, y, backend: torch.empty_like(y),
        kernels={
            "reference": _reference_backward,
            "cpp": _backend.compiled("ln_gelu_residual_backward"),
            "triton": _backend.triton_kernel("ln_gelu_residual", "ln_gelu_residual_bwd_triton"),
        },
        checks={"cpp": _backend.compiled_available("ln_gelu_residual_backward")},
        validate=_validate_backward,
        save=_save,
        grads=_grads,
    ),
)


def ln_gelu_residual(y: torch.Tensor, z: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``GELU(LayerNorm_C(y)) + z`` for (R, C, H, W) tensors: the tail of a decoder block (differentiable).

    Args:
        y: (R, C, H, W) float32 / float16 / bfloat16, the conv output; any memory format (channels-last is fastest).
        z: same shape, dtype and device: the block input (residual).
        backend: "auto" | "reference" | "cpp" | "triton".

    Returns:
        (R, C, H, W) in y's dtype and memory format. The LayerNorm (over C at each position, biased variance,
        eps 1e-5, no affine) and the exact-erf GELU run in fp32 with one rounding at the end. Gradients flow to y and
        z. Non-finite values propagate (no check: an fp16 overflow must reach the loss scaler).
    """
    _check(y, z)
    chosen = _backend.resolve("ln_gelu_residual", backend, y.device)
    return _op(y, z, chosen)
