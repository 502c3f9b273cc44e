"""The EAT / SSLAM model run the way upstream writes it, on the parameters of a ``sslam_fast.models`` model.

``sslam_fast.models`` runs on ``sslam_fast.ops`` (fused kernels, clone-aware routing, GELU recomputation); the
functions here take the same modules and compute the same values with upstream's structure, line by line, using no
``sslam_fast.ops`` kernel. They are the oracle of the model tests and the "upstream" baseline of
``benchmarks/bench_train.py``. The parameters and state-dict keys are the models' own: nothing here holds state.

- :func:`attention`, :func:`mlp`, :func:`block`, :func:`run_blocks`, :func:`extract_features`: ``[E]
  models/modules.py : AltAttention.forward`` (materialised ``softmax_fp32(q k^T) v``), timm ``Mlp.forward``
  (``fc2(gelu(fc1(x)))``), ``AltBlock.forward`` (post-LN, ``ffn_targets=True``) on an ``EATEncoder`` (ALGORITHM §2.1).
- :func:`decoder`: ``[E] models/modules.py : Decoder2d.forward`` on a ``CNNDecoder``, module by module (conv,
  transpose, LayerNorm, transpose, GELU, residual) (ALGORITHM §2.2).
- :func:`losses`: ``[E] models/base.py : ModalitySpecificEncoder.contextualized_features, make_maskinfo,
  decoder_input``; ``[E] models/EAT_pretraining.py : Data2VecMultiModel.forward, make_targets, d2v_loss``; for stage 2
  ``[S] Pre-Training/SSLAM_Stage2/models/EAT_pretraining.py : forward, prepare_dropped_inputs_for_teacher_after_pos,
  get_patch_target_for_mix``: repeat_interleave of the clones, argsort-based masking, the plain ``make_targets`` and
  ``x[mask]`` gathers (ALGORITHM §4, §5), on a ``PretrainingModel``.
- :func:`ema_step`: ``set_num_updates`` with ``[F] fairseq/modules/ema_module.py : EMAModule._step_internal``,
  parameter by parameter (``sslam_fast.reference.ema``) (ALGORITHM §4).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from sslam_fast.reference.ema import ema_decay, ema_update_

__all__ = [
    "attention",
    "block",
    "d2v_loss",
    "decoder",
    "ema_step",
    "extract_features",
    "losses",
    "make_targets",
    "mlp",
    "run_blocks",
]


# --- encoder (ALGORITHM §2.1) -----------------------------------------------------------------------------------------


def attention(attn, x: torch.Tensor) -> torch.Tensor:
    """``AltAttention.forward`` of an ``encoder.Attention`` module: scale q, materialise the scores, softmax in fp32,
    cast back, weight v, project."""
    B, L, C = x.shape
    qkv = attn.qkv(x).reshape(B, L, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    dtype = q.dtype
    q = q * attn.scale
    scores = q @ k.transpose(-2, -1)
    scores = scores.softmax(dim=-1, dtype=torch.float32).to(dtype=dtype)
    out = scores @ v
    return attn.proj(out.transpose(1, 2).reshape(B, L, C))


def mlp(m, x: torch.Tensor) -> torch.Tensor:
    """timm ``Mlp.forward`` of an ``encoder.Mlp`` module: ``fc2(act(fc1(x)))`` (the GELU output is stored for the
    backward, as autograd does for the plain modules)."""
    return m.fc2(m.act(m.fc1(x)))


def block(blk, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-LN ``AltBlock.forward``: ``a = x + attn(x); r = LN1(a); f = mlp(r); out = LN2(r + f)``; returns (out, f)."""
    x = x + attention(blk.attn, x)
    r = x = blk.norm1(x)
    x = mlp(blk.mlp, x)
    t = x  # ffn_targets=True: the layer target is the FFN output before the residual and LN2
    x = blk.norm2(r + x)
    return x, t


def run_blocks(encoder, x: torch.Tensor, keep_targets: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``EATEncoder.run_blocks`` the upstream way: the blocks' output and the FFN outputs of the last
    ``keep_targets`` blocks (CLS included)."""
    targets = []
    first_kept = len(encoder.blocks) - keep_targets
    for i, blk in enumerate(encoder.blocks):
        x, t = block(blk, x)
        if i >= first_kept:
            targets.append(t)
    return x, targets


def extract_features(encoder, fbank: torch.Tensor) -> torch.Tensor:
    """``EATEncoder.extract_features`` the upstream way: (B, 1, T, 128) or (B, T, 128) -> (B, 1 + N, D)."""
    fbank = encoder.check_fbank(fbank)
    x = encoder.add_cls_and_norm(encoder.patchify(fbank))
    return run_blocks(encoder, x)[0]


# --- decoder (ALGORITHM §2.2) -----------------------------------------------------------------------------------------


def decoder(dec, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``Decoder2d.forward`` of a ``CNNDecoder``: (R, N, D) -> (R, D, H, W); each block's modules in order (conv,
    transpose, LayerNorm, transpose, GELU) with the residual after every block; back to (R, N, D); ``proj``."""
    R, N, D = x.shape
    H, W = grid
    if H * W != N:
        raise ValueError(f"grid {grid} does not match the {N} tokens of x")
    x = x.transpose(1, 2).reshape(R, D, H, W)
    residual = x
    for blk in dec.blocks:
        x = blk(x)
        x = x + residual
        residual = x
    x = x.reshape(R, D, N).transpose(1, 2)
    return dec.proj(x)


# --- objectives (ALGORITHM §4, §5) ------------------------------------------------------------------------------------


def make_targets(y: list[torch.Tensor], num_layers: int) -> torch.Tensor:
    """``Data2VecMultiModel.make_targets`` with EAT's flags: instance norm per layer over tokens, mean, LayerNorm."""
    target_layer_results = y[-num_layers:]
    target_layer_results = [
        F.instance_norm(tl.transpose(1, 2).float()).transpose(1, 2) for tl in target_layer_results
    ]
    out = target_layer_results[0].float()
    for tl in target_layer_results[1:]:
        out.add_(tl.float())
    out = out.div_(len(target_layer_results))
    return F.layer_norm(out, out.shape[-1:])


def d2v_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Data2VecMultiModel.d2v_loss`` with ``loss_beta=0``, ``loss_scale=None``: per-row squared error / sqrt(D)."""
    x = x.view(-1, x.size(-1)).float()
    y = y.view(-1, x.size(-1))
    loss = F.mse_loss(x, y.float(), reduction="none").sum(dim=-1)
    return loss * (1 / math.sqrt(x.size(-1)))


def _student(model, x, masks, std):
    st, cfg = model.student, model.cfg
    K = cfg.clones
    # local_encoder + fixed positions, then contextualized_features: repeat_interleave the clones, then mask
    h = st.patch_embed(x).flatten(2).transpose(1, 2)
    h = h + st.pos_embed[:, : h.shape[1]]
    h = h.repeat_interleave(K, 0)
    R, N, D = h.shape
    # make_maskinfo
    m = masks.to(torch.uint8)
    ids_shuffle = m.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1).unsqueeze(-1).expand(-1, -1, D)
    len_keep = N - int(m[0].sum())
    ids_keep = ids_shuffle[:, :len_keep].unsqueeze(-1).expand(-1, -1, D)
    h = torch.gather(h, dim=1, index=ids_keep)
    h = torch.cat([st.cls_token.expand(R, -1, -1), h], dim=1)
    h = st.input_norm(h)  # context_encoder: prenet_depth 0, LayerNorm only
    h, _ = run_blocks(st, h)
    cls_pred = h[:, 0]
    # decoder_input: drop CLS, append mask tokens, restore the order
    x = h[:, 1:]
    num_masked = N - len_keep
    mask_tokens = x.new_empty(x.size(0), num_masked, x.size(-1)).normal_(0, std)
    x = torch.cat([x, mask_tokens], dim=1)
    x = torch.gather(x, dim=1, index=ids_restore)
    pred = decoder(model.decoder, x, (N // cfg.grid[1], cfg.grid[1]))
    return pred, cls_pred


@torch.no_grad()
def _teacher(teacher, x):
    h = teacher.add_cls_and_norm(teacher.patchify(x))
    _, ys = run_blocks(teacher, h, keep_targets=len(teacher.blocks))
    return [y[:, 1:] for y in ys]


@torch.no_grad()
def _teacher_dropped(teacher, source, a, b, w, W):
    """``prepare_dropped_inputs_for_teacher_after_pos``: drop the unmixed windows' time rows after CLS + input LN."""
    x = teacher.add_cls_and_norm(teacher.patchify(source))
    cls, patches = x[:, :1], x[:, 1:]
    B, N, D = patches.shape
    p = patches.transpose(1, 2).reshape(B, D, N // W, W)
    p = torch.cat([p[:, :, :a], p[:, :, a + w : b], p[:, :, b + w :]], dim=2)
    x = torch.cat([cls, p.flatten(2).transpose(1, 2)], dim=1)
    _, zs = run_blocks(teacher, x, keep_targets=len(teacher.blocks))
    return [z[:, 1:] for z in zs]


def losses(model, source: torch.Tensor, masks: torch.Tensor, mix_windows=None,
           mask_noise_std: float | None = None) -> dict[str, torch.Tensor]:
    """``PretrainingModel.losses`` computed the upstream way on ``model``'s parameters (same arguments, same checks,
    same ``dict(patch, mix_patch, cls, sample_size, loss)`` of fp32 0-dim tensors).

    The windows are read back to the host (upstream slices with Python ints); the mask tokens are drawn with
    ``normal_`` on the student rows as upstream draws them, so with ``mask_noise_std > 0`` the values differ from
    the model's (different random streams); at 0 they agree."""
    windows, std, _ = model.check_inputs(source, masks, mix_windows, mask_noise_std)
    cfg, teacher = model.cfg, model.teacher
    K, top_k = cfg.clones, cfg.average_top_k_layers
    B = source.shape[0]
    if windows is None:
        x, mask_all = source, masks
    else:
        s1, s2 = windows.tolist()
        wf = cfg.mix_window_frames
        roll1 = torch.roll(source, shifts=1, dims=0).clone()
        roll1[:, :, s1 : s1 + wf, :] = float("-inf")
        roll1[:, :, s2 : s2 + wf, :] = float("-inf")
        x_mix = torch.max(source, roll1)
        x = torch.cat([source, x_mix], dim=0)
        mask_all = torch.cat([masks, masks], dim=0)
    pred, cls_pred = _student(model, x, mask_all, std)

    y = _teacher(teacher, x)
    targets = make_targets(y, top_k)
    orig_targets = targets
    targets = targets.repeat_interleave(K, 0)
    masked_b = mask_all.bool()
    sample_size = masked_b.sum()
    patch = d2v_loss(pred[masked_b], targets[masked_b]).sum()
    if windows is None:
        cls_target = orig_targets.mean(dim=1)
        mix_patch = patch.new_zeros(())
    else:
        cls_target = make_targets(y, 1).mean(dim=1)
        p, W = cfg.patch_size, cfg.grid[1]
        a, b, w = s1 // p, s2 // p, cfg.mix_window_frames // p
        z = _teacher_dropped(teacher, source, a, b, w, W)
        # get_patch_target_for_mix
        Yu = make_targets([layer[:B] for layer in y], top_k)
        Z = make_targets(z, top_k)
        Z = torch.roll(Z, shifts=1, dims=0)
        N, D = Yu.shape[1], Yu.shape[2]
        H = N // W
        R = Yu.clone().transpose(1, 2).reshape(B, D, H, W)
        Zg = Z.transpose(1, 2).reshape(B, D, H - 2 * w, W)
        R[:, :, 0:a] = Zg[:, :, 0:a]
        R[:, :, a + w : b] = Zg[:, :, a : b - w]
        R[:, :, b + w : H] = Zg[:, :, b - w :]
        R = R.reshape(B, D, N).transpose(1, 2)
        t_srl = ((Yu + R) / 2).repeat_interleave(K, 0)
        mix_mask = masked_b[B * K :]
        mix_patch = 2 * d2v_loss(pred[B * K :][mix_mask], t_srl[mix_mask]).sum()
    cls_target = cls_target.repeat_interleave(K, 0)
    cls = (d2v_loss(cls_pred, cls_target) * (cfg.cls_loss_weight * sample_size)).sum()
    S = sample_size.float()
    return {"patch": patch, "mix_patch": mix_patch, "cls": cls, "sample_size": S, "loss": (patch + mix_patch + cls) / S}


# --- EMA teacher (ALGORITHM §4) ---------------------------------------------------------------------------------------


@torch.no_grad()
def ema_step(model, num_updates: int, *, schedule: tuple[float, float, int] | None = None) -> bool:
    """``PretrainingModel.ema_step`` the upstream way: the same resume guard (``model.ema_due``), the same decay,
    then ``EMAModule._step_internal`` parameter by parameter (``sslam_fast.reference.ema.ema_update_``: ``lr = 1 -
    decay``, frozen parameters copied). Sets ``model.num_updates``; returns whether the teacher was updated."""
    if isinstance(num_updates, bool) or not isinstance(num_updates, numbers.Integral) or num_updates < 0:
        raise ValueError(f"num_updates must be an int >= 0, got {num_updates!r}")
    n = int(num_updates)
    updated = False
    if model.ema_due(n):
        decay = ema_decay(n) if schedule is None else ema_decay(n, *schedule)
        if decay < 1:
            ema_update_(list(model.teacher.parameters()), list(model.student.parameters()), decay)
            updated = True
    model.num_updates = n
    return updated
