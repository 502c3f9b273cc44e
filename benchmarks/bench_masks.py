"""inverse_block_mask backends against the per-row reference (the upstream loop), at the EAT batch shape.

    python benchmarks/bench_masks.py                    # CPU: batch 12 x 16 clones, grid 64 x 8, at 1 and 2 threads
    python benchmarks/bench_masks.py --device cuda      # GPU: the triton kernel (and the batched torch formulation)

The reference is what upstream's DataLoader workers do per clip (ALGORITHM §3): one ``compute_block_mask_2d`` call per
clip
with a Python loop over its rows and a ``torch.multinomial`` fix-up per row. Every path draws the same distribution
(tests/test_masks.py); the table reports the median time per batch of 192 rows and the speed-up over the reference at
the same thread count. The Triton interpreter is never timed (it measures the interpreter, not the kernel).

On CUDA each path is timed with CUDA events (``common.cuda_median_time``), median of ``--repeats`` calls. L2 is not
flushed: the op reads no tensor input (it draws from a generator) and writes a 96 KiB mask, so nothing it touches
comes from HBM, and the time is launch and latency, not bandwidth; no GB/s is reported for the same reason.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_median_time, machine_line, median_time, write_section  # noqa: E402

from sslam_fast import _backend  # noqa: E402
from sslam_fast.ops import masks as ops  # noqa: E402
from sslam_fast.reference import masks as ref  # noqa: E402

GRID = (64, 8)


def paths(batch: int, clones: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    n_centers, keep = ref.mask_counts(GRID, 0.8, 5, 0.07)
    out = {}
    if device == "cpu":
        out["reference (per-row loop)"] = lambda: ops.inverse_block_mask(
            batch, clones, generator=g, backend="reference"
        )
    for b in _backend.available_backends("inverse_block_mask", device):
        if b != "reference" and not (b == "triton" and device == "cpu"):
            out[f"inverse_block_mask[{b}]"] = (
                lambda b=b: ops.inverse_block_mask(batch, clones, generator=g, backend=b, device=device)
            )
    out["batched torch (topk of block + noise)"] = lambda: ref.inverse_block_mask_batched(
        batch * clones, GRID, n_centers, 5, keep, generator=None if device == "cuda" else g, device=device
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
    """Median times at 1 and 2 threads; the cpp backend also at ``large_batch`` clips, where it splits the rows
    over threads (below 256 rows it runs on the calling thread, see csrc/masks.cpp)."""
    rows = ["| threads | rows | path | ms / call | us / row | speed-up vs reference (per row) |", "|---" * 6 + "|"]
    threads_before = torch.get_num_threads()
    g_large = torch.Generator().manual_seed(1)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        fns = paths(batch, clones, "cpu")
        sizes = dict.fromkeys(fns, batch * clones)
        if "inverse_block_mask[cpp]" in fns:
            name = "inverse_block_mask[cpp] "  # trailing space: a distinct key for the large batch
            fns[name] = lambda: ops.inverse_block_mask(large_batch, clones, generator=g_large, backend="cpp")
            sizes[name] = large_batch * clones
        times = interleaved_medians(fns, rounds=max(3, repeats // 10), per_round=5)
        ref_name = next(iter(fns))
        ref_per_row = times[ref_name] / sizes[ref_name]
        for name, t in times.items():
            n = sizes[name]
            rows.append(f"| {threads} | {n} | {name.strip()} | {1e3 * t:.3f} | {1e6 * t / n:.2f} | "
                        f"{ref_per_row / (t / n):.1f}x |")
    torch.set_num_threads(threads_before)
    return rows


def run_cuda(batch: int, clones: int, repeats: int) -> list[str]:
    rows = ["| path | ms / batch | us / row |", "|---|---|---|"]
    for name, fn in paths(batch, clones, "cuda").items():
        t = cuda_median_time(fn, repeats=repeats, warmup=5)
        rows.append(f"| {name} | {1e3 * t:.4f} | {1e6 * t / (batch * clones):.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--clones", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=101, help="CPU: repeats // 10 interleaved rounds of 5 calls")
    ap.add_argument("--large-batch", type=int, default=96, help="clips for the multi-threaded cpp line (CPU)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    head = machine_line()
    print(head)
    if args.device == "cuda":
        table = run_cuda(args.batch, args.clones, args.repeats)
    else:
        table = run_cpu(args.batch, args.clones, args.repeats, args.large_batch)
    title = (f"inverse_block_mask, batch {args.batch} x {args.clones} clones = {args.batch * args.clones} rows, "
             f"grid {GRID[0]} x {GRID[1]}, 102 kept / row, device {args.device}")
    if args.device == "cuda":
        head += f"  \ntiming: CUDA events, median of {args.repeats} calls after 5 warm-up calls (no L2 flush: no input)"
    body = "\n".join([f"### {title}", "", head, "", *table])
    print(body)
    if not args.no_write:
        write_section(f"bench_masks_{args.device}", body)


if __name__ == "__main__":
    main()
