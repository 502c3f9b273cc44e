"""The CNN decoder block of EAT / SSLAM as ATen conv + one fused custom op (ALGORITHM §2.2).

``decoder_block(z, w, b, groups)`` = ``GELU(LayerNorm_C(GroupConv3x3(z))) + z`` on (R, C, H, W) feature maps. The
grouped convolution (and its backward) stays in ATen / cuDNN; everything after it is the custom op
``sslam_fast::ln_gelu_residual(y, z) -> out``: LayerNorm over the C channels at each position (no affine, eps 1e-5),
exact GELU and the residual, one read of y and z and one write, with a registered backward
(``sslam_fast::ln_gelu_residual_backward``) that recomputes the statistics and returns grad_out as z's gradient.
Upstream runs this tail as five kernels (two transposes, LayerNorm, GELU, add).

On CUDA the block runs channels-last: z is converted (a no-op when the caller already holds the (R, H*W, C) token
tensor viewed as (R, C, H, W)), cuDNN keeps the format, and the fused kernel then normalises contiguous rows.

On CPU the model's fast decoder path hands the block a channels-last view too (the token tensor); the CPU conv keeps
that format, and the C++ kernel normalises contiguous rows of C values. Contiguous NCHW input is handled without a
copy as well (the channel reduction then runs with the positions as vector lanes).

Backends: ``reference`` (plain PyTorch, any device), ``cpp`` (``sslam_fast._C``, CPU: csrc/decoder.cpp, fp32 / fp16 /
bf16, the auto choice on CPU) and ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from sslam_fast import _backend
from sslam_fast._checks import check_tensor
from sslam_fast.reference import training as ref

__all__ = ["decoder_block", "ln_gelu_residual"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fwd_triton(y, z):
    from sslam_fast.kernels.decoder import ln_gelu_residual_fwd_triton

    return ln_gelu_residual_fwd_triton(y, z, ref.NORM_EPS)


def _bwd_triton(grad_out, y):
    from sslam_fast.kernels.decoder import ln_gelu_residual_bwd_triton

    return ln_gelu_residual_bwd_triton(grad_out, y, ref.NORM_EPS)


def _fwd_cpp(y, z):
    return torch.ops.sslam_fast.ln_gelu_residual_cpu(y, z)


def _bwd_cpp(grad_out, y):
    return torch.ops.sslam_fast.ln_gelu_residual_backward_cpu(grad_out, y)


def _fwd_reference(y, z):
    # Same strides as the Triton launcher and the fake kernel (empty_like(y)): opcheck compares them.
    return torch.empty_like(y).copy_(ref.ln_gelu_residual(y, z))


def _bwd_reference(grad_out, y):
    return torch.empty_like(y).copy_(ref.ln_gelu_residual_backward(grad_out, y))


_backend.register_op(
    _backend.OpBackends(
        "ln_gelu_residual",
        kernels={"reference": _fwd_reference, "cpp": _fwd_cpp, "triton": _fwd_triton},
        checks={"cpp": lambda d: _backend.extension_has("ln_gelu_residual_cpu")},
    )
)
_backend.register_op(
    _backend.OpBackends(
        "ln_gelu_residual_backward",
        kernels={"reference": _bwd_reference, "cpp": _bwd_cpp, "triton": _bwd_triton},
        checks={"cpp": lambda d: _backend.extension_has("ln_gelu_residual_backward_cpu")},
    )
)

if _backend.extension_has("ln_gelu_residual_cpu"):  # so that opcheck / FakeTensor can trace the C++ ops themselves

    @torch.library.register_fake("sslam_fast::ln_gelu_residual_cpu")
    def _(y, z):
        return torch.empty_like(y)

    @torch.library.register_fake("sslam_fast::ln_gelu_residual_backward_cpu")
    def _(grad_out, y):
        return torch.empty_like(y)


# --- custom ops -------------------------------------------------------------------------------------------------------


@torch.library.custom_op("sslam_fast::ln_gelu_residual", mutates_args=())
def _ln_gelu_residual_op(y: torch.Tensor, z: torch.Tensor, backend: str) -> torch.Tensor:
    return _backend.kernel("ln_gelu_residual", backend)(y, z)


@_ln_gelu_residual_op.register_fake
def _(y, z, backend):
    return torch.empty_like(y)


@torch.library.custom_op("sslam_fast::ln_gelu_residual_backward", mutates_args=())
def _ln_gelu_residual_backward_op(grad_out: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    return _backend.kernel("ln_gelu_residual_backward", backend)(grad_out, y)


@_ln_gelu_residual_backward_op.register_fake
def _(grad_out, y, backend):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    y, _z, backend = inputs
    ctx.save_for_backward(y)
    ctx.backend = backend


def _backward(ctx, grad_out):
    (y,) = ctx.saved_tensors
    grad_y = _ln_gelu_residual_backward_op(grad_out, y, ctx.backend) if ctx.needs_input_grad[0] else None
    grad_z = grad_out if ctx.needs_input_grad[1] else None  # the residual passes the gradient through unchanged
    return grad_y, grad_z, None


_ln_gelu_residual_op.register_autograd(_backward, setup_context=_setup_context)


# --- public functions -------------------------------------------------------------------------------------------------


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
    check_tensor("y", y, ndim=4, dtypes=_DTYPES)
    check_tensor("z", z, ndim=4, dtypes=_DTYPES, device=y.device)
    if z.shape != y.shape:
        raise ValueError(f"z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
    if z.dtype != y.dtype:
        raise TypeError(f"z must have y's dtype ({y.dtype}), got {z.dtype}")
    chosen = _backend.resolve("ln_gelu_residual", backend, y.device)
    return _ln_gelu_residual_op(y, z, chosen)


def decoder_block(
    z: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    groups: int = 16,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One EAT decoder block with its residual: ``GELU(LayerNorm_C(GroupConv(z))) + z`` (ALGORITHM §2.2).

    Args:
        z: (R, C, H, W) float32 / float16 / bfloat16, channel-first like upstream (H = 64 time, W = 8 frequency
            patches in EAT); any memory format. On CUDA it is used channels-last.
        conv_weight: (C, C // groups, k, k) with k odd (3 upstream), z's dtype and device.
        conv_bias: (C,) or None, z's dtype and device.
        groups: the conv groups (16 upstream); must divide C.
        backend: "auto" | "reference" | "cpp" | "triton" for the fused LayerNorm + GELU + residual.

    Returns:
        (R, C, H, W) in z's dtype: ``conv2d(z, w, b, padding=k // 2, groups)`` (ATen), then ``ln_gelu_residual``.
        Differentiable in z, conv_weight and conv_bias.
    """
    check_tensor("z", z, ndim=4, dtypes=_DTYPES)
    check_tensor("conv_weight", conv_weight, ndim=4, dtypes=_DTYPES, device=z.device)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    C = z.shape[1]
    if C % groups:
        raise ValueError(f"groups ({groups}) must divide the channels of z ({C})")
    k = conv_weight.shape[-1]
    if conv_weight.shape != (C, C // groups, k, k) or k % 2 == 0:
        raise ValueError(
            f"conv_weight must have shape (C, C // groups, k, k) = ({C}, {C // groups}, k, k) with k odd, "
            f"got {tuple(conv_weight.shape)}"
        )
    if conv_weight.dtype != z.dtype:
        raise TypeError(f"conv_weight must have z's dtype ({z.dtype}), got {conv_weight.dtype}")
    if conv_bias is not None:
        check_tensor("conv_bias", conv_bias, ndim=1, dtypes=_DTYPES, device=z.device)
        if conv_bias.shape != (C,):
            raise ValueError(f"conv_bias must have shape ({C},), got {tuple(conv_bias.shape)}")
        if conv_bias.dtype != z.dtype:
            raise TypeError(f"conv_bias must have z's dtype ({z.dtype}), got {conv_bias.dtype}")
    chosen = _backend.resolve("ln_gelu_residual", backend, z.device)
    if z.is_cuda:
        z = z.contiguous(memory_format=torch.channels_last)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, conv_weight, conv_bias)):
        return _DecoderBlock.apply(z, conv_weight, conv_bias, int(groups), chosen)
    y = F.conv2d(z, conv_weight, conv_bias, padding=k // 2, groups=groups)
    return _ln_gelu_residual_op(y.to(z.dtype), z, chosen)


class _DecoderBlock(torch.autograd.Function):
    """conv -> fused LayerNorm + GELU + residual, storing only the block input z for the backward.

    Autograd of the two ops would keep z (for the conv's weight gradient) and the conv output y (for the LayerNorm
    backward): two feature maps per block. This keeps z and recomputes y with the same conv kernel on the same
    inputs (bit for bit the forward's y) when the backward reaches the block: one extra conv forward per block
    (about a third of the block's conv work) for half of the decoder's stored activations.

    Under autocast the conv runs in the autocast dtype, as ``F.conv2d`` would, and the fused tail takes its output in
    z's dtype (upstream's LayerNorm runs in fp32 under autocast); gradients come back in each input's dtype.
    """

    @staticmethod
    def forward(ctx, z, w, b, groups, backend):
        y = F.conv2d(z, w, b, padding=w.shape[-1] // 2, groups=groups)  # autocast (any device) may pick the dtype
        ctx.save_for_backward(z, w, b)
        ctx.groups, ctx.backend, ctx.conv_dtype = groups, backend, y.dtype
        return _ln_gelu_residual_op(y.to(z.dtype), z, backend)

    @staticmethod
    def backward(ctx, grad_out):
        z, w, b = ctx.saved_tensors
        pad, cdt = w.shape[-1] // 2, ctx.conv_dtype
        zc, wc, bc = z.to(cdt), w.to(cdt), None if b is None else b.to(cdt)  # what the forward's conv consumed
        with torch.autocast(z.device.type, enabled=False):
            y = F.conv2d(zc, wc, bc, padding=pad, groups=ctx.groups)  # recomputed: the forward did not keep it
        grad_y = _ln_gelu_residual_backward_op(grad_out, y.to(z.dtype), ctx.backend)
        del y
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        gz, gw, gb = torch.ops.aten.convolution_backward(
            grad_y.to(cdt), zc, wc, [w.shape[0]] if b is not None else None, [1, 1], [pad, pad],
            [1, 1], False, [0, 0], ctx.groups, [need_z, need_w, need_b and b is not None],
        )
        grad_z = grad_out + gz.to(z.dtype) if need_z else None
        grad_w = gw.to(w.dtype) if need_w else None
        grad_b = gb.to(b.dtype) if need_b and b is not None else None
        return grad_z, grad_w, grad_b, None, None
