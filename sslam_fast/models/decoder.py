"""The EAT / SSLAM CNN decoder (ALGORITHM §2.2): ``[E] models/modules.py : Decoder2d`` with ``decoder_residual=True``.

``blocks.{i}`` is an ``nn.Sequential`` laid out like upstream's (conv, channel-LayerNorm via two transposes, GELU), so
its index 0 is the grouped conv and the state-dict keys map one to one (``decoder.blocks.{i}.0``). ``proj`` is the
final Linear. The forward runs each block as ``sslam_fast.ops.decoder_block`` (ATen conv + the fused LayerNorm / GELU /
residual tail) on a channels-last view of the token tensor; ``sslam_fast.reference.model.decoder`` runs upstream's
modules one by one on the same parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sslam_fast.models.config import ModelConfig
from sslam_fast.ops import decoder_block

__all__ = ["CNNDecoder"]


class _TransposeLast(nn.Module):
    """fairseq ``TransposeLast(tranpose_dim=-3)``: swap dim -3 (channels of (R, C, H, W)) with the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-3, -1)


class CNNDecoder(nn.Module):
    """(R, N, D) decoder input -> (R, N, D) predictions; N = H * W tokens, token n = W * t + f."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else ModelConfig()
        self.cfg = cfg
        D, k = cfg.decoder_dim, cfg.decoder_kernel
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(D, D, kernel_size=k, padding=k // 2, groups=cfg.decoder_groups),
                # SamePad2d(k) is a no-op for odd k: omitted
                _TransposeLast(),
                nn.LayerNorm(D, eps=1e-5, elementwise_affine=False),
                _TransposeLast(),
                nn.GELU(),
            )
            for _ in range(cfg.decoder_layers)
        )
        self.proj = nn.Linear(D, D)  # PyTorch's default Linear reset (Decoder2d.reset_parameters)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x: (R, N, D) with N = H * W for ``grid = (H, W)``."""
        R, N, D = x.shape
        H, W = grid
        if H * W != N:
            raise ValueError(f"grid {grid} does not match the {N} tokens of x")
        # (R, N, D) contiguous viewed as (R, D, H, W) is channels-last: no copy, the layout the fused tail wants.
        z = x.transpose(1, 2).reshape(R, D, H, W)
        for blk in self.blocks:
            conv = blk[0]
            z = decoder_block(z, conv.weight, conv.bias, conv.groups)
        return self.proj(z.reshape(R, D, N).transpose(1, 2))
