"""Shared benchmark helpers: the machine line, median timing (wall clock on CPU, CUDA events with an optional L2
flush on the GPU), the GPU's peak rates, and writing a section of RESULTS.md."""

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


# Five times the L2 of an H100 or H200 (50 MB), so writing it evicts every line an earlier call left there.
L2_FLUSH_BYTES = 256 * 2**20
_l2_flush_buffers: dict[int, torch.Tensor] = {}


def l2_flush() -> None:
    """Evict the current CUDA device's L2 cache: ``zero_()`` of a 256 MiB buffer (allocated once per device).

    Called before each timed call of a memory-bound op (outside its events), so that the op reads its inputs from HBM
    as it does in the training step, where the previous kernels have long overwritten L2; without it, an input of a
    few MiB stays in L2 from the previous repeat and the op looks faster than HBM allows.
    """
    dev = torch.cuda.current_device()
    buf = _l2_flush_buffers.get(dev)
    if buf is None:
        buf = _l2_flush_buffers[dev] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=f"cuda:{dev}")
    buf.zero_()


def cuda_median_time(fn, *, repeats: int = 20, warmup: int = 5, flush_l2: bool = False) -> float:
    """Median GPU time of ``fn()`` in seconds, between two CUDA events on the current stream around each call.

    The events time the stream, not the host: a host-side sync inside ``fn`` or a launch-bound ``fn`` (the GPU idle
    while Python launches the next kernel) still counts, as it does in training, but the host's time before the first
    launch of a call does not. All events are read after one final synchronize, so the timing itself adds no sync.
    With ``flush_l2`` the L2 flush runs before each call's start event (its time is not counted).
    """
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        if flush_l2:
            l2_flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3  # elapsed_time is in ms


def cuda_time_once(fn) -> float:
    """GPU time of one ``fn()`` in seconds between CUDA events, starting from an idle device (for steps timed one by
    one, such as the interleaved training steps of bench_train)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


# Peak HBM bandwidth (bytes/s) by device name, most specific first: the denominator of "share of HBM bandwidth".
_HBM_PEAKS = (("H200", "H200", 4.8e12), ("H100 NVL", "H100 NVL", 3.9e12), ("H100 PCIe", "H100 PCIe", 2.0e12),
              ("H100", "H100 SXM", 3.35e12))


def hbm_peak(name: str | None = None) -> tuple[float, str]:
    """(peak HBM bytes/s, label) of the CUDA device ``name`` (default: the current one); an unknown device gets the
    H100 SXM figure and a label that says so, rather than no figure."""
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for key, label, peak in _HBM_PEAKS:
        if key in name:
            return peak, f"{label} {peak / 1e12:.2f} TB/s"
    return 3.35e12, "H100 SXM 3.35 TB/s (assumed)"


def upstream_fbank_loop(clips: torch.Tensor, target_length: int = 1024) -> torch.Tensor:
    """What each upstream DataLoader worker does per clip (ALGORITHM §1), clip by clip: (B, 1, target_length, 128) fp32.

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
