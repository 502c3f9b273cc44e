"""The masked patch loss in plain PyTorch (ALGORITHM §4, §5.4): the definition, the CPU fallback and the test oracle.

``masked_mse`` is ``[E] models/EAT_pretraining.py : Data2VecMultiModel.d2v_loss`` (``loss_beta=0``, scale
1/sqrt(D)) applied to the masked tokens (``x[masked_b]``), summed as fairseq's criterion does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, clones: int = 1) -> torch.Tensor:
    """Sum over masked tokens and channels of ``(pred - target)^2 / sqrt(D)``, fp32 0-dim (differentiable).

    Args:
        pred: (R, N, D) float, the decoder output.
        target: (R // clones, N, D) float; row r of pred is compared with target row ``r // clones`` (upstream
            repeat-interleaves the teacher target ``clones`` times).
        mask: (R, N) bool, True = masked (enters the loss).

    Upstream: ``x = dx[masked_b]``, ``y = target[masked_b]``, ``F.mse_loss(x.float(), y.float(), reduction="none")
    * (1 / sqrt(D))``, then the criterion's ``.sum()``.
    """
    if clones != 1:
        target = target.repeat_interleave(clones, dim=0)
    x = pred[mask].float()
    y = target[mask].float()
    scale = 1 / math.sqrt(pred.shape[-1])
    return (F.mse_loss(x, y, reduction="none") * scale).sum()


def masked_mse_backward(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, clones: int = 1
) -> torch.Tensor:
    """Gradient of ``masked_mse`` with respect to pred, in pred's dtype: ``2 (pred - target) mask / sqrt(D) * grad``.

    The gradient with respect to target is its negation, summed over the ``clones`` rows that share a target row.
    """
    if clones != 1:
        target = target.repeat_interleave(clones, dim=0)
    scale = 2.0 / math.sqrt(pred.shape[-1])
    diff = (pred.float() - target.float()) * (scale * grad.float())
    return torch.where(mask.unsqueeze(-1), diff, torch.zeros((), device=diff.device)).to(pred.dtype)
