"""eat_features backends against the upstream loader's per-clip torchaudio fbank loop, in one run.

    python benchmarks/bench_fbank.py                    # CPU, 16 x 10 s clips, at 1 and 2 threads
    python benchmarks/bench_fbank.py --device cuda      # GPU, 96 x 10 s clips

The upstream loop is what each DataLoader worker does per clip (ALGORITHM §1): ``x - x.mean()``, ``kaldi.fbank``, pad to
1024 frames, normalise. Every backend computes the same (B, 1, 1024, 128) output; the table reports the median time
per clip, the speed-up over the loop at the same thread count, and the max abs difference from the loop's output.
The Triton interpreter is never timed (it measures the interpreter, not the kernel).

On CUDA each backend is timed with CUDA events (``common.cuda_median_time``), with L2 flushed before each call
(``common.l2_flush``, outside the events): in training the waveforms arrive from the host or from earlier kernels,
never from a warm L2. The table adds achieved GB/s and its share of the device's HBM bandwidth
(``common.hbm_peak``), counting only the bytes that must cross HBM: the fp32 waveforms read once (B x 160000 x 4) and
the fp32 features written once (B x 1024 x 128 x 4). The 2.5-fold re-read of each sample by overlapping 400-sample
frames at a 160-sample shift, the spectra and the mel projection live in L2 / shared memory in a fused kernel and are
not counted; a backend that does write them to HBM shows a lower share. For scale, the first line is what upstream
pays instead: the per-clip loop on the CPU at 1 thread, as in one DataLoader worker (on ``--cpu-clips`` clips).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cuda_median_time,
    hbm_peak,
    machine_line,
    median_time,
    upstream_fbank_loop,
    write_section,
)

from sslam_fast import _backend  # noqa: E402
from sslam_fast.ops import eat_features  # noqa: E402


def run_cpu(batch: int, repeats: int) -> list[str]:
    clips = torch.randn(batch, 160000, generator=torch.Generator().manual_seed(0)) * 0.1
    backends = [b for b in _backend.available_backends("eat_features", "cpu") if b != "triton"]
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


def run_cuda(batch: int, repeats: int, cpu_clips: int) -> list[str]:
    clips = torch.randn(batch, 160000, device="cuda") * 0.1
    want = eat_features(clips.cpu(), backend="reference")
    peak, peak_label = hbm_peak()
    # compulsory HBM traffic (see the docstring): fp32 waveforms in, fp32 (B, 1, 1024, 128) features out
    hbm_bytes = clips.numel() * clips.element_size() + batch * 1024 * 128 * 4
    rows = ["| path | ms per batch | us per clip | GB/s | share of HBM "
            f"({peak_label}) | max abs diff vs CPU reference |", "|---|---|---|---|---|---|"]
    if cpu_clips > 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a DataLoader worker runs torch with one thread
        try:
            sub = clips[:cpu_clips].cpu()
            t = median_time(lambda: upstream_fbank_loop(sub), repeats=3, warmup=1)
        finally:
            torch.set_num_threads(threads)
        rows.append(f"| torchaudio per-clip loop, CPU, 1 thread (upstream's worker) | - | {1e6 * t / len(sub):.1f} | "
                    f"- | - | - |")
    for b in _backend.available_backends("eat_features", "cuda"):
        got = eat_features(clips, backend=b)
        t = cuda_median_time(lambda b=b: eat_features(clips, backend=b), repeats=repeats, warmup=3, flush_l2=True)
        rows.append(f"| eat_features[{b}] | {1e3 * t:.3f} | {1e6 * t / batch:.2f} | {hbm_bytes / t / 1e9:.0f} | "
                    f"{100 * hbm_bytes / t / peak:.0f}% | {float((got.cpu() - want).abs().max()):.1e} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="clips (default 16 on CPU, 96 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per path (default 7 on CPU, 20 on CUDA)")
    parser.add_argument("--cpu-clips", type=int, default=16,
                        help="CUDA: clips for the CPU per-clip loop line (0: leave it out)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--plot", action="store_true",
                        help="also chart the speed-ups: benchmarks/charts/bench_fbank_<device>.png (matplotlib)")
    args = parser.parse_args(argv)
    batch = args.batch or (16 if args.device == "cpu" else 96)
    if args.repeats is None:
        args.repeats = 7 if args.device == "cpu" else 20
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    machine = machine_line()
    print(machine)
    rows = run_cpu(batch, args.repeats) if args.device == "cpu" else run_cuda(batch, args.repeats, args.cpu_clips)
    print("\n".join(rows))
    cmd = "python benchmarks/bench_fbank.py" + (" --device cuda" if args.device == "cuda" else "")
    body = (f"## fbank: eat_features vs the upstream per-clip loop ({args.device}, {batch} x 10 s clips)\n\n"
            f"{machine}  \ncommand: `{cmd}`; median of {args.repeats} runs"
            + ("; CUDA events, L2 flushed before each call" if args.device == "cuda" else "")
            + "\n\n" + "\n".join(rows))
    section = f"bench_fbank_{args.device}"
    if args.plot:
        import plots  # imports matplotlib when it draws

        body = plots.chart_section(section, body, publish=not args.no_write)
    if not args.no_write:
        write_section(section, body)


if __name__ == "__main__":
    main()
