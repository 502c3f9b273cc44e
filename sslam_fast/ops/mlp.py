"""The transformer MLP with its GELU recomputed in the backward pass: ``gelu_mlp`` (ALGORITHM §2.1, timm ``Mlp``).

``gelu_mlp(x, w1, b1, w2, b2) = linear(gelu(linear(x, w1, b1)), w2, b2)`` with exact-erf GELU, the same ATen kernels
as ``nn.Sequential(fc1, GELU(), fc2)`` in the same order, so the forward is bit for bit the plain module's. Autograd
of the plain module keeps two (rows, hidden) tensors per block for the backward, fc1's output ``h`` and ``gelu(h)``
(fc2's input); this op keeps ``h`` only and recomputes ``gelu(h)`` (one elementwise pass) when fc2's weight gradient
needs it. With hidden = 4 D that is 4 D floats per token less per block: about a quarter of what a ViT block stores
for its backward.

A ``torch.autograd.Function`` of ATen ops (not a ``torch.library`` custom op): it has no kernel of its own, so
``torch.compile`` traces straight through it. Under autocast the backward runs in the forward's autocast state
(``torch.amp.custom_fwd`` / ``custom_bwd``), and the gradients come back in each input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslam_fast._checks import check_tensor
from sslam_fast.reference import training as ref

__all__ = ["gelu_mlp"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _GeluMlp(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        out = F.linear(F.gelu(h), w2, b2)
        ctx.save_for_backward(x, w1, h, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (x, w1, b1, w2, b2))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        x, w1, h, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        # the weights as the forward's linear used them (autocast may have cast them)
        w1c, w2c = w1.to(h.dtype), w2.to(h.dtype)
        g = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
        h2 = h.reshape(-1, h.shape[-1])
        a = F.gelu(h2)  # recomputed: not stored by the forward
        dw2 = g.t() @ a if need[3] else None
        db2 = g.sum(0) if need[4] and ctx.has_bias[1] else None
        del a
        dh = torch.ops.aten.gelu_backward(g @ w2c, h2)
        dw1 = dh.t() @ x.reshape(-1, x.shape[-1]).to(h.dtype) if need[1] else None
        db1 = dh.sum(0) if need[2] and ctx.has_bias[0] else None
        dx = (dh @ w1c).reshape(x.shape) if need[0] else None
        grads = (dx, dw1, db1, dw2, db2)
        return tuple(None if gr is None else gr.to(dt) for gr, dt in zip(grads, ctx.dtypes))


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
    check_tensor("x", x, dtypes=_DTYPES)
    check_tensor("w1", w1, ndim=2, dtypes=_DTYPES, device=x.device)
    check_tensor("w2", w2, ndim=2, dtypes=_DTYPES, device=x.device)
    if x.dim() < 1 or x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"gelu_mlp needs x (..., D), w1 (H, D), w2 (D_out, H); got x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    for name, b, n in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if b is not None:
            check_tensor(name, b, ndim=1, dtypes=_DTYPES, device=x.device)
            if b.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))):
        return ref.gelu_mlp(x, w1, b1, w2, b2)  # no backward to prepare for
    return _GeluMlp.apply(x, w1, b1, w2, b2)
