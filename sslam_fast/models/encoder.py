"""The EAT / SSLAM encoder (ALGORITHM §2.1): patch conv, fixed 2-D sin-cos table, CLS, input LayerNorm, post-LN blocks.

Mirrors ``[E] models/images.py : ImageEncoder`` (``PatchEmbed_new``, ``get_2d_sincos_pos_embed_flexible``),
``models/base.py : ModalitySpecificEncoder.contextualized_features`` (``prenet_depth=0``: the context encoder is a
LayerNorm only) and ``models/modules.py : AltBlock / AltAttention`` (``layer_norm_first=False``, ``ffn_targets=True``).
Parameter names follow the naming contract (``patch_embed``, ``pos_embed``, ``cls_token``, ``input_norm``,
``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``).

Stochastic depth (``ModelConfig.drop_path_rate``, fine-tuning only) follows ``AltBlock``'s ``drop_path`` on the
attention and the FFN branch with timm's ``DropPath``, the rates ``linspace(0, rate, depth)`` over the blocks as
``[E] models/EAT_audio_classification.py : MaeImageClassificationModel.__init__`` sets them.

Attention runs through ``sslam_fast.ops.attention`` (backend auto: SDPA / flash / Triton) and the MLP through
``sslam_fast.ops.gelu_mlp`` (GELU recomputed in the backward, not stored). ``sslam_fast.reference.model`` runs the same
parameters the upstream way (materialised ``softmax_fp32(q k^T) v``, plain ``fc2(gelu(fc1(x)))``): the oracle of the
tests.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from sslam_fast._checks import check_tensor
from sslam_fast.models.config import ModelConfig
from sslam_fast.ops import attention, gelu_mlp

__all__ = ["EATEncoder", "Block", "DropPath", "drop_path_rates", "sincos_pos_table"]


def sincos_pos_table(embed_dim: int, time_patches: int, freq_patches: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table (time_patches * freq_patches, embed_dim), float32 (ALGORITHM §2.1).

    Token n = freq_patches * t + f. With Q = embed_dim / 4 and w_k = 10000^(-k/Q): dims [0, Q) sin(f w_k),
    [Q, 2Q) cos(f w_k), [2Q, 3Q) sin(t w_k), [3Q, 4Q) cos(t w_k): the FREQUENCY index comes first, because upstream's
    ``np.meshgrid(grid_w, grid_h)`` puts w first. Like MAE's ``get_1d_sincos_pos_embed_from_grid`` (``omega`` is a
    float64 array, the grid float32) the products and sin / cos run in float64 and the table is rounded once.
    """
    q = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(q, dtype=np.float64) / q)
    t, f = np.meshgrid(
        np.arange(time_patches, dtype=np.float32), np.arange(freq_patches, dtype=np.float32), indexing="ij"
    )
    f_out = np.einsum("m,d->md", f.reshape(-1), omega)
    t_out = np.einsum("m,d->md", t.reshape(-1), omega)
    table = np.concatenate([np.sin(f_out), np.cos(f_out), np.sin(t_out), np.cos(t_out)], axis=1)
    return torch.from_numpy(table).float()


class Attention(nn.Module):
    """``AltAttention``: one fused qkv Linear, softmax in fp32 (``sslam_fast.ops.attention``), output projection; no
    mask, no ALiBi. ``scale`` is upstream's ``head_dim ** -0.5``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, C) -> q, k, v as (B, heads, L, C / heads) views of one qkv projection: the same views as upstream's
        ``permute(2, 0, 3, 1, 4)`` then ``qkv[0], qkv[1], qkv[2]`` (``[E] models/modules.py : AltAttention``), taken
        with ``unbind``, whose backward stacks the three gradients straight into the projection's (B, L, 3, heads,
        C / heads) layout: one copy, where three indexing backwards each fill a zero tensor of the whole qkv size,
        add them and copy the sum back to that layout. The gradients are the same numbers."""
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        out = attention(*self.qkv_heads(x))
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    """timm ``Mlp``: fc1, exact-erf GELU, fc2, as ``sslam_fast.ops.gelu_mlp`` (same numbers, GELU recomputed in the
    backward instead of stored). ``act`` is the GELU module of upstream's layout (no parameters)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The stochastic-depth rate of each block: ``linspace(0, rate, depth)`` in float64, as upstream's
    ``np.linspace(0, cfg.drop_path_rate, model_blocks)`` (``[E] models/EAT_audio_classification.py``)."""
    return np.linspace(0.0, float(rate), depth).tolist() if depth > 0 else []


class DropPath(nn.Module):
    """timm's ``DropPath`` (``scale_by_keep=True``): in training, each sample's branch output is kept with probability
    ``1 - p`` and then divided by ``1 - p``, else zeroed; the identity in eval mode and at ``p = 0``. The keep mask is
    drawn on the tensor's device from its default generator (no host sync)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must lie in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class Block(nn.Module):
    """Post-LN ``AltBlock``: ``a = x + dp(attn(x)); r = LN1(a); f = mlp(r); out = LN2(r + dp(f))``; returns (out, f).

    ``dp`` is :class:`DropPath` with ``drop_path`` (two independent draws, one per branch), ``nn.Identity`` at 0."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.drop_path(self.attn(x))
        r = x = self.norm1(x)
        x = self.mlp(x)
        t = x  # ffn_targets=True: the layer target is the FFN output before the residual and LN2
        x = self.norm2(r + self.drop_path(x))
        return x, t


class EATEncoder(nn.Module):
    """The student / teacher encoder. ``extract_features(fbank) -> (B, 1 + N, D)``: block-12 output, CLS first."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else ModelConfig()
        self.cfg = cfg
        D, W, p = cfg.embed_dim, cfg.grid[1], cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, kernel_size=p, stride=p)
        # torch.empty follows the default device (a meta-device build allocates nothing); the table is then copied in.
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.max_time_patches * W, D), requires_grad=False)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_table(D, cfg.max_time_patches, W).unsqueeze(0))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.input_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, drop_path=r)
                                    for r in drop_path_rates(cfg.drop_path_rate, cfg.depth))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """ALGORITHM §2.3: ``init_bert_params`` (Linear N(0, 0.02), bias 0), xavier_uniform on the patch conv viewed
        (D, p*p*C), CLS ~ N(0, 1) (``init_extra_token_zero: false``), LayerNorms 1 / 0."""
        if self.cls_token.is_meta:  # a meta-device build has no values to initialise
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        self.cls_token.normal_(0.0, 1.0)

    # --- pieces shared by the student, the teachers and sslam_fast.reference.model ------------------------------------

    def check_fbank(self, fbank, name: str = "fbank") -> torch.Tensor:
        """(B, 1, T, F) or (B, T, F) float with F = W * patch, T a multiple of the patch, <= max_time_patches."""
        check_tensor(name, fbank, ndim=(3, 4), dtypes=(torch.float32, torch.float16, torch.bfloat16))
        if fbank.dim() == 3:
            fbank = fbank.unsqueeze(1)
        cfg = self.cfg
        B, C, T, Fb = fbank.shape
        p = cfg.patch_size
        if C != cfg.in_chans or Fb != cfg.grid[1] * p or T % p or T == 0 or T // p > cfg.max_time_patches:
            raise ValueError(
                f"{name} must have shape (B, {cfg.in_chans}, T, {cfg.grid[1] * p}) with T a positive multiple of {p} "
                f"and at most {cfg.max_time_patches * p} frames, got {tuple(fbank.shape)}"
            )
        return fbank

    def patchify(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, F) -> (B, N, D) patch tokens plus positions (``local_encoder`` + ``fixed_positional_encoder``)."""
        x = self.patch_embed(fbank).flatten(2).transpose(1, 2)  # token n = W * t + f
        return x + self.pos_embed[:, : x.shape[1]].to(x.dtype)

    def add_cls_and_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend CLS (after the positional add: CLS gets no position) and apply the input LayerNorm."""
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return self.input_norm(torch.cat([cls, x], dim=1))

    def run_blocks(self, x: torch.Tensor, keep_targets: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks; also return the FFN outputs of the last ``keep_targets`` blocks (CLS included)."""
        targets = []
        first_kept = len(self.blocks) - keep_targets
        for i, blk in enumerate(self.blocks):
            x, t = blk(x)
            if i >= first_kept:
                targets.append(t)
        return x, targets

    def extract_features(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, 128) or (B, T, 128) log-mels -> (B, 1 + T/16 * 8, D): block-12 output, CLS first, no masking."""
        fbank = self.check_fbank(fbank)
        x = self.add_cls_and_norm(self.patchify(fbank))
        return self.run_blocks(x)[0]

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.extract_features(fbank)
