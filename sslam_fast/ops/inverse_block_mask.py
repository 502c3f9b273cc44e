"""Inverse block masks as a dispatching custom op (ALGORITHM §3).

``inverse_block_mask`` draws the EAT/SSLAM pre-training masks of a whole batch: (batch_size * clones, H*W) bool,
True = masked, with exactly the distribution of upstream ``compute_block_mask_2d`` (``inverse_mask=True``,
``require_same_masks=True``): a union of random clamped mask_length x mask_length blocks marks the kept (visible)
tokens, then each row is fixed up to exactly ``keep`` kept tokens.

Backends: ``reference`` (the upstream loop, plain PyTorch on the CPU generator; any device, copied there after), ``cpp``
(csrc/inverse_block_mask.cpp, CPU, all rows at once in parallel) and ``triton`` (kernels/inverse_block_mask.py; CUDA,
or CPU under ``TRITON_INTERPRET=1``). The random stream: the public function draws one 64-bit seed from ``generator``
with ``torch.randint``; every backend is a pure function of that seed (the reference seeds a private
``torch.Generator`` with it), so the custom op is deterministic in its arguments. Backends give different bits for a
seed, with the same distribution.

The op takes no tensor: ``torch.ops.sslam_fast.inverse_block_mask(batch_size, clones, H, W, n_centers, mask_length,
keep, seed, device, backend)``; ``keep = -1`` returns the union of blocks before the fix-up (a test diagnostic).
"""

from __future__ import annotations

import torch

from sslam_fast import _backend
from sslam_fast._checks import (
    MAX_ELEMENTS,
    MAX_SIZE,
    check_device,
    check_elements,
    check_generator,
    check_positive_int,
    check_real,
    is_int,
)
from sslam_fast.reference import inverse_block_mask as ref

__all__ = ["inverse_block_mask"]

_SEED_HIGH = 2**63 - 1  # seeds are drawn uniformly from [0, 2^63 - 1)


def _validate(batch_size, clones, H, W, n_centers, mask_length, keep, seed, device) -> None:
    """The int arguments of the custom op, in the ranges the kernels handle (ValueError naming the argument). The op is
    callable directly (``torch.ops.sslam_fast.inverse_block_mask``) and its kernels loop over n_centers and allocate
    from these ints, so they are checked there too; every product below is exact (Python ints), so nothing wraps
    before the C++ op's own checks (csrc/inverse_block_mask.cpp)."""
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


def _fake(batch_size, clones, H, W, n_centers, mask_length, keep, seed, device, backend):
    return torch.empty((batch_size * clones, H * W), dtype=torch.bool, device=device)


# The compiled kernel takes the row count (rows = batch_size * clones) and returns a CPU tensor; the launcher of the
# Triton kernel takes the row count too.
_compiled = _backend.compiled("inverse_block_mask")
_triton = _backend.triton_kernel("inverse_block_mask", "inverse_block_mask_triton")


def _cpp_kernel(batch_size, clones, H, W, n_centers, mask_length, keep, seed, device):
    return _compiled(batch_size * clones, H, W, n_centers, mask_length, keep, seed)


def _triton_kernel(batch_size, clones, H, W, n_centers, mask_length, keep, seed, device):
    return _triton(batch_size * clones, H, W, n_centers, mask_length, keep, seed, device)


_op = _backend.define_op(
    "inverse_block_mask",
    "(int batch_size, int clones, int H, int W, int n_centers, int mask_length, int keep, int seed, Device device) "
    "-> Tensor",
    fake=_fake,
    kernels={"reference": ref.inverse_block_mask_from_seed, "cpp": _cpp_kernel, "triton": _triton_kernel},
    checks={"cpp": _backend.compiled_available("inverse_block_mask")},
    validate=_validate,
)

if _backend.extension_has("inverse_block_mask"):  # its schema is not the op's: (rows, H, W, ...) -> a CPU tensor

    @torch.library.register_fake("sslam_fast_C::inverse_block_mask")
    def _(rows, H, W, n_centers, mask_length, keep, seed):
        return torch.empty((rows, H * W), dtype=torch.bool)


def _check_grid(grid) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be a pair (H, W) of ints, got {grid!r}")
    H, W = grid
    if not (is_int(H) and is_int(W)):
        raise TypeError(f"grid must hold ints, got ({type(H).__name__}, {type(W).__name__})")
    if H <= 0 or W <= 0:
        raise ValueError(f"grid must hold positive sizes, got {tuple(grid)}")
    # The kernels list a row's tokens as int32 and draw them with a 32-bit bound (the triton one takes far fewer).
    if H * W > MAX_SIZE:
        raise ValueError(f"grid {H} x {W} has {H * W} cells; at most {MAX_SIZE} (2**31 - 1) are supported")
    return int(H), int(W)


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
    mask_prob = check_real("mask_prob", mask_prob)
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must lie strictly between 0 and 1, got {mask_prob}")
    if not is_int(mask_length):
        raise TypeError(f"mask_length must be an int, got {type(mask_length).__name__}")
    if not 1 <= mask_length <= MAX_SIZE:
        raise ValueError(f"mask_length must lie in [1, {MAX_SIZE}], got {mask_length}")
    # An adjustment, not a ratio of its own: upstream adds it to the keep ratio 1 - mask_prob (EAT: 0.07). Outside
    # [0, 1] it is a mistake, and a huge one asks for more block centres than there are cells: every kernel loops
    # over the centres (1e12 ran for hours).
    mask_prob_adjust = check_real("mask_prob_adjust", mask_prob_adjust, minimum=0, maximum=1)
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
    check_generator(generator, "cpu")  # upstream draws on the CPU
    if seed is not None:
        if generator is not None:
            raise ValueError("give generator or seed, not both")
        if not is_int(seed) or not 0 <= seed < _SEED_HIGH:
            raise ValueError(f"seed must be an int in [0, 2**63 - 1), got {seed!r}")
        seed = int(seed)
    device = check_device(device)
    chosen = _backend.resolve("inverse_block_mask", backend, device)
    if seed is None:
        seed = int(torch.randint(_SEED_HIGH, (1,), dtype=torch.int64, generator=generator))
    return _op(batch_size, clones, H, W, n_centers, int(mask_length), keep, seed, device, chosen)

