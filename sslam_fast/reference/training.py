"""Plain-PyTorch training ops: the spec (ALGORITHM §2.2, §4, §5.3) in code, the CPU fallback and the test oracle.

- ``ema_update_`` / ``ema_decay``: the EMA teacher update and its decay schedule, mirroring
  ``[F] fairseq/modules/ema_module.py : EMAModule._step_internal`` and
  ``[E] models/EAT_pretraining.py : Data2VecMultiModel.set_num_updates`` (via ``get_annealed_rate``).
- ``layer_targets``: ``[E] models/EAT_pretraining.py : Data2VecMultiModel.make_targets`` with EAT's configuration
  (instance norm of each layer over tokens, mean of the top-k layers, LayerNorm over channels, all fp32, no affine).
- ``ln_gelu_residual`` / ``ln_gelu_residual_backward`` / ``decoder_block``: one block of
  ``[E] models/modules.py : Decoder2d`` (grouped conv, LayerNorm over channels via ``TransposeLast(-3)``, GELU) plus
  ``DecoderBase.add_residual``.
- ``masked_mse``: ``[E] models/EAT_pretraining.py : Data2VecMultiModel.d2v_loss`` (``loss_beta=0``, scale 1/sqrt(D))
  applied to the masked tokens (``x[masked_b]``), summed as fairseq's criterion does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5  # F.instance_norm / F.layer_norm defaults, used upstream by make_targets and the decoder LayerNorm


# --- EMA --------------------------------------------------------------------------------------------------------------


def ema_decay(num_updates: int, start: float = 0.9998, end: float = 0.99999, end_step: int = 100000) -> float:
    """The EMA decay after ``num_updates`` optimizer steps (ALGORITHM §4): linear from ``start`` to ``end``, then
    ``end``.

    Mirrors fairseq ``get_annealed_rate(start, end, curr_step, total_steps)``.
    """
    if num_updates >= end_step:
        return end
    r = end - start
    pct_remaining = 1 - num_updates / end_step
    return end - r * pct_remaining


@torch.no_grad()
def ema_update_(teacher_params, student_params, decay: float, frozen=None) -> None:
    """The per-parameter loop of ``EMAModule._step_internal``: teacher <- decay * teacher + (1 - decay) * student.

    Args:
        teacher_params: list of float tensors (the fp32 EMA master), updated in place.
        student_params: list of float tensors of the same shapes (any float dtype; upcast to the teacher's dtype).
        decay: the EMA decay.
        frozen: optional list of bools; a pair is copied (``teacher <- student``) when its entry is True or the
            student tensor does not require grad (upstream: ``key in skip_keys or not param.requires_grad``).
    """
    lr = 1 - decay  # upstream computes the weights exactly this way: mul_(1 - lr), add_(alpha=lr)
    for i, (t, s) in enumerate(zip(teacher_params, student_params)):
        if (frozen is not None and frozen[i]) or not s.requires_grad:
            t.copy_(s.to(dtype=t.dtype).data)
        else:
            t.mul_(1 - lr)
            t.add_(s.data.to(dtype=t.dtype), alpha=lr)


# --- teacher targets --------------------------------------------------------------------------------------------------


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


# --- CNN decoder block ------------------------------------------------------------------------------------------------


def ln_gelu_residual(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``GELU(LayerNorm_C(y)) + z`` for (R, C, H, W) tensors, computed in fp32 and returned in y's dtype.

    Upstream (``Decoder2d`` block after the conv): ``TransposeLast(-3)`` (R, C, H, W) -> (R, W, H, C), LayerNorm over
    C without affine (eps 1e-5), transpose back, exact-erf GELU, then ``add_residual``: ``x + residual``.
    """
    C = y.shape[1]
    n = F.layer_norm(y.float().transpose(-3, -1), (C,), eps=NORM_EPS).transpose(-3, -1)
    return (F.gelu(n) + z.float()).to(y.dtype)


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of x * Phi(x) = Phi(x) + x * phi(x), exact erf form."""
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def ln_gelu_residual_backward(grad_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of ``ln_gelu_residual`` with respect to y (the gradient for z is ``grad_out`` itself).

    Closed form, in fp32, with the statistics recomputed from y: x^ = (y - mean_C) * rstd, g = grad_out * GELU'(x^),
    grad_y = rstd * (g - mean_C(g) - x^ * mean_C(g * x^)). Returned in y's dtype.
    """
    yf = y.float()
    mean = yf.mean(dim=1, keepdim=True)
    var = (yf - mean).square().mean(dim=1, keepdim=True)
    rstd = torch.rsqrt(var + NORM_EPS)
    xhat = (yf - mean) * rstd
    g = grad_out.float() * _gelu_grad(xhat)
    grad = rstd * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
    return grad.to(y.dtype)


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


# --- transformer MLP --------------------------------------------------------------------------------------------------


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, b2) -> torch.Tensor:
    """timm ``Mlp`` as upstream's blocks use it: ``fc2(GELU(fc1(x)))``, exact-erf GELU (differentiable)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


# --- patch loss -------------------------------------------------------------------------------------------------------


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, clones: int = 1) -> torch.Tensor:
    """Sum over masked tokens and channels of ``(pred - target)^2 / sqrt(D)``, fp32 0-dim (differentiable).

    Args:
        pred: (R, N, D) float, the decoder output.
        target: (R // clones, N, D) float; row r of pred is compared with target row ``r // clones`` (upstream
            repeat-interleaves the teacher target ``clones`` times).
        mask: (R, N) bool, True = masked (enters the loss).

    Upstream: ``x = dx[masked_b]``, ``y = target[masked_b]``, ``F.mse_loss(x.float(), y.float(), reduction="none")
    * (1 / sqrt(D))``, then the criterion's ``.sum()``.
    """
    if clones != 1:
        target = target.repeat_interleave(clones, dim=0)
    x = pred[mask].float()
    y = target[mask].float()
    scale = 1 / math.sqrt(pred.shape[-1])
    return (F.mse_loss(x, y, reduction="none") * scale).sum()


def masked_mse_backward(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, clones: int = 1
) -> torch.Tensor:
    """Gradient of ``masked_mse`` with respect to pred, in pred's dtype: ``2 (pred - target) mask / sqrt(D) * grad``.

    The gradient with respect to target is its negation, summed over the ``clones`` rows that share a target row.
    """
    if clones != 1:
        target = target.repeat_interleave(clones, dim=0)
    scale = 2.0 / math.sqrt(pred.shape[-1])
    diff = (pred.float() - target.float()) * (scale * grad.float())
    return torch.where(mask.unsqueeze(-1), diff, torch.zeros((), device=diff.device)).to(pred.dtype)
