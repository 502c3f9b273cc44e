"""eat_features backends against the upstream loader's per-clip torchaudio fbank loop, in one run.

    python benchmarks/bench_fbank.py                    # CPU, 16 x 10 s clips, at 1 and 2 threads
    python benchmarks/bench_fbank.py --device cuda      # GPU, 96 x 10 s clips

The upstream loop is what each DataLoader worker does per clip (SPEC §1): ``x - x.mean()``, ``kaldi.fbank``, pad to
1024 frames, normalise. Every backend computes the same (B, 1, 1024, 128) output; the table reports the median time
per clip, the speed-up over the loop at the same thread count, and the max abs difference from the loop's output.
The Triton interpreter is never timed (it measures the interpreter, not the kernel).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, median_time, upstream_fbank_loop, write_section  # noqa: E402

from sslam_fast import _backend  # noqa: E402
from sslam_fast.ops import eat_features  # noqa: E402


def run_cpu(batch: int, repeats: int) -> list[str]:
    clips = torch.randn(batch, 160000, generator=torch.Generator().manual_seed(0)) * 0.1
    backends = [b for b in _backend.available_backends("fbank", "cpu") if b != "triton"]
    rows = ["| threads | path | ms / clip | speed-up vs loop | max abs diff |", "|---|---|---|---|---|"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        want = upstream_fbank_loop(clips)
        t_loop = median_time(lambda: upstream_fbank_loop(clips), repeats=repeats)
        rows.append(f"| {threads} | torchaudio per-clip loop | {1e3 * t_loop / batch:.3f} | 1.00x | 0 |")
        for b in backends:
            got = eat_features(clips, backend=b)
            t = median_time(lambda b=b: eat_features(clips, backend=b), repeats=repeats)
            err = float((got - want).abs().max())
            rows.append(f"| {threads} | eat_features[{b}] | {1e3 * t / batch:.3f} | {t_loop / t:.2f}x | {err:.1e} |")
    return rows


def run_cuda(batch: int, repeats: int) -> list[str]:
    clips = torch.randn(batch, 160000, device="cuda") * 0.1
    want = eat_features(clips.cpu(), backend="reference")
    rows = ["| path | ms per batch | max abs diff vs CPU reference |", "|---|---|---|"]
    for b in _backend.available_backends("fbank", "cuda"):
        got = eat_features(clips, backend=b)
        t = median_time(lambda b=b: eat_features(clips, backend=b), repeats=repeats, sync_cuda=True)
        rows.append(f"| eat_features[{b}] | {1e3 * t:.3f} | {float((got.cpu() - want).abs().max()):.1e} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="clips (default 16 on CPU, 96 on CUDA)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    batch = args.batch or (16 if args.device == "cpu" else 96)

    machine = machine_line()
    print(machine)
    rows = run_cpu(batch, args.repeats) if args.device == "cpu" else run_cuda(batch, args.repeats)
    print("\n".join(rows))
    if not args.no_write:
        cmd = "python benchmarks/bench_fbank.py" + (" --device cuda" if args.device == "cuda" else "")
        body = (f"## fbank: eat_features vs the upstream per-clip loop ({args.device}, {batch} x 10 s clips)\n\n"
                f"{machine}  \ncommand: `{cmd}`; median of {args.repeats} runs\n\n" + "\n".join(rows))
        write_section(f"bench_fbank_{args.device}", body)


if __name__ == "__main__":
    main()
