"""One CNN decoder block in plain PyTorch (ALGORITHM §2.2), composed as upstream composes it: the test oracle.

``decoder_block`` is one block of ``[E] models/modules.py : Decoder2d`` (grouped conv, LayerNorm over channels via
``TransposeLast(-3)``, GELU) plus ``DecoderBase.add_residual``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslam_fast.reference.ln_gelu_residual import NORM_EPS


def decoder_block(z: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor, groups: int) -> torch.Tensor:
    """One ``Decoder2d`` block with its residual, exactly as upstream composes it (differentiable, z's dtype).

    ``conv (3x3, padding 1, groups) -> TransposeLast(-3) -> LayerNorm(C, no affine) -> TransposeLast(-3) -> GELU``,
    then ``+ z``.
    """
    k = conv_weight.shape[-1]
    x = F.conv2d(z, conv_weight, conv_bias, padding=k // 2, groups=groups)
    x = x.transpose(-3, -1)
    x = F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)
    x = x.transpose(-3, -1)
    return F.gelu(x) + z
