"""The decoder's input as a dispatching custom op: ``decoder_scatter`` (ALGORITHM §3).

``decoder_scatter`` drops CLS, puts the visible tokens back at their positions and fills the masked ones with
N(0, std^2) mask tokens.

Backends: ``reference`` (``sslam_fast.reference.decoder_scatter``, any device), ``triton``
(kernels/decoder_scatter.py; CUDA, or CPU under ``TRITON_INTERPRET=1``; the mask tokens come from an in-kernel Philox
stream) and, on CPU, ``cpp``: ATen row copies through flat row indices (``index_select``: whole D-vectors instead of
``gather`` / ``scatter_add_`` element by element; the backward reads the kept tokens' rows only), with the mask tokens
drawn exactly as the reference (upstream) draws them. The backward (``sslam_fast::decoder_scatter_backward``) runs on
the backend that ran the forward.
"""

from __future__ import annotations

import torch

from sslam_fast import _backend
from sslam_fast._checks import MODEL_DTYPES, check_generator, check_real, check_tensor, value_checks_enabled
from sslam_fast.reference import decoder_scatter as ref

__all__ = ["decoder_scatter"]

_SEED_HIGH = 2**62  # Philox takes a 64-bit key; any value below this is a valid seed


# --- backends ---------------------------------------------------------------------------------------------------------


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


def _decoder_scatter_reference(x, ids_restore, noise, seed, mask_noise_std):
    return ref.decoder_scatter(x, ids_restore, _noise_for(x, ids_restore, noise, seed, mask_noise_std))


def _flat_rows(ids_restore: torch.Tensor) -> torch.Tensor:
    """``r * N + ids_restore[r, n]`` flattened: the rows of an (R * N, D) view that position (r, n) reads."""
    R, N = ids_restore.shape
    return (torch.arange(R, device=ids_restore.device).mul_(N).unsqueeze(1) + ids_restore).reshape(-1)


def _decoder_scatter_cpp(x, ids_restore, noise, seed, mask_noise_std):
    R, N = ids_restore.shape
    D = x.shape[2]
    noise = _noise_for(x, ids_restore, noise, seed, mask_noise_std)
    src = torch.cat([x[:, 1:], noise.to(x.dtype)], dim=1).view(R * N, D)
    return src.index_select(0, _flat_rows(ids_restore)).view(R, N, D)


def _decoder_scatter_backward_cpp(grad, ids_restore, keep):
    # Only the kept tokens' rows are read: visible token j of row r sits at position order[r, j], where order is the
    # inverse permutation of ids_restore[r] (a scatter of arange). The mask tokens' gradient is never needed, so the
    # (R, N, D) gradient is not permuted as a whole (keep is N / 5 in EAT / SSLAM).
    R, N, D = grad.shape
    order = torch.empty_like(ids_restore).scatter_(
        1, ids_restore, torch.arange(N, device=ids_restore.device).expand(R, N)
    )
    rows = (torch.arange(R, device=grad.device).mul_(N).unsqueeze(1) + order[:, :keep]).reshape(-1)
    vis = grad.reshape(R * N, D).index_select(0, rows).view(R, keep, D)
    return torch.cat([grad.new_zeros(R, 1, D), vis], dim=1)


_triton_forward = _backend.triton_kernel("decoder_scatter", "decoder_scatter_fwd_triton")


def _decoder_scatter_triton(x, ids_restore, noise, seed, mask_noise_std):
    return _triton_forward(x, ids_restore, seed, mask_noise_std)  # the kernel draws the mask tokens from seed


# --- the op -----------------------------------------------------------------------------------------------------------


def _fake(x, ids_restore, noise, seed, mask_noise_std, backend):
    return x.new_empty((x.shape[0], ids_restore.shape[1], x.shape[2]))


def _fake_backward(grad, ids_restore, keep, backend):
    return grad.new_empty((grad.shape[0], keep + 1, grad.shape[2]))


def _validate_backward(grad, ids_restore, keep) -> None:
    """keep sizes the result (the op can be called directly: torch.ops.sslam_fast.decoder_scatter_backward)."""
    if not 0 <= keep <= ids_restore.shape[-1]:
        raise ValueError(f"keep must lie in [0, {ids_restore.shape[-1]}] (the tokens of ids_restore), got {keep}")


def _save(ctx, inputs, output):
    x, ids_restore = inputs[0], inputs[1]
    ctx.save_for_backward(ids_restore)
    ctx.keep = x.shape[1] - 1


def _grads(ctx, run_backward, grad):
    (ids_restore,) = ctx.saved_tensors
    return run_backward(grad, ids_restore, ctx.keep), None, None, None, None


_op = _backend.define_op(
    "decoder_scatter",
    "(Tensor x, Tensor ids_restore, Tensor? noise, Tensor? seed, float mask_noise_std) -> Tensor",
    fake=_fake,
    kernels={"reference": _decoder_scatter_reference, "cpp": _decoder_scatter_cpp, "triton": _decoder_scatter_triton},
    checks={"cpp": _backend.always},
    backward=_backend.Backward(
        "(Tensor grad, Tensor ids_restore, SymInt keep) -> Tensor",
        fake=_fake_backward,
        kernels={
            "reference": ref.decoder_scatter_backward,
            "cpp": _decoder_scatter_backward_cpp,
            "triton": _backend.triton_kernel("decoder_scatter", "decoder_scatter_bwd_triton"),
        },
        validate=_validate_backward,
        save=_save,
        grads=_grads,
    ),
)


# --- the public function ----------------------------------------------------------------------------------------------


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
    check_tensor("x", x, ndim=3, dtypes=MODEL_DTYPES)
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=(torch.int64,), device=x.device)
    R, keep1 = x.shape[:2]
    if keep1 < 1:
        raise ValueError(f"x must have shape (R, 1 + k, D) with the CLS token first, got {tuple(x.shape)}")
    if ids_restore.shape[0] != R:
        raise ValueError(f"ids_restore must have one row per row of x ({R}), got {ids_restore.shape[0]}")
    N = ids_restore.shape[1]
    if N < keep1 - 1:
        raise ValueError(f"ids_restore must have N >= k = {keep1 - 1} columns, got {N}")
    std = check_real("mask_noise_std", mask_noise_std, minimum=0.0)
    check_generator(generator, x.device.type)
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
    return _op(x, ids_restore, noise, seed, std, chosen)
