"""One block of the CNN decoder of EAT / SSLAM as a custom op: ``decoder_block`` (ALGORITHM §2.2).

``decoder_block(z, w, b, groups)`` = ``GELU(LayerNorm_C(GroupConv(z))) + z`` on (R, C, H, W) feature maps. The op
``sslam_fast::decoder_block`` runs the grouped convolution in ATen / cuDNN, then the fused tail
(``sslam_fast.ops.ln_gelu_residual``) of the chosen backend. Its backward ``sslam_fast::decoder_block_backward``
recomputes the conv output, runs the tail's backward and ``aten.convolution_backward``; z's gradient is the conv's plus
grad_out (the residual).

Memory. Autograd of conv + tail would keep z (for the conv's weight gradient) and the conv output y (for the LayerNorm
backward): two feature maps per block. The op keeps z, conv_weight and conv_bias and recomputes y with the same conv
kernel on the same inputs (bit for bit the forward's y) when the backward reaches the block: one extra conv forward per
block (about a third of the block's conv work) for half of the decoder's stored activations.

Layout. On CUDA the block runs channels-last: z is converted (a no-op when the caller already holds the (R, H*W, C)
token tensor viewed as (R, C, H, W)), cuDNN keeps the format, and the fused tail then normalises contiguous rows. On
CPU the block keeps the caller's layout (the model's decoder hands it the channels-last token view too).

Autocast. The conv runs in conv_weight's dtype on z cast to it; under autocast the op casts conv_weight and conv_bias
to the autocast dtype (the casts stay in the autograd graph: fp32 parameters get fp32 gradients), so the conv runs in
that dtype as ``F.conv2d`` would, and the fused tail takes its output in z's dtype (upstream's LayerNorm runs in fp32
under autocast).

Backends (of the tail): ``reference``, ``cpp`` (CPU, the auto choice there) and ``triton`` (CUDA, or CPU under
``TRITON_INTERPRET=1``). Differentiable in z, conv_weight and conv_bias.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from sslam_fast import _backend
from sslam_fast._checks import MODEL_DTYPES, check_tensor, is_int

__all__ = ["decoder_block"]

_TAIL = "ln_gelu_residual"
importlib.import_module(f"sslam_fast.ops.{_TAIL}")  # defines the tail op, whose kernels the block runs
_BACKENDS = ("reference", "cpp", "triton")


def _check(z: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, groups: int) -> None:
    """Shapes, devices and groups (the dtypes of conv_weight and conv_bias may differ from z's under autocast)."""
    check_tensor("z", z, ndim=4, dtypes=MODEL_DTYPES)
    check_tensor("conv_weight", conv_weight, ndim=4, dtypes=MODEL_DTYPES, device=z.device)
    if not is_int(groups) or groups <= 0:
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
    if conv_bias is not None:
        check_tensor("conv_bias", conv_bias, ndim=1, dtypes=MODEL_DTYPES, device=z.device)
        if conv_bias.shape != (C,):
            raise ValueError(f"conv_bias must have shape ({C},), got {tuple(conv_bias.shape)}")


def _validate_backward(grad_out, z, conv_weight, conv_bias, groups, output_mask) -> None:
    _check(z, conv_weight, conv_bias, groups)
    check_tensor("grad_out", grad_out, ndim=4, dtypes=MODEL_DTYPES, device=z.device)
    if grad_out.shape != z.shape:
        raise ValueError(f"grad_out must have z's shape {tuple(z.shape)}, got {tuple(grad_out.shape)}")


def _layout(z: torch.Tensor) -> torch.Tensor:
    return z.contiguous(memory_format=torch.channels_last) if z.is_cuda else z


def _forward(tail):
    """The block with ``tail(y, z)`` as its fused tail."""

    def run(z, w, b, groups):
        z = _layout(z)
        with torch.autocast(z.device.type, enabled=False):
            y = F.conv2d(z.to(w.dtype), w, b, padding=w.shape[-1] // 2, groups=groups)
            return tail(y.to(z.dtype), z)

    return run


def _backward(tail_backward):
    """The block's backward with ``tail_backward(grad_out, y)`` as the tail's."""

    def run(grad_out, z, w, b, groups, output_mask):
        need_z, need_w, need_b = output_mask
        z = _layout(z)
        pad = w.shape[-1] // 2
        zc = z.to(w.dtype)  # what the forward's conv consumed
        with torch.autocast(z.device.type, enabled=False):
            y = F.conv2d(zc, w, b, padding=pad, groups=groups)  # recomputed: the forward did not keep it
            grad_y = tail_backward(grad_out, y.to(z.dtype))
            del y
            gz, gw, gb = torch.ops.aten.convolution_backward(
                grad_y.to(w.dtype), zc, w, [w.shape[0]] if b is not None else None, [1, 1], [pad, pad],
                [1, 1], False, [0, 0], groups, [need_z, need_w, need_b and b is not None],
            )
        grad_z = grad_out + gz.to(z.dtype) if need_z else None
        return grad_z, (gw if need_w else None), (gb if need_b and b is not None else None)

    return run


def _tail(op: str, backend: str):
    """The kernel of ``backend`` for the tail op ``op``, looked up at call time."""

    def run(*args):
        return _backend.kernel(op, backend)(*args)

    return run


def _fake(z, w, b, groups, backend):
    return _forward(lambda y, z: torch.empty_like(y))(z, w, b, groups)  # every tail's output is laid out like y


def _fake_backward(grad_out, z, w, b, groups, output_mask, backend):
    return _backward(lambda grad_out, y: torch.empty_like(y))(grad_out, z, w, b, groups, output_mask)


def _save(ctx, inputs, output):
    z, w, b, groups = inputs
    ctx.save_for_backward(z, w, b)
    ctx.groups = groups


def _grads(ctx, run_backward, grad_out):
    z, w, b = ctx.saved_tensors
    need_z, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and b is not None
    if not (need_z or need_w or need_b):
        return None, None, None, None
    grad_z, grad_w, grad_b = run_backward(grad_out, z, w, b, ctx.groups, [need_z, need_w, need_b])
    return grad_z, grad_w, grad_b, None


_op = _backend.define_op(
    "decoder_block",
    "(Tensor z, Tensor conv_weight, Tensor? conv_bias, int groups) -> Tensor",
    fake=_fake,
    kernels={b: _forward(_tail(_TAIL, b)) for b in _BACKENDS},
    checks={"cpp": _backend.compiled_available(_TAIL)},
    validate=_check,
    backward=_backend.Backward(
        "(Tensor grad_out, Tensor z, Tensor conv_weight, Tensor? conv_bias, int groups, bool[3] output_mask)"
        " -> (Tensor?, Tensor?, Tensor?)",
        fake=_fake_backward,
        kernels={b: _backward(_tail(f"{_TAIL}_backward", b)) for b in _BACKENDS},
        checks={"cpp": _backend.compiled_available(f"{_TAIL}_backward")},
        validate=_validate_backward,
        save=_save,
        grads=_grads,
    ),
    # the conv's inputs, as F.conv2d's autocast rule casts them; z stays as it is (the tail's residual)
    autocast=("conv_weight", "conv_bias"),
)


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
        conv_weight: (C, C // groups, k, k) with k odd (3 upstream), z's dtype (any model dtype under autocast,
            which casts it to the autocast dtype as ``F.conv2d`` would) and device.
        conv_bias: (C,) or None, as conv_weight.
        groups: the conv groups (16 upstream); must divide C.
        backend: "auto" | "reference" | "cpp" | "triton" for the fused LayerNorm + GELU + residual.

    Returns:
        (R, C, H, W) in z's dtype: ``conv2d(z, w, b, padding=k // 2, groups)`` (ATen), then ``ln_gelu_residual``;
        channels-last on CUDA, the conv's layout on CPU. Differentiable in z, conv_weight and conv_bias.
    """
    _check(z, conv_weight, conv_bias, groups)
    if not torch.is_autocast_enabled(z.device.type):  # under autocast the op's autocast rule casts them
        if conv_weight.dtype != z.dtype:
            raise TypeError(f"conv_weight must have z's dtype ({z.dtype}), got {conv_weight.dtype}")
        if conv_bias is not None and conv_bias.dtype != z.dtype:
            raise TypeError(f"conv_bias must have z's dtype ({z.dtype}), got {conv_bias.dtype}")
    chosen = _backend.resolve("decoder_block", backend, z.device)
    return _op(z, conv_weight, conv_bias, int(groups), chosen)
