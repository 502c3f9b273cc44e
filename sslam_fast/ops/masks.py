"""Inverse block masks as a dispatching custom op (ALGORITHM §3), and the gather/restore indices of a mask.

``inverse_block_mask`` draws the EAT/SSLAM pre-training masks of a whole batch: (batch_size * clones, H*W) bool,
True = masked, with exactly the distribution of upstream ``compute_block_mask_2d`` (``inverse_mask=True``,
``require_same_masks=True``): a union of random clamped mask_length x mask_length blocks marks the kept (visible)
tokens, then each row is fixed up to exactly ``keep`` kept tokens.

Backends: ``reference`` (the upstream loop, plain PyTorch on the CPU generator; any device, moved after), ``cpp``
(``sslam_fast._C``, CPU, all rows at once in parallel) and ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
The random stream: the public function draws one 64-bit seed from ``generator`` with ``torch.randint``; every backend
is a pure function of that seed (the reference seeds a private ``torch.Generator`` with it), so the custom op is
deterministic in its arguments. Backends give different bits for a seed, with the same distribution.

``mask_indices`` is a plain function: a stable sort and a scatter, two ATen calls that run on every device and that
``torch.compile`` traces through. A custom op would add nothing but an opaque node with a data-dependent output width
(the kept count k), which would need an unbacked SymInt in its fake kernel.
"""

from __future__ import annotations

import math
import numbers

import torch

from sslam_fast import _backend
from sslam_fast._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    MAX_ELEMENTS,
    MAX_SIZE,
    check_elements,
    check_finite,
    check_positive_int,
    check_tensor,
)
from sslam_fast.reference import masks as ref

__all__ = ["inverse_block_mask", "mask_indices"]

_SEED_HIGH = 2**63 - 1  # seeds are drawn uniformly from [0, 2^63 - 1)


# --- backends ---------------------------------------------------------------------------------------------------------
# Each kernel: (batch_size, clones, H, W, n_centers, mask_length, keep, seed, device) -> (batch_size * clones, H*W)
# bool on device. keep < 0 returns the union of blocks before the fix-up (a diagnostic for the tests).


def _reference_kernel(batch_size, clones, H, W, n_centers, mask_length, keep, seed, device):
    g = torch.Generator().manual_seed(seed)
    clips = []
    for _ in range(batch_size):  # one upstream call per clip, in clip order: clip-major rows
        kept = ref.clip_block_mask_before_fixup(clones, (H, W), n_centers, mask_length, g)
        if keep >= 0:
            ref.fix_up_rows_(kept, keep, g)
        clips.append(kept == 0)
    return torch.cat(clips).to(device)


def _cpp_kernel(batch_size, clones, H, W, n_centers, mask_length, keep, seed, device):
    return torch.ops.sslam_fast.inverse_block_mask_cpu(batch_size * clones, H, W, n_centers, mask_length, keep, seed)


def _triton_kernel(batch_size, clones, H, W, n_centers, mask_length, keep, seed, device):
    from sslam_fast.kernels.masks import inverse_block_mask_triton

    return inverse_block_mask_triton(batch_size * clones, H, W, n_centers, mask_length, keep, seed, device)


_backend.register_op(
    _backend.OpBackends(
        "inverse_block_mask",
        kernels={"reference": _reference_kernel, "cpp": _cpp_kernel, "triton": _triton_kernel},
        checks={"cpp": lambda d: _backend.extension_has("inverse_block_mask_cpu")},
    )
)


if _backend.extension_has("inverse_block_mask_cpu"):  # so that opcheck / FakeTensor can trace the C++ op itself

    @torch.library.register_fake("sslam_fast::inverse_block_mask_cpu")
    def _(rows, H, W, n_centers, mask_length, keep, seed):
        return torch.empty((rows, H * W), dtype=torch.bool)


# --- custom op --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("sslam_fast::inverse_block_mask", mutates_args=())
def _inverse_block_mask_op(
    batch_size: int,
    clones: int,
    H: int,
    W: int,
    n_centers: int,
    mask_length: int,
    keep: int,
    seed: int,
    device: torch.device,
    backend: str,
) -> torch.Tensor:
    # The op is callable directly (torch.ops.sslam_fast.inverse_block_mask): its sizes are checked here too, since
    # the kernels loop over n_centers and allocate from these ints (ints only: no tensor is read).
    _check_kernel_sizes(batch_size, clones, H, W, n_centers, mask_length, keep)
    return _backend.kernel("inverse_block_mask", backend)(
        batch_size, clones, H, W, n_centers, mask_length, keep, seed, device
    )


@_inverse_block_mask_op.register_fake
def _(batch_size, clones, H, W, n_centers, mask_length, keep, seed, device, backend):
    return torch.empty((batch_size * clones, H * W), dtype=torch.bool, device=device)


# --- validation -------------------------------------------------------------------------------------------------------


def _check_grid(grid) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be a pair (H, W) of ints, got {grid!r}")
    H, W = grid
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (H, W)):
        raise TypeError(f"grid must hold ints, got ({type(H).__name__}, {type(W).__name__})")
    if H <= 0 or W <= 0:
        raise ValueError(f"grid must hold positive sizes, got {tuple(grid)}")
    # The kernels list a row's tokens as int32 and draw them with a 32-bit bound (the triton one takes far fewer).
    if H * W > MAX_SIZE:
        raise ValueError(f"grid {H} x {W} has {H * W} cells; at most {MAX_SIZE} (2**31 - 1) are supported")
    return int(H), int(W)


def _check_kernel_sizes(batch_size, clones, H, W, n_centers, mask_length, keep) -> None:
    """The int arguments of the custom op, in the ranges the kernels handle (ValueError naming the argument): every
    product below is exact (Python ints), so nothing wraps before the C++ op's own checks (csrc/masks.cpp)."""
    for name, value, low, high in (
        ("batch_size", batch_size, 0, MAX_ELEMENTS),
        ("clones", clones, 0, MAX_ELEMENTS),
        ("H", H, 1, MAX_SIZE),
        ("W", W, 1, MAX_SIZE),
        ("mask_length", mask_length, 1, MAX_SIZE),
    ):
        if not low <= value <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    L = H * W
    if L > MAX_SIZE:
        raise ValueError(f"grid {H} x {W} has {L} cells; at most {MAX_SIZE} (2**31 - 1) are supported")
    if not 0 <= n_centers <= L:
        raise ValueError(f"n_centers must lie in [0, {L}] (the grid cells), got {n_centers}")
    if not -1 <= keep <= L:
        raise ValueError(f"keep must be -1 (no fix-up) or lie in [0, {L}] (the grid cells), got {keep}")
    check_elements("the mask batch", batch_size=batch_size, clones=clones, cells=L)


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, a torch.device or None, got {type(device).__name__}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_generator(generator) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (upstream draws on the CPU), got {generator.device}")


# --- public functions -------------------------------------------------------------------------------------------------


def inverse_block_mask(
    batch_size: int,
    clones: int,
    *,
    grid: tuple[int, int] = (64, 8),
    mask_prob: float = 0.8,
    mask_length: int = 5,
    mask_prob_adjust: float = 0.07,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    seed: int | None = None,
) -> torch.Tensor:
    """The EAT/SSLAM inverse block multi-masks of a batch (ALGORITHM §3).

    Args:
        batch_size: clips B (> 0).
        clones: mask rows per clip K (> 0); 16 in EAT, 8 in SSLAM stage 2.
        grid: (H, W) = (time patches, frequency patches); token n = W * t + f.
        mask_prob: 0 < mask_prob < 1; upstream keeps ``keep = int(H*W * (1 - mask_prob))`` tokens a row (102 of 512).
        mask_length: side of the square blocks (>= 1; blocks are cut at the grid border).
        mask_prob_adjust: in [0, 1], added to the keep ratio when choosing the number of block centres,
            ``n_centers = int(H*W * ((1 - mask_prob + mask_prob_adjust) / mask_length**2))`` (5 for the defaults),
            which must not exceed the H*W cells (upstream EAT uses 0.07, fairseq's default is 0).
        generator: a CPU ``torch.Generator``, or None for the default CPU generator (what upstream uses). One 64-bit
            seed is drawn from it per call; the same generator state gives the same masks for a given backend.
        device: where the result lives (default CPU).
        backend: "auto" | "reference" | "cpp" | "triton" (see ``sslam_fast._backend``); auto takes cpp on CPU and
            triton on CUDA.
        seed: the 64-bit seed itself, in [0, 2^63 - 1), instead of a draw from ``generator`` (give one or neither):
            what a caller that derives its randomness on the host without tensors passes (the trainer).

    Returns:
        (batch_size * clones, H*W) bool on ``device``, True = masked; clip-major (row ``b * clones + k`` is clone k of
        clip b); exactly ``keep`` False entries on every row.
    """
    check_positive_int("batch_size", batch_size, maximum=MAX_ELEMENTS)
    check_positive_int("clones", clones, maximum=MAX_ELEMENTS)
    H, W = _check_grid(grid)
    L = H * W
    check_elements("the mask batch", batch_size=batch_size, clones=clones, cells=L)  # before anything is drawn
    mask_prob = _check_real("mask_prob", mask_prob)
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must lie strictly between 0 and 1, got {mask_prob}")
    if isinstance(mask_length, bool) or not isinstance(mask_length, numbers.Integral):
        raise TypeError(f"mask_length must be an int, got {type(mask_length).__name__}")
    if not 1 <= mask_length <= MAX_SIZE:
        raise ValueError(f"mask_length must lie in [1, {MAX_SIZE}], got {mask_length}")
    mask_prob_adjust = _check_real("mask_prob_adjust", mask_prob_adjust)
    # An adjustment, not a ratio of its own: upstream adds it to the keep ratio 1 - mask_prob (EAT: 0.07). Outside
    # [0, 1] it is a mistake, and a huge one asks for more block centres than there are cells: every kernel loops
    # over the centres (1e12 ran for hours).
    if not 0.0 <= mask_prob_adjust <= 1.0:
        raise ValueError(f"mask_prob_adjust must lie in [0, 1], got {mask_prob_adjust}")
    n_centers, keep = ref.mask_counts((H, W), mask_prob, int(mask_length), mask_prob_adjust)
    if n_centers > L:
        raise ValueError(
            f"mask_prob_adjust={mask_prob_adjust} with mask_prob={mask_prob} and mask_length={mask_length} asks for "
            f"{n_centers} block centres a row, more than the {L} cells of the grid"
        )
    if not 1 <= keep <= L - 1:
        raise ValueError(
            f"mask_prob={mask_prob} with grid {H} x {W} keeps {keep} of {L} tokens a row; need 1 <= kept <= {L - 1}"
        )
    _check_generator(generator)
    if seed is not None:
        if generator is not None:
            raise ValueError("give generator or seed, not both")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < _SEED_HIGH:
            raise ValueError(f"seed must be an int in [0, 2**63 - 1), got {seed!r}")
        seed = int(seed)
    device = _check_device(device)
    chosen = _backend.resolve("inverse_block_mask", backend, device)
    if seed is None:
        seed = int(torch.randint(_SEED_HIGH, (1,), dtype=torch.int64, generator=generator))
    return _inverse_block_mask_op(batch_size, clones, H, W, n_centers, int(mask_length), keep, seed, device, chosen)


def mask_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather and restore indices of a mask (``make_maskinfo``, ALGORITHM §3).

    Args:
        mask: (R, N) bool, integer or float (finite); nonzero = masked. Every row must keep the same count k.

    Returns:
        ``ids_keep`` (R, k) int64: the kept (zero) token indices of each row, ascending; ``ids_restore`` (R, N) int64:
        the inverse of the permutation ``[kept ascending, masked ascending]``, so
        ``torch.cat([kept_tokens, masked_tokens], 1).gather(1, ids_restore)`` restores the original token order.
        Validation costs one host sync (the kept counts decide k).
    """
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool, *INT_DTYPES, *FLOAT_DTYPES))
    check_finite("mask", mask)
    kept = (mask == 0).sum(dim=1)
    lo, hi = (int(v) for v in torch.stack([kept.min(), kept.max()]).tolist()) if mask.shape[0] else (0, 0)
    if lo != hi:
        raise ValueError(f"mask must keep the same number of tokens on every row, got kept counts from {lo} to {hi}")
    return ref.mask_indices(mask, lo)
