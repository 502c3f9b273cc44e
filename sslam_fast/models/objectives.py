"""The EAT (stage 1, ALGORITHM §4) and SSLAM (stage 2, ALGORITHM §5) objectives on ``sslam_fast.ops``.

``losses`` runs ``clone_gather`` (no repeat_interleave of the clip batch), ``attention``, ``decoder_scatter``,
``decoder_block``, ``layer_targets`` (teacher B's targets computed on its kept tokens only), ``masked_mse``
(clone-aware: no repeated targets, no ``x[mask]`` gathers; SSLAM's two patch sums write one gradient of the
decoder output, :class:`_PatchTerms`) and ``partial_max_mix``. ``sslam_fast.reference.model``
computes the same terms the way upstream writes them (``[E] models/EAT_pretraining.py : Data2VecMultiModel.forward``,
``[S] Pre-Training/SSLAM_Stage2/models/EAT_pretraining.py : forward``): the oracle of the tests.

Returns ``dict(patch, mix_patch, cls, sample_size, loss)`` (fp32 0-dim tensors): sums as fairseq's criterion forms
them, and ``loss = (patch + mix_patch + cls) / sample_size``.
"""

from __future__ import annotations

import math

import torch

from sslam_fast import _backend
from sslam_fast.ops import clone_gather, decoder_scatter, layer_targets, masked_mse, partial_max_mix

__all__ = ["losses", "kept_time_rows", "kept_token_index"]


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


def _student(model, x, masks, std, k):
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
    h, _ = st.run_blocks(h)
    dec_in = decoder_scatter(h, ids_restore, std, check_ids=False)
    pred = model.decoder(dec_in, (N // cfg.grid[1], cfg.grid[1]))
    return pred, h[:, 0]


@torch.no_grad()
def _teacher_layers(teacher, tokens, top_k):
    """(top_k, B, n, D) FFN outputs of the last top_k blocks without CLS, for (B, n, D) patch tokens + positions."""
    _, ys = teacher.run_blocks(teacher.add_cls_and_norm(tokens), keep_targets=top_k)
    return torch.stack([y[:, 1:] for y in ys])


def _cls_loss(cls_out, cls_target, clones, weight, S):
    """``d2v_loss(cls_pred, cls_target.repeat_interleave(K)) * (weight * S)`` summed, without the repeat."""
    R, D = cls_out.shape
    diff = cls_out.float().view(R // clones, clones, D) - cls_target.float().unsqueeze(1)
    return diff.square().sum() / math.sqrt(D) * (weight * S)


class _PatchTerms(torch.autograd.Function):
    """``(masked_mse(pred, Y, mask_all), masked_mse(pred[n:], t_srl, masks))`` with n = rows of pred - rows of masks
    (SSLAM's patch loss over all rows and the source-retention term over the mixed rows, ALGORITHM §5.4), both
    differentiable in ``pred`` only (the targets are the teacher's, taken as constants).

    The backward writes pred's gradient once: the patch term's, with the mixed rows' term added in place to its
    last rows. Autograd of ``masked_mse(pred[n:], ...)`` would instead fill a tensor of zeros of pred's whole size
    for the slice's gradient, copy the term into it and add that to the patch term's gradient: two extra passes
    over pred and one allocation of its size. The sums are the same (x + 0 = x on the first rows, one addition of
    the same two values on the mixed rows), so the gradient is bit for bit autograd's."""

    @staticmethod
    def forward(ctx, pred, Y, mask_all, t_srl, masks, clones, backend):
        n = pred.shape[0] - masks.shape[0]
        ctx.save_for_backward(pred, Y, mask_all, t_srl, masks)
        ctx.clones, ctx.backend, ctx.n = clones, backend, n
        ctx.set_materialize_grads(False)
        patch = torch.ops.sslam_fast.masked_mse(pred, Y, mask_all, clones, backend)
        mix = torch.ops.sslam_fast.masked_mse(pred[n:], t_srl, masks, clones, backend)
        return patch, mix

    @staticmethod
    def backward(ctx, g_patch, g_mix):
        pred, Y, mask_all, t_srl, masks = ctx.saved_tensors
        K, backend, n = ctx.clones, ctx.backend, ctx.n
        grad = None
        if g_patch is not None:
            grad = torch.ops.sslam_fast.masked_mse_backward(g_patch, pred, Y, mask_all, K, backend)
        if g_mix is not None:
            g = torch.ops.sslam_fast.masked_mse_backward(g_mix, pred[n:], t_srl, masks, K, backend)
            if grad is None:
                grad = torch.cat([pred.new_zeros((n, *pred.shape[1:])), g])
            else:
                grad[n:] += g
        return grad, None, None, None, None, None, None


def _patch_terms(pred, Y, mask_all, t_srl, masks, clones):
    """The patch and source-retention sums of SSLAM (:class:`_PatchTerms`) on the backend ``masked_mse`` would pick;
    the shapes are checked here (dtypes and devices are those of :func:`losses`' checked inputs)."""
    for target, mask, rows in ((Y, mask_all, pred), (t_srl, masks, pred[pred.shape[0] - masks.shape[0]:])):
        if target.shape[0] * clones != rows.shape[0] or target.shape[1:] != pred.shape[1:] or \
                mask.shape != rows.shape[:2]:
            raise ValueError(f"patch terms: pred {tuple(rows.shape)} does not match target {tuple(target.shape)} x "
                             f"{clones} clones and mask {tuple(mask.shape)}")
    backend = _backend.resolve("masked_mse", "auto", pred.device)
    return _PatchTerms.apply(pred, Y.detach(), mask_all, t_srl.detach(), masks, clones, backend)


def losses(model, source, masks, windows, std, num_kept) -> dict[str, torch.Tensor]:
    """The loss terms of ``model`` (a ``PretrainingModel``) on checked inputs: ``windows`` is None or (s1, s2) as a
    (2,) int64 tensor on source's device, ``num_kept`` the kept tokens per row of ``masks``. Reads no tensor value
    back to the host."""
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
    ys = _teacher_layers(teacher, teacher.patchify(x), top_k)  # teacher (A) on the unmasked clips
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
        zs = _teacher_layers(teacher, teacher.patchify(source)[:, token_index], top_k)
        Z = layer_targets(zs, top_k)  # instance norm over the kept tokens only
        del zs
        Yu = Y[:B]
        Rt = Yu.clone()
        Rt[:, token_index] = Z.roll(1, dims=0)  # row i holds partner i - 1 in the mixed regions
        t_srl = (Yu + Rt) / 2
    del ys

    pred, cls_out = _student(model, x, mask_all, std, num_kept)
    if t_srl is None:
        patch = masked_mse(pred, Y, mask_all, clones=K)
        mix_patch = patch.new_zeros(())
    else:
        patch, mix_patch = _patch_terms(pred, Y, mask_all, t_srl, masks, K)
        mix_patch = 2 * mix_patch
    cls = _cls_loss(cls_out, cls_target, K, cfg.cls_loss_weight, S)
    return _finish(patch, mix_patch, cls, S)
