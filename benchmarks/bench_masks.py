"""inverse_block_mask backends against upstream's own mask code, at the EAT batch shape.

    python benchmarks/bench_masks.py                    # CPU: batch 12 x 16 clones, grid 64 x 8, 1 thread and default
    python benchmarks/bench_masks.py --device cuda      # GPU: the triton kernel (and the batched torch formulation)

The baseline is what upstream's data pipeline runs (ALGORITHM §3): ``MaeImageDataset.__getitem__`` calls
``compute_block_mask_2d`` once per clip with shape (clones, H*W) (``inverse_mask=True, require_same_masks=True``,
``img_shape=(64, 8)``), which draws the blocks of all the clip's rows at once with a few tensor ops, then fixes each
row up to the exact kept count with one ``torch.multinomial`` per row; the collater concatenates the clips.
:func:`upstream_block_mask_2d` re-implements that function with the same tensor ops in the same order, on the default
CPU generator, and the baseline row times ``batch`` such calls plus the ``torch.cat``. Upstream's random stream is not
reproducible (the generator state of each DataLoader worker), so the benchmark checks the distribution instead: the
baseline and the C++ kernel must both keep exactly ``keep`` tokens on every row (the same masked fraction) and have the
same kept frequency per time row and per frequency column (within 5 standard errors, over 4096 rows each).

Secondary rows: the plain reference (``backend="reference"``: ``sslam_fast.reference.inverse_block_mask``, the same
algorithm on a private generator seeded by the op), the batched torch formulation (no Python loop over rows) and the
C++ kernel called directly (``torch.ops.sslam_fast_C.inverse_block_mask``, without the public function's checks, seed
draw and custom-op dispatch), which shows how much of the public call is the kernel.

CPU timings are wall-clock medians (``common.median_time``) at 1 thread and at the default thread count, measured in
interleaved rounds so that a load change on a shared machine hits every path alike; the speed-up is per row against
the upstream baseline at the same thread count. The 1-minute load average before and after is printed with the table.
The Triton interpreter is never timed (it measures the interpreter, not the kernel).

On CUDA each path is timed with CUDA events (``common.cuda_median_time``), median of ``--repeats`` calls. L2 is not
flushed: the op reads no tensor input (it draws from a generator) and writes a 96 KiB mask, so nothing it touches
comes from HBM, and the time is launch and latency, not bandwidth; no GB/s is reported for the same reason. The
upstream baseline is given beside it as what a CPU DataLoader worker spends per batch (1 thread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_median_time, machine_line, median_time, write_section  # noqa: E402

from sslam_fast import _backend  # noqa: E402
from sslam_fast.ops import inverse_block_mask  # noqa: E402
from sslam_fast.reference import inverse_block_mask as ref  # noqa: E402

GRID = (64, 8)
MASK_PROB, MASK_LENGTH, MASK_PROB_ADJUST = 0.8, 5, 0.07
BASELINE = "upstream compute_block_mask_2d (one call per clip)"


def upstream_block_mask_2d(
    clones: int,
    grid: tuple[int, int] = GRID,
    mask_prob: float = MASK_PROB,
    mask_length: int = MASK_LENGTH,
    mask_prob_adjust: float = MASK_PROB_ADJUST,
) -> torch.Tensor:
    """One call of upstream ``compute_block_mask_2d((clones, H*W), mask_prob, mask_length, mask_prob_adjust,
    inverse_mask=True, require_same_masks=True, img_shape=grid)`` (fairseq/data/data_utils.py, EAT's
    utils/data_utils.py): (clones, H*W) float32, 1 = masked, on the default CPU generator.

    The same tensor ops as upstream: a zero (clones, H, W) map, one ``randint`` of all centres, ``scatter_`` and
    ``nonzero`` to list them, the mask_length**2 shifted copies of the centre coordinates concatenated and clamped to
    the grid, one index assignment, then per row one ``multinomial`` without replacement to drop or add tokens until
    exactly ``int(L * (1 - mask_prob))`` are kept, and ``1 - mask``.
    """
    H, W = grid
    L = H * W
    p_keep = 1 - mask_prob  # inverse_mask: the blocks mark the kept tokens
    kept = torch.zeros((clones, H, W))
    n_centres = int(L * ((p_keep + mask_prob_adjust) / mask_length**2))
    centre_ids = torch.randint(0, L, size=(clones, n_centres))
    kept.view(clones, -1).scatter_(1, centre_ids, 1)
    rows, ts, fs = kept.nonzero(as_tuple=True)
    o = mask_length // 2
    shifts = [(di - o, dj - o) for di in range(mask_length) for dj in range(mask_length)]
    row_idx = torch.cat([rows for _ in shifts])
    t_idx = torch.cat([ts + di for di, _ in shifts]).clamp_(min=0, max=H - 1)
    f_idx = torch.cat([fs + dj for _, dj in shifts]).clamp_(min=0, max=W - 1)
    kept[(row_idx, t_idx, f_idx)] = 1
    kept = kept.reshape(clones, -1)
    want = int(L * p_keep)
    counts = kept.sum(dim=-1)
    for k in range(clones):
        n, row = counts[k], kept[k]
        if n > want:
            row[torch.multinomial(row, int(n - want), replacement=False)] = 0
        elif n < want:
            row[torch.multinomial(1 - row, int(want - n), replacement=False)] = 1
    return 1 - kept


def upstream_batch(batch: int, clones: int) -> torch.Tensor:
    """What the upstream pipeline produces per batch: one call per clip (each DataLoader item), concatenated by the
    collater: (batch * clones, H*W) float32, 1 = masked."""
    return torch.cat([upstream_block_mask_2d(clones) for _ in range(batch)])


def check_same_statistics(clones: int, n_clips: int = 256) -> str:
    """Asserts that the upstream baseline and the C++ kernel (or the reference when it is absent) draw masks with the
    same statistics; returns a one-line summary. Both keep exactly ``keep`` tokens a row (so the masked fraction is
    the same number), and their kept frequency per time row (H values) and per frequency column (W values) agree
    within 5 standard errors of the difference (per-row values are the independent samples)."""
    _, keep = ref.mask_counts(GRID, MASK_PROB, MASK_LENGTH, MASK_PROB_ADJUST)
    H, W = GRID
    L = H * W
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        up_kept = upstream_batch(n_clips, clones) == 0
    backend = "cpp" if "cpp" in _backend.available_backends("inverse_block_mask", "cpu") else "reference"
    ours_kept = ~inverse_block_mask(n_clips, clones, generator=torch.Generator().manual_seed(1), backend=backend)
    for name, kept in (("upstream", up_kept), (backend, ours_kept)):
        counts = kept.sum(1)
        assert bool((counts == keep).all()), f"{name}: kept counts {counts.min()}..{counts.max()}, want {keep}"
    up_frac = 1 - up_kept.double().mean().item()
    ours_frac = 1 - ours_kept.double().mean().item()
    assert up_frac == ours_frac == (L - keep) / L, (up_frac, ours_frac)
    worst = 0.0
    for dim in (2, 1):  # (R, H, W): mean over the columns -> per time row; over the time rows -> per column
        a = up_kept.view(-1, H, W).double().mean(dim)
        b = ours_kept.view(-1, H, W).double().mean(dim)
        se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt().clamp(min=1e-12)
        worst = max(worst, ((a.mean(0) - b.mean(0)).abs() / se).max().item())
    assert worst < 5.0, f"upstream and {backend} kept frequencies differ by {worst:.1f} standard errors"
    return (f"statistics: upstream and {backend}, {n_clips * clones} rows each: exactly {keep} kept per row (masked "
            f"fraction {up_frac:.5f} both); kept frequency per time row and per frequency column agree, max "
            f"{worst:.1f} standard errors")


def paths(batch: int, clones: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    n_centers, keep = ref.mask_counts(GRID, MASK_PROB, MASK_LENGTH, MASK_PROB_ADJUST)
    out = {}
    if device == "cpu":
        out[BASELINE] = lambda: upstream_batch(batch, clones)
        out["plain reference (backend='reference')"] = lambda: inverse_block_mask(
            batch, clones, generator=g, backend="reference"
        )
    for b in _backend.available_backends("inverse_block_mask", device):
        if b != "reference" and not (b == "triton" and device == "cpu"):
            out[f"inverse_block_mask[{b}]"] = (
                lambda b=b: inverse_block_mask(batch, clones, generator=g, backend=b, device=device)
            )
    if device == "cpu" and _backend.extension_has("inverse_block_mask"):
        kernel = torch.ops.sslam_fast_C.inverse_block_mask
        out["C++ kernel alone (torch.ops.sslam_fast_C)"] = lambda: kernel(
            batch * clones, GRID[0], GRID[1], n_centers, MASK_LENGTH, keep, 12345
        )
    out["batched torch (topk of block + noise)"] = lambda: ref.inverse_block_mask_batched(
        batch * clones, GRID, n_centers, MASK_LENGTH, keep, generator=None if device == "cuda" else g, device=device
    )
    return out


def interleaved_medians(fns: dict, rounds: int, per_round: int) -> dict:
    """Median time of each callable, measured in interleaved rounds (``median_time`` of ``per_round`` calls each,
    then the median over rounds), so that a load change on a shared machine hits every path alike."""
    per = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(median_time(fn, repeats=per_round, warmup=0))
    return {name: statistics.median(ts) for name, ts in per.items()}


def run_cpu(batch: int, clones: int, repeats: int, large_batch: int) -> list[str]:
    """Median times at 1 thread and at the default thread count; the cpp backend also at ``large_batch`` clips, where
    it splits the rows over threads (below 1024 rows it runs on the calling thread, see csrc/inverse_block_mask.cpp)."""
    rows = ["| threads | rows | path | ms / call | us / row | speed-up vs upstream (per row) |", "|---" * 6 + "|"]
    default_threads = torch.get_num_threads()
    g_large = torch.Generator().manual_seed(1)
    try:
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            fns = paths(batch, clones, "cpu")
            sizes = dict.fromkeys(fns, batch * clones)
            if "inverse_block_mask[cpp]" in fns:
                name = "inverse_block_mask[cpp] "  # trailing space: a distinct key for the large batch
                fns[name] = lambda: inverse_block_mask(large_batch, clones, generator=g_large, backend="cpp")
                sizes[name] = large_batch * clones
            times = interleaved_medians(fns, rounds=max(3, repeats // 10), per_round=5)
            base_per_row = times[BASELINE] / sizes[BASELINE]
            for name, t in times.items():
                n = sizes[name]
                rows.append(f"| {threads} | {n} | {name.strip()} | {1e3 * t:.3f} | {1e6 * t / n:.2f} | "
                            f"{base_per_row / (t / n):.1f}x |")
    finally:
        torch.set_num_threads(default_threads)
    return rows


def run_cuda(batch: int, clones: int, repeats: int) -> list[str]:
    rows = ["| path | ms / batch | us / row |", "|---|---|---|"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs torch with one thread
    try:
        t = median_time(lambda: upstream_batch(batch, clones), repeats=5, warmup=1)
    finally:
        torch.set_num_threads(threads)
    rows.append(f"| {BASELINE}, CPU, 1 thread (upstream's worker) | {1e3 * t:.4f} | {1e6 * t / (batch * clones):.3f} |")
    for name, fn in paths(batch, clones, "cuda").items():
        t = cuda_median_time(fn, repeats=repeats, warmup=5)
        rows.append(f"| {name} | {1e3 * t:.4f} | {1e6 * t / (batch * clones):.3f} |")
    return rows


def load_line(before: float, after: float) -> str:
    return f"load average (1 min) before / after: {before:.2f} / {after:.2f} on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--clones", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=101, help="CPU: repeats // 10 interleaved rounds of 5 calls")
    ap.add_argument("--large-batch", type=int, default=96, help="clips for the multi-threaded cpp line (CPU)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--plot", action="store_true",
                    help="also chart the speed-ups: benchmarks/charts/bench_masks_<device>.png (matplotlib)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    head = machine_line()
    print(head)
    stats = check_same_statistics(args.clones)
    print(stats)
    load_before = os.getloadavg()[0]
    if args.device == "cuda":
        table = run_cuda(args.batch, args.clones, args.repeats)
    else:
        table = run_cpu(args.batch, args.clones, args.repeats, args.large_batch)
    load = load_line(load_before, os.getloadavg()[0])
    _, keep = ref.mask_counts(GRID, MASK_PROB, MASK_LENGTH, MASK_PROB_ADJUST)
    title = (f"inverse_block_mask, batch {args.batch} x {args.clones} clones = {args.batch * args.clones} rows, "
             f"grid {GRID[0]} x {GRID[1]}, {keep} kept / row, device {args.device}")
    if args.device == "cuda":
        timing = f"CUDA events, median of {args.repeats} calls after 5 warm-up calls (no L2 flush: no input)"
    else:
        timing = (f"wall clock, median of {max(3, args.repeats // 10)} interleaved rounds of the median of 5 calls, "
                  f"at 1 thread and the default {torch.get_num_threads()}")
    command = " ".join(["python", "benchmarks/bench_masks.py", *sys.argv[1:]])
    meta = [head, f"command: `{command}`; timing: {timing}", load, stats]
    body = "\n".join([f"### {title}", "", "  \n".join(meta), "", *table])
    print(body)
    if args.plot:
        import plots  # imports matplotlib when it draws

        body = plots.chart_section(f"bench_masks_{args.device}", body, publish=not args.no_write)
    if not args.no_write:
        write_section(f"bench_masks_{args.device}", body)


if __name__ == "__main__":
    main()
