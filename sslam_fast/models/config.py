"""The EAT / SSLAM model configuration (ALGORITHM §2, §3, §4, §5; upstream ``[E] config/pretraining_AS2M.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    """Hyper-parameters of the encoder, decoder, masking and objectives. ``base()`` is the released model.

    Inputs are always (B, 1, T, 128) log-mel spectrograms cut into 16x16 patches, so the grid is
    (T / 16 time patches, 8 frequency patches) and token n = W * t + f.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    in_chans: int = 1
    grid: tuple[int, int] = (64, 8)  # (H time patches, W frequency patches) of the pre-training input
    max_time_patches: int = 768  # positional table rows = max_time_patches * W
    norm_eps: float = 1e-6
    decoder_dim: int = 768  # = embed_dim (upstream's decoder works in the encoder width)
    decoder_kernel: int = 3
    decoder_groups: int = 16
    decoder_layers: int = 6
    clones: int = 16
    mask_prob: float = 0.8
    mask_length: int = 5
    mask_prob_adjust: float = 0.07
    mask_noise_std: float = 0.01
    average_top_k_layers: int = 12
    cls_loss_weight: float = 1.0
    stage: str = "eat"  # "eat" (stage 1) | "sslam" (stage 2)
    mix_window_frames: int = 240
    drop_path_rate: float = 0.0  # stochastic depth of the last block; linear from 0 over the blocks (fine-tuning)

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)
        if self.stage not in ("eat", "sslam"):
            raise ValueError(f"stage must be 'eat' or 'sslam', got {self.stage!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim})")
        if self.decoder_dim != self.embed_dim:
            raise ValueError(f"decoder_dim must equal embed_dim ({self.embed_dim}), got {self.decoder_dim}")
        if self.embed_dim % self.decoder_groups:
            raise ValueError(f"decoder_groups ({self.decoder_groups}) must divide embed_dim ({self.embed_dim})")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim must be a multiple of 4 (2-D sin-cos table), got {self.embed_dim}")
        if not 1 <= self.average_top_k_layers <= self.depth:
            raise ValueError(f"average_top_k_layers must lie in [1, {self.depth}], got {self.average_top_k_layers}")
        if self.grid[0] > self.max_time_patches:
            raise ValueError(f"grid time patches ({self.grid[0]}) exceed max_time_patches ({self.max_time_patches})")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate!r}")
        if self.mix_window_frames % self.patch_size:
            raise ValueError(f"mix_window_frames must be a multiple of patch_size, got {self.mix_window_frames}")

    @property
    def num_patches(self) -> int:
        """N = H * W tokens of the pre-training input (512 for the base model)."""
        return self.grid[0] * self.grid[1]

    @property
    def num_frames(self) -> int:
        """T = H * patch_size input frames (1024 for the base model)."""
        return self.grid[0] * self.patch_size

    @property
    def mel_bins(self) -> int:
        return self.grid[1] * self.patch_size

    @classmethod
    def base(cls, **overrides) -> ModelConfig:
        """The released EAT / SSLAM base model (88M parameters with the decoder)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A CPU-test model: D 64, 2 blocks, 4 heads, 256 x 128 inputs (grid 16 x 8), 4 clones."""
        kw = dict(
            embed_dim=64,
            depth=2,
            num_heads=4,
            grid=(16, 8),
            decoder_dim=64,
            decoder_layers=2,
            decoder_groups=4,
            clones=4,
            average_top_k_layers=2,
            mix_window_frames=48,
        )
        kw.update(overrides)
        return cls(**kw)
