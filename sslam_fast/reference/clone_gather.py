"""The student's multi-clone input in plain PyTorch (ALGORITHM §2.1): the definition, the CPU fallback, the test oracle.

``clone_gather`` mirrors the student's input path in
``[E] models/base.py : ModalitySpecificEncoder.contextualized_features``
(+ ``make_maskinfo``, ``BlockEncoder`` with ``prenet_depth=0``): ``x_pos`` (patches + positions) is
``repeat_interleave(clone_batch)``-ed, the kept tokens of each row are gathered with ``ids_keep``, the CLS token
(``extra_tokens``) is prepended and the input LayerNorm (eps 1e-6, affine) is applied. Row ``r = b * K + c`` is clone
``c`` of clip ``b``.

``clone_gather_backward`` is the explicit formula autograd applies to that forward (LayerNorm backward, ``index_add``
for the gather); ``tests/test_clone_gather.py`` checks it against autograd of the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clone_gather(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    clones: int,
    cls_token: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``LayerNorm(cat[cls, repeat_interleave(x, clones)[r, ids_keep[r]]])`` row by row, upstream's way.

    Args:
        x: (B, N, D) float: patches + positions.
        ids_keep: (B * clones, k) int64, the kept token indices of every row.
        clones: K, the clone count.
        cls_token: (D,) (or anything with D elements), the CLS token.
        norm_weight, norm_bias: (D,), the input LayerNorm's affine parameters.
        eps: the LayerNorm epsilon (1e-6 upstream).

    Returns:
        (B * clones, 1 + k, D) in x's dtype. The sequence is formed and normalised in fp32, then rounded once.
    """
    R, k = ids_keep.shape
    D = x.shape[-1]
    xr = x.float().repeat_interleave(clones, dim=0)  # (R, N, D): the copy the fused kernels avoid
    vis = torch.gather(xr, 1, ids_keep.unsqueeze(-1).expand(R, k, D))
    cls = cls_token.float().reshape(1, 1, D).expand(R, 1, D)
    seq = torch.cat([cls, vis], dim=1)
    out = F.layer_norm(seq, (D,), norm_weight.float(), norm_bias.float(), eps)
    return out.to(x.dtype)


def clone_gather_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    clones: int,
    cls_token: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`clone_gather` wrt (x, cls_token, norm_weight, norm_bias), each in its input's dtype.

    LayerNorm backward in fp32: with ``xhat = (v - mean) * rstd`` and ``g = grad * w``,
    ``dv = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))``; ``dw = sum(grad * xhat)``, ``db = sum(grad)`` over all
    rows and tokens; ``dcls = sum_r dv[r, 0]``; ``dx[b, n] = sum over (c, j) with ids_keep[b*K + c, j] = n of
    dv[b*K + c, 1 + j]`` (an fp32 ``index_add``).
    """
    R = ids_keep.shape[0]
    B, N, D = x.shape
    vis = x.float()[torch.arange(R, device=x.device).div(clones, rounding_mode="floor").unsqueeze(1), ids_keep]
    seq = torch.cat([cls_token.float().reshape(1, 1, D).expand(R, 1, D), vis], dim=1)
    mean = seq.mean(-1, keepdim=True)
    rstd = torch.rsqrt(seq.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (seq - mean) * rstd
    g_out = grad.float()
    db = g_out.sum((0, 1))
    dw = (g_out * xhat).sum((0, 1))
    g = g_out * norm_weight.float()
    dv = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dcls = dv[:, 0].sum(0)
    flat = (torch.arange(R, device=x.device).div(clones, rounding_mode="floor").unsqueeze(1) * N + ids_keep).reshape(-1)
    dx = torch.zeros(B * N, D, dtype=torch.float32, device=x.device).index_add_(0, flat, dv[:, 1:].reshape(-1, D))
    return (
        dx.reshape(B, N, D).to(x.dtype),
        dcls.reshape(cls_token.shape).to(cls_token.dtype),
        dw.to(norm_weight.dtype),
        db.to(norm_bias.dtype),
    )
