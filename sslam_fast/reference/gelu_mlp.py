"""The transformer MLP in plain PyTorch (ALGORITHM §2.1): the definition, the kernels of ``sslam_fast::gelu_mlp`` and
the test oracle.

``gelu_mlp`` is timm's ``Mlp`` as upstream's blocks use it (``[E] models/modules.py : AltBlock.mlp``): ``fc2(GELU(
fc1(x)))`` with exact-erf GELU. ``gelu_mlp_forward`` computes the same with the same ATen calls and also returns fc1's
output ``h``; ``gelu_mlp_backward`` is its gradient from ``h`` alone, recomputing ``GELU(h)`` instead of reading a
stored copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, b2) -> torch.Tensor:
    """timm ``Mlp`` as upstream's blocks use it: ``fc2(GELU(fc1(x)))``, exact-erf GELU (differentiable)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def gelu_mlp_forward(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, h): :func:`gelu_mlp`'s output, bit for bit (the same ATen calls in the same order), and fc1's output
    ``h = linear(x, w1, b1)``, (..., H), which the backward needs."""
    h = F.linear(x, w1, b1)
    return F.linear(F.gelu(h), w2, b2), h


def gelu_mlp_backward(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, need: list[bool]
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dw1, db1, dw2, db2) of :func:`gelu_mlp` for the upstream gradient ``grad`` (..., D_out), from fc1's output
    ``h``; ``GELU(h)`` is recomputed (one elementwise pass) for fc2's weight gradient.

    ``need`` holds five flags, one per gradient; an unneeded one is None (and the gradients of absent biases must not
    be asked for). All tensors share one dtype, that of the gradients.
    """
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = need
    g = grad.reshape(-1, grad.shape[-1])
    h2 = h.reshape(-1, h.shape[-1])
    dw2 = g.t() @ F.gelu(h2) if need_dw2 else None
    db2 = g.sum(0) if need_db2 else None
    dh = torch.ops.aten.gelu_backward(g @ w2, h2)
    dw1 = dh.t() @ x.reshape(-1, x.shape[-1]) if need_dw1 else None
    db1 = dh.sum(0) if need_db1 else None
    dx = (dh @ w1).reshape(x.shape) if need_dx else None
    return dx, dw1, db1, dw2, db2
