"""The transformer MLP with its GELU recomputed in the backward pass: ``gelu_mlp`` (ALGORITHM §2.1, timm ``Mlp``).

``gelu_mlp(x, w1, b1, w2, b2) = linear(gelu(linear(x, w1, b1)), w2, b2)`` with exact-erf GELU, the same ATen kernels
as ``nn.Sequential(fc1, GELU(), fc2)`` in the same order, so the forward is bit for bit the plain module's. Autograd
of the plain module keeps two (rows, hidden) tensors per block for the backward, fc1's output ``h`` and ``gelu(h)``
(fc2's input); this op keeps ``h`` only and recomputes ``gelu(h)`` (one elementwise pass) when fc2's weight gradient
needs it. With hidden = 4 D that is 4 D floats per token less per block: about a quarter of what a ViT block stores
for its backward.

The custom op ``sslam_fast::gelu_mlp(x, w1, b1, w2, b2) -> (out, h)`` has one backend, ``reference`` (ATen calls,
``sslam_fast.reference.gelu_mlp``), and the backward op ``sslam_fast::gelu_mlp_backward``. Under autocast its floating
inputs are cast to the autocast dtype (as autocast casts ``F.linear``'s) and it runs with autocast off; the casts stay
in the autograd graph, so each input's gradient comes back in that input's dtype. A call where no input needs a
gradient runs the plain reference instead (the same ATen calls, so the same numbers; traceable by ``torch.compile``).
"""

from __future__ import annotations

import torch

from sslam_fast import _backend
from sslam_fast._checks import MODEL_DTYPES, check_tensor
from sslam_fast.reference import gelu_mlp as ref

__all__ = ["gelu_mlp"]


def _validate(x, w1, b1, w2, b2) -> None:
    """Types, dtypes, devices and shapes (metadata only)."""
    check_tensor("x", x, dtypes=MODEL_DTYPES)
    check_tensor("w1", w1, ndim=2, dtypes=MODEL_DTYPES, device=x.device)
    check_tensor("w2", w2, ndim=2, dtypes=MODEL_DTYPES, device=x.device)
    if x.dim() < 1 or x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"gelu_mlp needs x (..., D), w1 (H, D), w2 (D_out, H); got x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    for name, b, n in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if b is not None:
            check_tensor(name, b, ndim=1, dtypes=MODEL_DTYPES, device=x.device)
            if b.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")


def _validate_backward(grad, x, w1, w2, h, need) -> None:
    _validate(x, w1, None, w2, None)
    rows = tuple(x.shape[:-1])
    if tuple(h.shape) != (*rows, w1.shape[0]) or tuple(grad.shape) != (*rows, w2.shape[0]):
        raise ValueError(
            f"gelu_mlp_backward needs h {(*rows, w1.shape[0])} and grad {(*rows, w2.shape[0])} for x "
            f"{tuple(x.shape)}; got h {tuple(h.shape)}, grad {tuple(grad.shape)}"
        )
    if len(need) != 5:
        raise ValueError(f"need must hold 5 flags (dx, dw1, db1, dw2, db2), got {len(need)}")


def _save(ctx, inputs, output):
    x, w1, b1, w2, b2 = inputs
    out, h = output
    ctx.save_for_backward(x, w1, w2, h)
    ctx.mark_non_differentiable(h)  # the backward's input, not a result
    ctx.set_materialize_grads(False)  # h's gradient is never read: no (rows, H) tensor of zeros for it


def _grads(ctx, run_backward, grad, grad_h):
    x, w1, w2, h = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:5])  # (x, w1, b1, w2, b2), then the backend; False for an absent bias
    if grad is None or not any(need):  # None: the output's gradient is zero (not materialised)
        return None, None, None, None, None
    return tuple(run_backward(grad, x, w1, w2, h, need))


# The kernels are ATen calls: run on FakeTensors they give the outputs' exact shapes and strides.
_op = _backend.define_op(
    "gelu_mlp",
    "(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) -> (Tensor out, Tensor h)",
    fake=lambda x, w1, b1, w2, b2, backend: ref.gelu_mlp_forward(x, w1, b1, w2, b2),
    kernels={"reference": ref.gelu_mlp_forward},
    validate=_validate,
    backward=_backend.Backward(
        "(Tensor grad, Tensor x, Tensor w1, Tensor w2, Tensor h, bool[] need) -> "
        "(Tensor? dx, Tensor? dw1, Tensor? db1, Tensor? dw2, Tensor? db2)",
        fake=lambda grad, x, w1, w2, h, need, backend: ref.gelu_mlp_backward(grad, x, w1, w2, h, need),
        kernels={"reference": ref.gelu_mlp_backward},
        validate=_validate_backward,
        save=_save,
        grads=_grads,
    ),
    autocast=True,
)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` storing fc1's output only for the backward (GELU recomputed there).

    Args:
        x: (..., D) float input.
        w1, b1: fc1's (H, D) weight and (H,) bias (or None).
        w2, b2: fc2's (D_out, H) weight and (D_out,) bias (or None).

    Returns:
        (..., D_out), exactly ``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)``.
    """
    _validate(x, w1, b1, w2, b2)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))):
        return ref.gelu_mlp(x, w1, b1, w2, b2)  # no backward to prepare for
    chosen = _backend.resolve("gelu_mlp", "reference", x.device)
    return _op(x, w1, b1, w2, b2, chosen)[0]
