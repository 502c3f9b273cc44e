"""EAT / SSLAM teacher targets in plain PyTorch (ALGORITHM §4 make_targets, §5.3): the definition, the CPU fallback and
the test oracle.

``layer_targets`` is ``[E] models/EAT_pretraining.py : Data2VecMultiModel.make_targets`` with EAT's configuration
(instance norm of each layer over tokens, mean of the top-k layers, LayerNorm over channels, all fp32, no affine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5  # F.instance_norm / F.layer_norm defaults, used upstream by make_targets


def _instance_norm_tokens(y: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> fp32 (B, T, D): per sample and channel, (y - mean_T) / sqrt(var_T + eps), biased variance."""
    if y.shape[1] == 1:  # F.instance_norm refuses one spatial element; y - mean is exactly 0 there
        return torch.zeros_like(y, dtype=torch.float32)
    return F.instance_norm(y.float().transpose(1, 2), eps=NORM_EPS).transpose(1, 2)


def layer_targets(layers: torch.Tensor, token_index: torch.Tensor | None = None) -> torch.Tensor:
    """EAT / SSLAM teacher targets from the top-k FFN outputs (ALGORITHM §4 make_targets, §5.3 for ``token_index``).

    Args:
        layers: (k, B, T, D) float (fp32 / fp16 / bf16): the FFN outputs of the k top layers, oldest first (the
            caller has already kept the last k layers).
        token_index: optional (T',) int64: compute everything on these tokens only (instance-norm statistics over
            the T' tokens, as teacher B's 272 kept tokens in SSLAM).

    Returns:
        (B, T or T', D) float32: ``LayerNorm_D( (1/k) sum_l InstanceNorm_T(layers[l]) )``, eps 1e-5, no affine.
    """
    if token_index is not None:
        layers = layers.index_select(2, token_index)
    k, B, T, D = layers.shape
    if k == 0 or B == 0 or T == 0 or D == 0:
        return torch.zeros((B, T, D), dtype=torch.float32, device=layers.device)
    # upstream: y = tl[0].float(); y.add_(tl.float()) for the others; y.div_(len); F.layer_norm(y, y.shape[-1:])
    y = _instance_norm_tokens(layers[0])
    for layer in layers[1:]:
        y.add_(_instance_norm_tokens(layer))
    y = y.div_(k)
    return F.layer_norm(y, (D,), eps=NORM_EPS)
