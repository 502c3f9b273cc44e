"""The fine-tuning / inference classifier: ``[E] models/EAT_audio_classification.py : MaeImageClassificationModel``.

``forward(fbank)`` = ``head(fc_norm(encoder.extract_features(fbank)[:, 0]))`` (PredictionMode.CLS_TOKEN): logits for
``num_classes`` (527 AudioSet classes; apply a sigmoid for probabilities). As upstream initialises them, ``fc_norm``
is a LayerNorm (eps 1e-6, weight 1, bias 0) and ``head`` a Linear with trunc-normal(std 0.02) weights and zero bias.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from sslam_fast.models.config import ModelConfig
from sslam_fast.models.encoder import EATEncoder

__all__ = ["AudioClassifier"]


class AudioClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None, num_classes: int = 527) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        cfg = cfg if cfg is not None else ModelConfig()
        self.cfg = cfg
        self.encoder = EATEncoder(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        self.reset_head()

    @torch.no_grad()
    def reset_head(self) -> None:
        """Fresh ``fc_norm`` (1 / 0) and ``head`` (``trunc_normal_(std=0.02)`` weights, zero bias), as upstream's
        ``MaeImageClassificationModel.__init__``."""
        if self.head.weight.is_meta:  # a meta-device build has no values to initialise
            return
        nn.init.constant_(self.fc_norm.weight, 1.0)
        nn.init.constant_(self.fc_norm.bias, 0.0)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.constant_(self.head.bias, 0.0)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_classes: int, *, drop_path_rate: float = 0.0,
                        trust_checkpoint: bool = False, **overrides) -> AudioClassifier:
        """A classifier to fine-tune: the encoder from any checkpoint ``sslam_fast.load_pretrained`` reads (a fairseq
        pre-training file's student, an HF pre-trained port, or the encoder of a fine-tuned file), with a fresh
        ``fc_norm`` and ``head`` for ``num_classes`` classes. The model size comes from the file; ``drop_path_rate``
        and ``overrides`` (``ModelConfig`` fields) are set on top. Returned in train mode on the CPU.

        Raises :class:`~sslam_fast.checkpoint.CheckpointError` for a file that is not such a checkpoint or does not
        fit the model it describes."""
        from sslam_fast.checkpoint import infer_config, load_checkpoint, load_module_state

        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate!r}")
        obj, fmt, maps = load_checkpoint(path, trust_checkpoint)
        cfg = infer_config(obj, maps, drop_path_rate=float(drop_path_rate), **overrides)
        if "encoder" in maps:
            enc = maps["encoder"]
        else:  # a fine-tuned file: its encoder, not its head (the classes may differ)
            enc = {k[len("encoder."):]: v for k, v in maps["classifier"].items() if k.startswith("encoder.")}
        model = cls(cfg, num_classes=num_classes)
        load_module_state(model.encoder, enc, f"{path} ({fmt}) encoder")
        return model.train()

    def extract_features(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, 128) or (B, T, 128) -> (B, 1 + N, D): the encoder's block-12 output, CLS first."""
        return self.encoder.extract_features(fbank)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, 128) -> (B, num_classes) logits from the CLS token."""
        return self.head(self.fc_norm(self.extract_features(fbank)[:, 0]))
