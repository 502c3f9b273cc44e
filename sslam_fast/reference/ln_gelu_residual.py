"""The fused tail of a CNN decoder block in plain PyTorch (ALGORITHM §2.2): the definition, the fallback and the test
oracle.

``ln_gelu_residual`` is the part of one ``[E] models/modules.py : Decoder2d`` block after its conv (LayerNorm over
channels via ``TransposeLast(-3)``, GELU) plus ``DecoderBase.add_residual``; ``ln_gelu_residual_backward`` its gradient
with respect to the conv output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5  # the F.layer_norm default, used upstream by the decoder's LayerNorm


def ln_gelu_residual(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``GELU(LayerNorm_C(y)) + z`` for (R, C, H, W) tensors, computed in fp32 and returned in y's dtype.

    Upstream (``Decoder2d`` block after the conv): ``TransposeLast(-3)`` (R, C, H, W) -> (R, W, H, C), LayerNorm over
    C without affine (eps 1e-5), transpose back, exact-erf GELU, then ``add_residual``: ``x + residual``.
    """
    C = y.shape[1]
    n = F.layer_norm(y.float().transpose(-3, -1), (C,), eps=NORM_EPS).transpose(-3, -1)
    return (F.gelu(n) + z.float()).to(y.dtype)


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of x * Phi(x) = Phi(x) + x * phi(x), exact erf form."""
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def ln_gelu_residual_backward(grad_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of ``ln_gelu_residual`` with respect to y (the gradient for z is ``grad_out`` itself).

    Closed form, in fp32, with the statistics recomputed from y: x^ = (y - mean_C) * rstd, g = grad_out * GELU'(x^),
    grad_y = rstd * (g - mean_C(g) - x^ * mean_C(g * x^)). Returned in y's dtype.
    """
    yf = y.float()
    mean = yf.mean(dim=1, keepdim=True)
    var = (yf - mean).square().mean(dim=1, keepdim=True)
    rstd = torch.rsqrt(var + NORM_EPS)
    xhat = (yf - mean) * rstd
    g = grad_out.float() * _gelu_grad(xhat)
    grad = rstd * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
    return grad.to(y.dtype)
