"""The EAT (stage 1, ALGORITHM §4) and SSLAM (stage 2, ALGORITHM §5) objectives, as a fast path and a plain path.

``losses_fast`` runs on ``sslam_fast.ops``: ``clone_gather`` (no repeat_interleave of the clip batch),
``attention``, ``decoder_scatter``, ``decoder_block``, ``layer_targets`` (teacher B's targets computed on its kept
tokens only), ``masked_mse`` (clone-aware: no repeated targets, no ``x[mask]`` gathers) and ``partial_max_mix``.

``losses_plain`` mirrors upstream line by line: ``[E] models/base.py : contextualized_features, make_maskinfo,
decoder_input``; ``[E] models/EAT_pretraining.py : Data2VecMultiModel.forward, make_targets, d2v_loss``; and for stage 2
``[S] Pre-Training/SSLAM_Stage2/models/EAT_pretraining.py : forward, prepare_dropped_inputs_for_teacher_after_pos,
get_patch_target_for_mix``: repeat_interleave clones, argsort-based masking, materialised attention, the per-module
decoder with transposes, the plain ``make_targets`` and ``x[mask]`` gathers.

Both return ``dict(patch, mix_patch, cls, sample_size, loss)`` (fp32 0-dim tensors): sums as fairseq's criterion forms
them, and ``loss = (patch + mix_patch + cls) / sample_size``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["losses_fast", "losses_plain", "kept_time_rows", "kept_token_index"]


def kept_time_rows(H: int, windows: tuple[int, int], window_patches: int) -> list[int]:
    """Time-patch rows outside both unmixed windows, ascending (teacher B's rows, ALGORITHM §5.2)."""
    a, b = windows
    return [t for t in range(H) if not (a <= t < a + window_patches or b <= t < b + window_patches)]


def kept_token_index(H: int, W: int, window_rows: torch.Tensor, window_patches: int) -> torch.Tensor:
    """The tokens of :func:`kept_time_rows` as a ((H - 2w) * W,) int64 index, from the window rows (a, b) as a
    device tensor, without reading them: kept row i is ``i + w [i >= a] + w [i >= b - w]``, since the kept rows are
    [0, a), [a + w, b) and [b + w, H) with a + w <= b. The length never depends on (a, b), so the graph is static."""
    w = window_patches
    i = torch.arange(H - 2 * w, device=window_rows.device)
    a, b = window_rows[0], window_rows[1]
    rows = i + w * (i >= a) + w * (i >= b - w)
    return (rows[:, None] * W + torch.arange(W, device=window_rows.device)).reshape(-1)


def _finish(patch, mix_patch, cls, sample_size) -> dict[str, torch.Tensor]:
    S = sample_size.float()
    return {
        "patch": patch,
        "mix_patch": mix_patch,
        "cls": cls,
        "sample_size": S,
        "loss": (patch + mix_patch + cls) / S,
    }


# --- fast path --------------------------------------------------------------------------------------------------------


def _student_fast(model, x, masks, std, k):
    from sslam_fast.ops import clone_gather, decoder_scatter

    st, cfg = model.student, model.cfg
    R, N = masks.shape
    # Stable sort: visible tokens first in ascending order (what clone_gather wants), then the masked ones.
    order = torch.argsort(masks.to(torch.int8), dim=1, stable=True)
    ids_keep = order[:, :k].contiguous()
    ids_restore = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(R, N))
    h = clone_gather(
        st.patchify(x), ids_keep, cfg.clones, st.cls_token, st.input_norm.weight, st.input_norm.bias,
        st.input_norm.eps, check_ids=False,
    )
    h, _ = st.run_blocks(h, fast=True)
    dec_in = decoder_scatter(h, ids_restore, std, check_ids=False)
    pred = model.decoder(dec_in, (N // cfg.grid[1], cfg.grid[1]), fast=True)
    return pred, h[:, 0]


@torch.no_grad()
def _teacher_layers_fast(teacher, tokens, top_k):
    """(top_k, B, n, D) FFN outputs of the last top_k blocks without CLS, for (B, n, D) patch tokens + positions."""
    _, ys = teacher.run_blocks(teacher.add_cls_and_norm(tokens), fast=True, keep_targets=top_k)
    return torch.stack([y[:, 1:] for y in ys])


def _cls_loss(cls_out, cls_target, clones, weight, S):
    """``d2v_loss(cls_pred, cls_target.repeat_interleave(K)) * (weight * S)`` summed, without the repeat."""
    R, D = cls_out.shape
    diff = cls_out.float().view(R // clones, clones, D) - cls_target.float().unsqueeze(1)
    return diff.square().sum() / math.sqrt(D) * (weight * S)


def losses_fast(model, source, masks, windows, std, num_kept) -> dict[str, torch.Tensor]:
    """The fast path; ``windows`` is None or (s1, s2) as a (2,) int64 tensor on source's device, ``num_kept`` the
    kept tokens per row of ``masks``. Reads no tensor value back to the host."""
    from sslam_fast.ops import layer_targets, masked_mse, partial_max_mix

    cfg, teacher = model.cfg, model.teacher
    K, top_k = cfg.clones, cfg.average_top_k_layers
    B = source.shape[0]
    if windows is None:
        x, mask_all = source, masks
    else:
        x = partial_max_mix(source, windows, window_frames=cfg.mix_window_frames, concat=True)
        mask_all = torch.cat([masks, masks])
    S = mask_all.sum()
    # The teachers run first: they need no gradient, so their activations come and go before the student stores its
    # own for the backward (upstream runs them after the student, with the student's activations alive: a higher
    # peak). Nothing here draws random numbers, so the order changes no value.
    ys = _teacher_layers_fast(teacher, teacher.patchify(x), top_k)  # teacher (A) on the unmasked clips
    Y = layer_targets(ys, top_k)  # (B or 2B, N, D) fp32
    t_srl = None
    if windows is None:
        cls_target = Y.mean(1)
    else:
        cls_target = layer_targets(ys, 1).mean(1)  # SSLAM: last layer only
        H, W = Y.shape[1] // cfg.grid[1], cfg.grid[1]
        p = cfg.patch_size
        token_index = kept_token_index(H, W, windows // p, cfg.mix_window_frames // p)
        # Teacher B: the clean clips with the two unmixed windows dropped after patch embed + positions (dropping
        # before the CLS prepend + input LayerNorm is the same thing: the LayerNorm is per token).
        zs = _teacher_layers_fast(teacher, teacher.patchify(source)[:, token_index], top_k)
        Z = layer_targets(zs, top_k)  # instance norm over the kept tokens only
        del zs
        Yu = Y[:B]
        Rt = Yu.clone()
        Rt[:, token_index] = Z.roll(1, dims=0)  # row i holds partner i - 1 in the mixed regions
        t_srl = (Yu + Rt) / 2
    del ys

    pred, cls_out = _student_fast(model, x, mask_all, std, num_kept)
    patch = masked_mse(pred, Y, mask_all, clones=K)
    if t_srl is None:
        mix_patch = patch.new_zeros(())
    else:
        mix_patch = 2 * masked_mse(pred[B * K :], t_srl, masks, clones=K)
    cls = _cls_loss(cls_out, cls_target, K, cfg.cls_loss_weight, S)
    return _finish(patch, mix_patch, cls, S)


# --- plain path (upstream, line by line) ------------------------------------------------------------------------------


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


def _student_plain(model, x, masks, std):
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
    h, _ = st.run_blocks(h, fast=False)
    cls_pred = h[:, 0]
    # decoder_input: drop CLS, append mask tokens, restore the order
    x = h[:, 1:]
    num_masked = N - len_keep
    mask_tokens = x.new_empty(x.size(0), num_masked, x.size(-1)).normal_(0, std)
    x = torch.cat([x, mask_tokens], dim=1)
    x = torch.gather(x, dim=1, index=ids_restore)
    pred = model.decoder(x, (N // cfg.grid[1], cfg.grid[1]), fast=False)
    return pred, cls_pred


@torch.no_grad()
def _teacher_plain(teacher, x):
    h = teacher.add_cls_and_norm(teacher.patchify(x))
    _, ys = teacher.run_blocks(h, fast=False, keep_targets=len(teacher.blocks))
    return [y[:, 1:] for y in ys]


@torch.no_grad()
def _teacher_dropped_plain(teacher, source, a, b, w, W):
    """``prepare_dropped_inputs_for_teacher_after_pos``: drop the unmixed windows' time rows after CLS + input LN."""
    x = teacher.add_cls_and_norm(teacher.patchify(source))
    cls, patches = x[:, :1], x[:, 1:]
    B, N, D = patches.shape
    p = patches.transpose(1, 2).reshape(B, D, N // W, W)
    p = torch.cat([p[:, :, :a], p[:, :, a + w : b], p[:, :, b + w :]], dim=2)
    x = torch.cat([cls, p.flatten(2).transpose(1, 2)], dim=1)
    _, zs = teacher.run_blocks(x, fast=False, keep_targets=len(teacher.blocks))
    return [z[:, 1:] for z in zs]


def losses_plain(model, source, masks, windows, std) -> dict[str, torch.Tensor]:
    cfg, teacher = model.cfg, model.teacher
    K, top_k = cfg.clones, cfg.average_top_k_layers
    B = source.shape[0]
    if windows is None:
        x, mask_all = source, masks
    else:
        s1, s2 = windows.tolist()  # the upstream path slices with ints (a host read, as upstream's Python ints are)
        wf = cfg.mix_window_frames
        roll1 = torch.roll(source, shifts=1, dims=0).clone()
        roll1[:, :, s1 : s1 + wf, :] = float("-inf")
        roll1[:, :, s2 : s2 + wf, :] = float("-inf")
        x_mix = torch.max(source, roll1)
        x = torch.cat([source, x_mix], dim=0)
        mask_all = torch.cat([masks, masks], dim=0)
    pred, cls_pred = _student_plain(model, x, mask_all, std)

    y = _teacher_plain(teacher, x)
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
        z = _teacher_dropped_plain(teacher, source, a, b, w, W)
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
    return _finish(patch, mix_patch, cls, sample_size)
