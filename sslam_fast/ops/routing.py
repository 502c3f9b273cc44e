"""Multi-clone routing as dispatching custom ops: the student's masked input and the decoder's input (ALGORITHM §2.1,
§3).

``clone_gather`` is ``LayerNorm(cat[cls, repeat_interleave(x, K)[r, ids_keep[r]]])`` without the K-fold copy of x;
its backward accumulates the clones' gradients into x's (B, N, D). ``decoder_scatter`` drops CLS, puts the visible
tokens back at their positions and fills the masked ones with N(0, std^2) mask tokens.

Backends: ``reference`` (plain PyTorch, any device), ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) and, on
CPU, ``cpp``: ATen row copies through flat row indices (``index_select`` / ``index_copy_``: whole D-vectors instead
of ``gather`` / ``scatter_add_`` element by element), for ``clone_gather`` through a clip-major row index (no K-fold
copy) with ATen's native LayerNorm forward / backward; ``decoder_scatter``'s mask tokens are drawn exactly as the
reference (upstream) draws them. Both ops have a registered backward
(``sslam_fast::clone_gather_backward``, ``sslam_fast::decoder_scatter_backward``), run by the backend that ran the
forward.
"""

from __future__ import annotations

import math
import numbers

import torch

from sslam_fast import _backend
from sslam_fast._checks import MAX_SIZE, check_positive_int, check_tensor, value_checks_enabled
from sslam_fast.reference import routing as ref

__all__ = ["clone_gather", "decoder_scatter"]

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SEED_HIGH = 2**62  # Philox takes a 64-bit key; any value below this is a valid seed


# --- backends ---------------------------------------------------------------------------------------------------------


def _clone_gather_triton(*args):
    from sslam_fast.kernels.routing import clone_gather_fwd_triton

    return clone_gather_fwd_triton(*args)


def _clone_gather_bwd_triton(*args):
    from sslam_fast.kernels.routing import clone_gather_bwd_triton

    return clone_gather_bwd_triton(*args)


def _flat_rows(ids: torch.Tensor, width: int, clones: int = 1) -> torch.Tensor:
    """Row r's indices into a (rows * width, D) view of its source row ``r // clones``: ``(r // clones) * width +
    ids[r]``, flattened."""
    src_row = torch.arange(ids.shape[0], device=ids.device).div_(clones, rounding_mode="floor")
    return (src_row.mul_(width).unsqueeze(1) + ids).reshape(-1)


def _clone_gather_sequence(x, ids_keep, clones, cls_token):
    """(R, 1 + k, D) fp32 ``cat[cls, x[r // clones, ids_keep[r]]]``, gathered straight from x (no repeat)."""
    R, k = ids_keep.shape
    B, N, D = x.shape
    rows = _flat_rows(ids_keep, N, clones)
    vis = x.reshape(B * N, D).index_select(0, rows).view(R, k, D).float()
    return torch.cat([cls_token.float().reshape(1, 1, D).expand(R, 1, D), vis], dim=1), rows


def _clone_gather_cpp(x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps):
    seq, _ = _clone_gather_sequence(x, ids_keep, clones, cls_token)
    D = x.shape[-1]
    out = torch.ops.aten.native_layer_norm(seq, [D], norm_weight.float(), norm_bias.float(), eps)[0]
    return out.to(x.dtype)


def _clone_gather_bwd_cpp(grad, x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps):
    B, N, D = x.shape
    seq, rows = _clone_gather_sequence(x, ids_keep, clones, cls_token)  # recomputed: the forward keeps only x
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


def _noise_for(x, ids_restore, noise, seed, mask_noise_std):
    """The mask tokens of the ATen backends: ``noise`` as drawn by the public function, zeros for std 0, or, when
    the call was set up for the Triton kernel (a seed, no noise) and that kernel failed, N(0, std^2) drawn from a
    generator seeded with ``seed`` (one host read of the seed: this path runs only after a fallback)."""
    if noise is not None:
        return noise
    shape = (ids_restore.shape[0], ids_restore.shape[1] - (x.shape[1] - 1), x.shape[2])
    if seed is None or mask_noise_std == 0:
        return x.new_zeros(shape)
    g = torch.Generator(device=x.device).manual_seed(int(seed.reshape(-1)[0]))
    return torch.randn(shape, generator=g, device=x.device, dtype=torch.float32).mul_(mask_noise_std).to(x.dtype)


def _decoder_scatter_cpp(x, ids_restore, noise, seed, mask_noise_std):
    R, N = ids_restore.shape
    D = x.shape[2]
    noise = _noise_for(x, ids_restore, noise, seed, mask_noise_std)
    src = torch.cat([x[:, 1:], noise.to(x.dtype)], dim=1).view(R * N, D)
    return src.index_select(0, _flat_rows(ids_restore, N)).view(R, N, D)


def _decoder_scatter_bwd_cpp(grad, ids_restore, keep):
    R, N, D = grad.shape
    src = grad.new_empty(R * N, D)  # ids_restore rows are permutations: every row of src is written exactly once
    src.index_copy_(0, _flat_rows(ids_restore, N), grad.reshape(R * N, D))
    return torch.cat([grad.new_zeros(R, 1, D), src.view(R, N, D)[:, :keep]], dim=1)


def _decoder_scatter_reference(x, ids_restore, noise, seed, mask_noise_std):
    return ref.decoder_scatter(x, ids_restore, _noise_for(x, ids_restore, noise, seed, mask_noise_std))


def _decoder_scatter_triton(x, ids_restore, noise, seed, mask_noise_std):
    from sslam_fast.kernels.routing import decoder_scatter_fwd_triton

    return decoder_scatter_fwd_triton(x, ids_restore, seed, mask_noise_std)


def _decoder_scatter_bwd_triton(grad, ids_restore, keep):
    from sslam_fast.kernels.routing import decoder_scatter_bwd_triton

    return decoder_scatter_bwd_triton(grad, ids_restore, keep)


_backend.register_op(
    _backend.OpBackends(
        "clone_gather",
        kernels={"reference": ref.clone_gather, "triton": _clone_gather_triton, "cpp": _clone_gather_cpp},
        checks={"cpp": lambda d: True},  # ATen kernels: always there on CPU
    )
)
_backend.register_op(
    _backend.OpBackends(
        "decoder_scatter",
        kernels={
            "reference": _decoder_scatter_reference,
            "triton": _decoder_scatter_triton,
            "cpp": _decoder_scatter_cpp,
        },
        checks={"cpp": lambda d: True},  # ATen kernels: always there on CPU
    )
)
# The backward of each op runs on the backend its forward ran on (resolved once, in the public function).
_backend.register_op(
    _backend.OpBackends(
        "clone_gather_backward",
        kernels={"reference": ref.clone_gather_backward, "triton": _clone_gather_bwd_triton,
                 "cpp": _clone_gather_bwd_cpp},
        checks={"cpp": lambda d: True},
    )
)
_backend.register_op(
    _backend.OpBackends(
        "decoder_scatter_backward",
        kernels={"reference": ref.decoder_scatter_backward, "triton": _decoder_scatter_bwd_triton,
                 "cpp": _decoder_scatter_bwd_cpp},
        checks={"cpp": lambda d: True},
    )
)


# --- custom ops -------------------------------------------------------------------------------------------------------


@torch.library.custom_op("sslam_fast::clone_gather", mutates_args=())
def _clone_gather_op(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    clones: int,
    cls_token: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    backend: str,
) -> torch.Tensor:
    _check_op_clones(x, ids_keep, clones)
    return _backend.kernel("clone_gather", backend)(x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps)


@_clone_gather_op.register_fake
def _(x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps, backend):
    return x.new_empty((ids_keep.shape[0], ids_keep.shape[1] + 1, x.shape[2]))


@torch.library.custom_op("sslam_fast::clone_gather_backward", mutates_args=())
def _clone_gather_bwd_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    clones: int,
    cls_token: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op_clones(x, ids_keep, clones)
    return _backend.kernel("clone_gather_backward", backend)(
        grad, x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps
    )


@_clone_gather_bwd_op.register_fake
def _(grad, x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps, backend):
    # every backend returns contiguous gradients, whatever the strides of x (patchify's output is a transposed view)
    return (x.new_empty(x.shape), cls_token.new_empty(cls_token.shape), norm_weight.new_empty(norm_weight.shape),
            norm_bias.new_empty(norm_bias.shape))


def _clone_gather_setup(ctx, inputs, output):
    x, ids_keep, clones, cls_token, norm_weight, norm_bias, eps, backend = inputs
    ctx.save_for_backward(x, ids_keep, cls_token, norm_weight, norm_bias)
    ctx.clones, ctx.eps, ctx.backend = clones, eps, backend


def _clone_gather_backward(ctx, grad):
    x, ids_keep, cls_token, norm_weight, norm_bias = ctx.saved_tensors
    dx, dcls, dw, db = _clone_gather_bwd_op(
        grad, x, ids_keep, ctx.clones, cls_token, norm_weight, norm_bias, ctx.eps, ctx.backend
    )
    return dx, None, None, dcls, dw, db, None, None


_clone_gather_op.register_autograd(_clone_gather_backward, setup_context=_clone_gather_setup)


@torch.library.custom_op("sslam_fast::decoder_scatter", mutates_args=())
def _decoder_scatter_op(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    mask_noise_std: float,
    backend: str,
) -> torch.Tensor:
    return _backend.kernel("decoder_scatter", backend)(x, ids_restore, noise, seed, mask_noise_std)


@_decoder_scatter_op.register_fake
def _(x, ids_restore, noise, seed, mask_noise_std, backend):
    return x.new_empty((x.shape[0], ids_restore.shape[1], x.shape[2]))


@torch.library.custom_op("sslam_fast::decoder_scatter_backward", mutates_args=())
def _decoder_scatter_bwd_op(grad: torch.Tensor, ids_restore: torch.Tensor, keep: int, backend: str) -> torch.Tensor:
    if not 0 <= keep <= ids_restore.shape[-1]:  # callable directly: keep sizes the result
        raise ValueError(f"keep must lie in [0, {ids_restore.shape[-1]}] (the tokens of ids_restore), got {keep}")
    return _backend.kernel("decoder_scatter_backward", backend)(grad, ids_restore, keep)


@_decoder_scatter_bwd_op.register_fake
def _(grad, ids_restore, keep, backend):
    return grad.new_empty((grad.shape[0], keep + 1, grad.shape[2]))


def _decoder_scatter_setup(ctx, inputs, output):
    x, ids_restore, backend = inputs[0], inputs[1], inputs[5]
    ctx.save_for_backward(ids_restore)
    ctx.keep, ctx.backend = x.shape[1] - 1, backend


def _decoder_scatter_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    return _decoder_scatter_bwd_op(grad, ids_restore, ctx.keep, ctx.backend), None, None, None, None, None


_decoder_scatter_op.register_autograd(_decoder_scatter_backward, setup_context=_decoder_scatter_setup)


# --- validation -------------------------------------------------------------------------------------------------------


def _check_op_clones(x: torch.Tensor, ids_keep: torch.Tensor, clones: int) -> None:
    """The custom ops are callable directly (torch.ops.sslam_fast.clone_gather): clones is checked against the
    shapes (metadata only) before a kernel divides row indices by it."""
    if ids_keep.dim() != 2 or x.dim() != 3:
        return  # the kernels name the bad shape
    if not 1 <= clones <= MAX_SIZE or ids_keep.shape[0] != x.shape[0] * clones:
        raise ValueError(
            f"clones must lie in [1, {MAX_SIZE}] with ids_keep rows = x rows x clones, got clones={clones} for x "
            f"{tuple(x.shape)} and ids_keep {tuple(ids_keep.shape)}"
        )


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


def _check_ids_restore(ids_restore: torch.Tensor) -> None:
    """Every row a permutation of [0, N): one device sync."""
    R, N = ids_restore.shape
    if ids_restore.numel() == 0:
        return
    lo, hi = ids_restore.min(), ids_restore.max()
    in_range = (lo >= 0) & (hi < N)
    counts = torch.zeros((R, N), dtype=torch.int32, device=ids_restore.device)
    counts.scatter_add_(1, ids_restore.clamp(0, N - 1), torch.ones_like(ids_restore, dtype=torch.int32))
    ok = in_range & (counts == 1).all()
    if not bool(ok):
        if not bool(in_range):
            raise ValueError(f"ids_restore must lie in [0, {N}), got values in [{int(lo)}, {int(hi)}]")
        raise ValueError(f"ids_restore rows must be permutations of [0, {N})")


def _real(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


# --- public functions -------------------------------------------------------------------------------------------------


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
    check_tensor("x", x, ndim=3, dtypes=_X_DTYPES)
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
    eps = _real("eps", eps, positive=True)
    if check_ids and value_checks_enabled():  # never inside torch.compile: a data-dependent check cannot be traced
        _check_ids_keep(ids_keep, N)
    chosen = _backend.resolve("clone_gather", backend, x.device)
    return _clone_gather_op(x, ids_keep, int(clones), cls_token.reshape(D), norm_weight, norm_bias, eps, chosen)


def decoder_scatter(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_noise_std: float,
    generator: torch.Generator | None = None,
    *,
    backend: str = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """The decoder input (ALGORITHM §3): drop CLS, restore the visible tokens' positions, fill the rest with mask
    tokens.

    ``out[r, n] = cat[x[r, 1:], noise[r]][ids_restore[r, n]]`` with ``noise ~ N(0, mask_noise_std^2)`` i.i.d.

    Args:
        x: (R, 1 + k, D) float32 / float16 / bfloat16: the student encoder output, CLS first.
        ids_restore: (R, N) int64 on x's device, each row a permutation of [0, N) (``argsort(argsort(mask))``):
            values < k pick visible token ``x[r, 1 + value]``, values >= k a mask token.
        mask_noise_std: the mask tokens' std (0.01 upstream), >= 0; 0 gives exact zeros (deterministic mode).
        generator: the random source (None: the default generator of x's device). The reference and cpp backends
            draw ``x.new_empty(R, N - k, D).normal_(0, std, generator=generator)`` exactly as upstream does; the triton
            backend draws one 64-bit seed from it (on its device, no host sync) and generates the noise in-kernel
            (Philox), so backends agree exactly at std 0 and in distribution otherwise.
        backend: "auto" | "reference" | "cpp" | "triton".
        check_ids: verify that ids_restore rows are permutations (one device sync); pass False only for indices
            known to be valid (the triton backward writes each visible token's gradient exactly once).

    Returns:
        (R, N, D) in x's dtype. Differentiable wrt x: visible tokens get the gradient at their position, CLS zero.
    """
    check_tensor("x", x, ndim=3, dtypes=_X_DTYPES)
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=(torch.int64,), device=x.device)
    R, keep1 = x.shape[:2]
    if keep1 < 1:
        raise ValueError(f"x must have shape (R, 1 + k, D) with the CLS token first, got {tuple(x.shape)}")
    if ids_restore.shape[0] != R:
        raise ValueError(f"ids_restore must have one row per row of x ({R}), got {ids_restore.shape[0]}")
    N = ids_restore.shape[1]
    if N < keep1 - 1:
        raise ValueError(f"ids_restore must have N >= k = {keep1 - 1} columns, got {N}")
    std = _real("mask_noise_std", mask_noise_std, positive=False)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator is on {generator.device} but x is on {x.device}")
    if check_ids and value_checks_enabled():
        _check_ids_restore(ids_restore)
    chosen = _backend.resolve("decoder_scatter", backend, x.device)
    noise = seed = None
    if std != 0:
        if _backend.base_name(chosen) in ("reference", "cpp"):
            noise = ref.mask_noise(x, N - (keep1 - 1), std, generator)
        else:
            gen_device = generator.device if generator is not None else x.device
            seed = torch.randint(_SEED_HIGH, (1,), generator=generator, device=gen_device).to(x.device)
    return _decoder_scatter_op(x, ids_restore, noise, seed, std, chosen)
