"""Shared benchmark helpers: the machine line, median timing, and writing a section of RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "uncommitted"
    except OSError:
        return "unknown"


def machine_line() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"triton {triton_version}, commit {commit()}, {datetime.date.today().isoformat()}")


def median_time(fn, *, repeats: int = 7, warmup: int = 2, sync_cuda: bool = False) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def upstream_fbank_loop(clips: torch.Tensor, target_length: int = 1024) -> torch.Tensor:
    """What each upstream DataLoader worker does per clip (SPEC §1), clip by clip: (B, 1, target_length, 128) fp32.

    int16 clips are read as soundfile reads 16-bit PCM (x / 32768); then ``x - x.mean()``, ``kaldi.fbank`` with EAT's
    arguments, zero pad or crop to ``target_length`` frames, ``(fbank + 4.268) / (2 * 4.569)``.
    """
    import torchaudio.compliance.kaldi as kaldi

    out = []
    for clip in clips:
        x = clip.float() / 32768.0 if clip.dtype == torch.int16 else clip
        x = x - x.mean()
        fb = kaldi.fbank(x[None], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                         num_mel_bins=128, dither=0.0, frame_shift=10)
        n = fb.shape[0]
        fb = torch.nn.functional.pad(fb, (0, 0, 0, target_length - n)) if n < target_length else fb[:target_length]
        out.append(((fb + 4.268) / (4.569 * 2))[None])
    return torch.stack(out)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in RESULTS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
