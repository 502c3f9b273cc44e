"""The student's multi-clone input as a dispatching custom op: ``clone_gather`` (ALGORITHM §2.1).

``clone_gather`` is ``LayerNorm(cat[cls, repeat_interleave(x, K)[r, ids_keep[r]]])`` without the K-fold copy of x;
its backward accumulates the clones' gradients into x's (B, N, D).

Backends: ``reference`` (``sslam_fast.reference.clone_gather``, any device), ``triton`` (kernels/clone_gather.py;
CUDA, or CPU under ``TRITON_INTERPRET=1``) and, on CPU, ``cpp``: ATen row copies through a clip-major flat row index
(``index_select`` / ``index_add_``: whole D-vectors instead of ``gather`` element by element, and no K-fold copy)
with ATen's native LayerNorm forward / backward. The backward (``sslam_fast::clone_gather_backward``) runs on the
backend that ran the forward.
"""

from __future__ import annotations

import torch

from sslam_fast import _backend
from sslam_fast._checks import (
    MAX_SIZE,
    MODEL_DTYPES,
    check_positive_int,
    check_real,
    check_tensor,
    value_checks_enabled,
)
from sslam_fast.reference import clone_gather as ref

__all__ = ["clone_gather"]


# --- cpp backend: ATen row copies -------------------------------------------------------------------------------------


def _flat_rows(ids: torch.Tensor, width: int, clones: int) -> torch.Tensor:
    """Row r's indices into a (rows * width, D) view of its source row ``r // clones``: ``(r // clones) * width +
    ids[r]``, flattened."""
    src_row = torch.arange(ids.shape[0], device=ids.device).div_(clones, rounding_mode="floor")
    return (src_row.mul_(width).unsqueeze(1) + ids).reshape(-1)


def _sequence(x, ids_keep, clones, cls_token):
    """(R, 1 + k, D) fp32 ``cat[cls, x[r // clones, ids_keep[r]]]``, gathered straight from x (no repeat)."""
    R, k = ids_keep.shape
    B, N, D = x.shape
    rows = _flat_rows(ids_keep, N, clones)
    vis = x.reshape(B * N, D).index_select(0, rows).view(R, k, D).float()
    return torch.cat([cls_token.float().reshape(1, 1, D).expand(R, 1, D), vis], dim=1), rows


def _clone_gather_cpp(x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps):
    seq, _ = _sequence(x, ids_keep, clones, cls_token)
    D = x.shape[-1]
    out = torch.ops.aten.native_layer_norm(seq, [D], norm_weight.float(), norm_bias.float(), eps)[0]
    return out.to(x.dtype)


def _clone_gather_backward_cpp(grad, x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps):
    B, N, D = x.shape
    seq, rows = _sequence(x, ids_keep, clones, cls_token)  # recomputed: the forward keeps only x
    w, b = norm_weight.float(), norm_bias.float()
    _, mean, rstd = torch.ops.aten.native_layer_norm(seq, [D], w, b, eps)
    dseq, dw, db = torch.ops.aten.native_layer_norm_backward(
        grad.float().contiguous(), seq, [D], mean, rstd, w, b, [True, True, True]
    )
    dx = torch.zeros(B * N, D, dtype=torch.float32, device=x.device)
    dx.index_add_(0, rows, dseq[:, 1:].reshape(-1, D))
    return (
        dx.view(B, N, D).to(x.dtype),
        dseq[:, 0].sum(0).reshape(cls_token.shape).to(cls_token.dtype),
        dw.to(norm_weight.dtype),
        db.to(norm_bias.dtype),
    )


# --- the op -----------------------------------------------------------------------------------------------------------


def _validate(x: torch.Tensor, ids_keep: torch.Tensor, clones: int, *params) -> None:
    """clones against the shapes (metadata only), before a kernel divides row indices by it (the op can be called
    directly: torch.ops.sslam_fast.clone_gather)."""
    if ids_keep.dim() != 2 or x.dim() != 3:
        return  # the kernels name the bad shape
    if not 1 <= clones <= MAX_SIZE or ids_keep.shape[0] != x.shape[0] * clones:
        raise ValueError(
            f"clones must lie in [1, {MAX_SIZE}] with ids_keep rows = x rows x clones, got clones={clones} for x "
            f"{tuple(x.shape)} and ids_keep {tuple(ids_keep.shape)}"
        )


def _validate_backward(grad, x, ids_keep, clones, *params) -> None:
    _validate(x, ids_keep, clones)


def _fake(x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps, backend):
    return x.new_empty((ids_keep.shape[0], ids_keep.shape[1] + 1, x.shape[2]))


def _fake_backward(grad, x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps, backend):
    # every backend returns contiguous gradients, whatever the strides of x (patchify's output is a transposed view)
    return (x.new_empty(x.shape), cls_token.new_empty(cls_token.shape), norm_weight.new_empty(norm_weight.shape),
            norm_bias.new_empty(norm_bias.shape))


def _save(ctx, inputs, output):
    x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps = inputs
    ctx.save_for_backward(x, ids_keep, cls_token, norm_weight, norm_bias)
    ctx.clones, ctx.eps = clones, eps


def _grads(ctx, run_backward, grad):
    x, ids_keep, cls_token, norm_weight, norm_bias = ctx.saved_tensors
    dx, dcls, dw, db = run_backward(grad, x, ids_keep, ctx.clones, cls_token, norm_weight, norm_bias, ctx.eps)
    return dx, None, None, dcls, dw, db, None


_op = _backend.define_op(
    "clone_gather",
    "(Tensor x, Tensor ids_keep, SymInt clones, Tensor cls_token, Tensor norm_weight, Tensor norm_bias, float eps)"
    " -> Tensor",
    fake=_fake,
    kernels={
        "reference": ref.clone_gather,
        "cpp": _clone_gather_cpp,
        "triton": _backend.triton_kernel("clone_gather", "clone_gather_fwd_triton"),
    },
    checks={"cpp": _backend.always},
    validate=_validate,
    backward=_backend.Backward(
        "(Tensor grad, Tensor x, Tensor ids_keep, SymInt clones, Tensor cls_token, Tensor norm_weight, "
        "Tensor norm_bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
        fake=_fake_backward,
        kernels={
            "reference": ref.clone_gather_backward,
            "cpp": _clone_gather_backward_cpp,
            "triton": _backend.triton_kernel("clone_gather", "clone_gather_bwd_triton"),
        },
        validate=_validate_backward,
        save=_save,
        grads=_grads,
    ),
)


# --- the public function ----------------------------------------------------------------------------------------------


def _check_param(name: str, t, x: torch.Tensor, shapes: tuple[tuple[int, ...], ...]) -> None:
    """A float parameter on x's device with dtype x.dtype or float32 and one of ``shapes``."""
    check_tensor(name, t, device=x.device)
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_ids_keep(ids_keep: torch.Tensor, N: int) -> None:
    """Every row strictly ascending in [0, N): one device sync."""
    if ids_keep.numel() == 0:
        return
    ok = (ids_keep.min() >= 0) & (ids_keep.max() < N) & (ids_keep[:, 1:] > ids_keep[:, :-1]).all()
    if not bool(ok):
        lo, hi = int(ids_keep.min()), int(ids_keep.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"ids_keep must lie in [0, {N}) (the tokens of x), got values in [{lo}, {hi}]")
        raise ValueError("ids_keep rows must be strictly ascending (distinct kept tokens, sorted)")


def clone_gather(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    clones: int,
    cls_token: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """The student's encoder input: ``LayerNorm(cat[cls, x[r // clones, ids_keep[r]]])`` for every row r (
    ALGORITHM §2.1).

    Equals upstream's ``repeat_interleave(clones)`` + ``gather(ids_keep)`` + CLS prepend + input LayerNorm without
    materialising the repeated (B * clones, N, D) tensor.

    Args:
        x: (B, N, D) float32 / float16 / bfloat16: patches + positional embedding.
        ids_keep: (B * clones, k) int64 on x's device; row ``r = b * clones + c`` lists the tokens clone c of clip b
            keeps, strictly ascending, in [0, N).
        clones: K, the clone count (8 in SSLAM stage 2).
        cls_token: (1, 1, D) or (D,); norm_weight, norm_bias: (D,). Each in x's dtype or float32, on x's device.
        eps: LayerNorm epsilon (1e-6 upstream), > 0.
        backend: "auto" | "reference" | "cpp" (CPU) | "triton".
        check_ids: verify the ids_keep values (range, ascending): one device sync. Pass False only for indices
            known to be valid (the triton backward relies on distinct ids per row).

    Returns:
        (B * clones, 1 + k, D) in x's dtype; statistics and the affine map in fp32. Differentiable wrt x, cls_token,
        norm_weight and norm_bias (dx sums the contributions of every clone and token, in fp32). NaN in the inputs
        propagates as it does upstream.
    """
    check_tensor("x", x, ndim=3, dtypes=MODEL_DTYPES)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=(torch.int64,), device=x.device)
    check_positive_int("clones", clones)
    B, N, D = x.shape
    if ids_keep.shape[0] != B * clones:
        raise ValueError(
            f"ids_keep must have B * clones = {B} * {clones} = {B * clones} rows (one per clone of each clip), "
            f"got {ids_keep.shape[0]}"
        )
    _check_param("cls_token", cls_token, x, ((1, 1, D), (D,)))
    _check_param("norm_weight", norm_weight, x, ((D,),))
    _check_param("norm_bias", norm_bias, x, ((D,),))
    eps = check_real("eps", eps, positive=True)
    if check_ids and value_checks_enabled():  # never inside torch.compile: a data-dependent check cannot be traced
        _check_ids_keep(ids_keep, N)
    chosen = _backend.resolve("clone_gather", backend, x.device)
    return _op(x, ids_keep, int(clones), cls_token.reshape(D), norm_weight, norm_bias, eps, chosen)
