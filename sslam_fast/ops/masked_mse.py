"""The EAT / SSLAM masked patch loss: ``masked_mse`` (ALGORITHM §4, §5.4).

``masked_mse(pred, target, mask)`` = ``sum over rows, masked tokens and channels of (pred - target)^2 / sqrt(D)``,
fp32, without gathering the masked tokens and without repeat-interleaving a per-clip target over the clones
(row r of pred is compared with target row ``r // clones``). Upstream (``d2v_loss`` on ``x[masked_b]``, then the
criterion's sum) materialises both.

Backends: ``reference`` (``sslam_fast.reference.masked_mse``), ``cpp`` (csrc/masked_mse.cpp, the auto choice on CPU)
and ``triton`` (kernels/masked_mse.py; CUDA, or CPU under ``TRITON_INTERPRET=1``). Differentiable in pred and target.
"""

from __future__ import annotations

import numbers

import torch

from sslam_fast import _backend
from sslam_fast._checks import MAX_SIZE, MODEL_DTYPES, check_tensor
from sslam_fast.reference import masked_mse as ref

__all__ = ["masked_mse"]


def _validate(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, clones: int, *grad) -> None:
    """clones and D from the tensors' shapes (metadata only), before the reference's ``repeat_interleave(clones)``
    allocates from them."""
    if pred.dim() != 3 or target.dim() != 3:
        return  # the kernels name the bad shape
    if not 1 <= clones <= MAX_SIZE or target.shape[0] * clones != pred.shape[0]:
        raise ValueError(
            f"clones must lie in [1, {MAX_SIZE}] with pred rows = target rows x clones, got clones={clones} for pred "
            f"{tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    if pred.shape[2] == 0:
        raise ValueError(f"pred must have at least one channel (D > 0), got shape {tuple(pred.shape)}")


def _save(ctx, inputs, output):
    pred, target, mask, clones = inputs
    ctx.save_for_backward(pred, target, mask)
    ctx.clones = clones


def _grads(ctx, run_backward, grad):
    pred, target, mask = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_pred or need_target):
        return None, None, None, None
    grad_pred = run_backward(grad, pred, target, mask, ctx.clones)
    grad_target = None
    if need_target:  # d/dtarget = -d/dpred, summed over the clone rows that share a target row
        if ctx.clones == 1:
            grad_target = grad_pred.neg().to(target.dtype)
        else:
            R, N, D = pred.shape
            grad_target = grad_pred.float().view(R // ctx.clones, ctx.clones, N, D).sum(1).neg_().to(target.dtype)
    return (grad_pred if need_pred else None), grad_target, None, None


def _validate_backward(grad, pred, target, mask, clones):
    _validate(pred, target, mask, clones)


_op = _backend.define_op(
    "masked_mse",
    "(Tensor pred, Tensor target, Tensor mask, int clones) -> Tensor",
    fake=lambda pred, target, mask, clones, backend: pred.new_empty((), dtype=torch.float32),
    kernels={
        "reference": ref.masked_mse,
        "cpp": _backend.compiled("masked_mse"),
        "triton": _backend.triton_kernel("masked_mse", "masked_mse_fwd_triton"),
    },
    checks={"cpp": _backend.compiled_available("masked_mse")},
    validate=_validate,
    backward=_backend.Backward(
        "(Tensor grad, Tensor pred, Tensor target, Tensor mask, int clones) -> Tensor",
        fake=lambda grad, pred, target, mask, clones, backend: pred.new_empty(pred.shape),
        kernels={
            "reference": lambda *a: ref.masked_mse_backward(*a).contiguous(),
            "cpp": _backend.compiled("masked_mse_backward"),
            "triton": _backend.triton_kernel("masked_mse", "masked_mse_bwd_triton"),
        },
        checks={"cpp": _backend.compiled_available("masked_mse_backward")},
        validate=_validate_backward,
        save=_save,
        grads=_grads,
    ),
)


def masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    clones: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """EAT's frame (patch) loss summed over the masked tokens (ALGORITHM §4 ``d2v_loss`` + the criterion's sum).

    Args:
        pred: (R, N, D) float32 / float16 / bfloat16, the decoder output (any strides over R and N; unit stride
            over D avoids a copy in the Triton backend).
        target: (R, N, D), or (B, N, D) with R = B * clones: the per-clip teacher target, compared with pred row r
            as target row ``r // clones`` (upstream's ``repeat_interleave(clones)`` without the copy). Any float
            dtype of the three; usually fp32.
        mask: (R, N) bool, True = masked (the tokens that enter the loss), on pred's device.
        clones: rows of pred per target row; None infers ``R // B``. Given explicitly, R must equal B * clones.
        backend: "auto" | "reference" | "cpp" | "triton".

    Returns:
        fp32 0-dim tensor ``sum_{r, n: mask[r, n]} sum_d (pred[r, n, d] - target[r // clones, n, d])^2 / sqrt(D)``,
        computed in fp32. Unmasked tokens are never read, so a NaN there does not reach the loss; a NaN at a masked
        token does (no check: an fp16 overflow must reach the loss scaler). Differentiable in pred and target; the
        gradient is ``2 (pred - target) mask / sqrt(D)`` times the upstream gradient, in pred's dtype (target's
        gradient is its negation, summed over the clones, cast to target's dtype).
    """
    check_tensor("pred", pred, ndim=3, dtypes=MODEL_DTYPES)
    check_tensor("target", target, ndim=3, dtypes=MODEL_DTYPES, device=pred.device)
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,), device=pred.device)
    R, N, D = pred.shape
    if D == 0:  # the loss divides by sqrt(D): no channel would give 0 / 0 = NaN
        raise ValueError(f"pred must have at least one channel (D > 0), got shape {tuple(pred.shape)}")
    if target.shape[1:] != pred.shape[1:]:
        raise ValueError(f"target must have shape (B, {N}, {D}) like pred (R, N, D), got {tuple(target.shape)}")
    if mask.shape != (R, N):
        raise ValueError(f"mask must have shape ({R}, {N}) (pred's rows and tokens), got {tuple(mask.shape)}")
    B = target.shape[0]
    if clones is None:
        if (B == 0 and R != 0) or (B and R % B):
            raise ValueError(f"target rows ({B}) must divide pred rows ({R}) (R = B * clones)")
        clones = R // B if B else 1
    else:
        if isinstance(clones, bool) or not isinstance(clones, numbers.Integral) or not 0 < clones <= MAX_SIZE:
            raise ValueError(f"clones must be a positive int (at most {MAX_SIZE}), got {clones!r}")
        if R != B * clones:
            raise ValueError(f"clones: pred has {R} rows but target has {B} rows x {clones} clones = {B * clones}")
    chosen = _backend.resolve("masked_mse", backend, pred.device)
    return _op(pred, target, mask, int(clones), chosen)
