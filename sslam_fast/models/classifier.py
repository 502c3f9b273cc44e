"""The fine-tuning / inference classifier: ``[E] models/EAT_audio_classification.py : MaeImageClassificationModel``.

``forward(fbank)`` = ``head(fc_norm(encoder.extract_features(fbank)[:, 0]))`` (PredictionMode.CLS_TOKEN): logits for
``num_classes`` (527 AudioSet classes; apply a sigmoid for probabilities).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sslam_fast.models.config import ModelConfig
from sslam_fast.models.encoder import EATEncoder

__all__ = ["AudioClassifier"]


class AudioClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None, num_classes: int = 527) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else ModelConfig()
        self.cfg = cfg
        self.encoder = EATEncoder(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, num_classes)

    def extract_features(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, 128) or (B, T, 128) -> (B, 1 + N, D): the encoder's block-12 output, CLS first."""
        return self.encoder.extract_features(fbank)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, 128) -> (B, num_classes) logits from the CLS token."""
        return self.head(self.fc_norm(self.extract_features(fbank)[:, 0]))
