"""Every op against its plain reference and ``torch.compile(reference)``: median time and peak memory, fwd and fwd+bwd.

    python benchmarks/bench_ops.py                        # CPU, scaled-down SSLAM shapes, writes RESULTS.md
    python benchmarks/bench_ops.py --quick --no-write     # CPU smoke run: 3 repeats, one attention shape, no compile
    python benchmarks/bench_ops.py --device cuda          # GPU, the real SSLAM shapes, every CUDA backend + roofline
    python benchmarks/bench_ops.py --device cuda --dry-run  # build the CUDA cases on the meta device, time nothing

Paths per op: ``reference`` (the plain-PyTorch oracle in ``sslam_fast/reference``), ``compile(reference)`` (default
inductor; a failure is reported with its exception type), and the public op with ``backend="auto"`` (CPU: cpp or
reference; SDPA for attention) or, on CUDA, with every available non-reference backend by name (a backend that is
not available here, e.g. triton not installed, the extension not built, is left out). A failure of the reference or
of an op raises. The Triton interpreter is never timed. ``fwd`` runs under ``no_grad``; ``fwd+bwd`` runs the forward
with grad-requiring inputs and ``backward`` of a fixed upstream gradient (ops without gradients show "-").

Peak memory is the peak of bytes allocated above the level at the start of the call: on CUDA
``max_memory_allocated() - memory_allocated()`` after ``reset_peak_memory_stats``; on CPU the running sum of the
allocator's ``[memory]`` events recorded by ``torch.profiler`` (``profile_memory=True``), taken in time order. Both
count the outputs and gradients the call creates, not the inputs it was given.

Timing: on CPU the median wall time of ``repeats`` calls; on CUDA the median time between CUDA events around each
call (``common.cuda_median_time``), and for the memory-bound ops (those reported in GB/s) L2 is flushed before each
timed call (``common.l2_flush``: ``zero_()`` of a 256 MiB buffer, outside the events), so that their inputs come from
HBM as they do inside a training step.

On CUDA the table also gives achieved GB/s (memory-bound ops) or TFLOP/s (attention: 4 B H L^2 d forward, 2.5x that
backward; decoder block: the grouped 3x3 conv, 2 R C (C / groups) 9 H W forward, 2x that backward), and the share of
the roofline: the device's HBM bandwidth (``common.hbm_peak``: 3.35 TB/s on an H100 SXM, 4.8 on an H200) or 989
TFLOP/s dense bf16 (H100 and H200 alike).

Byte-counting rule for GB/s and the share of HBM bandwidth: only the bytes that must cross HBM count, i.e. every input
read once plus every output written once (for fwd+bwd: the forward's, plus the backward's own inputs -- upstream
gradient, saved or recomputed-from tensors -- read once and its gradients written once). Re-reads of data that lives
in L2 or shared memory within one call are not counted: a partner row read twice by ``partial_max_mix``, the two
passes of a normalisation over a row, the same token gathered by several clones. Gathers count their whole source
(an upper bound: ``clone_gather`` with 8 clones of 102 of 512 tokens touches about 83 % of it). A figure above the
roofline therefore means the counting is wrong, not that the op beat HBM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_median_time, hbm_peak, machine_line, median_time, write_section  # noqa: E402

from sslam_fast import _backend, ops  # noqa: E402
from sslam_fast.reference.attention import attention as ref_attention  # noqa: E402
from sslam_fast.reference.clone_gather import clone_gather as ref_clone_gather  # noqa: E402
from sslam_fast.reference.decoder_block import decoder_block as ref_decoder_block  # noqa: E402
from sslam_fast.reference.decoder_scatter import decoder_scatter as ref_decoder_scatter  # noqa: E402
from sslam_fast.reference.decoder_scatter import mask_noise as ref_mask_noise  # noqa: E402
from sslam_fast.reference.ema import ema_update_ as ref_ema_update_  # noqa: E402
from sslam_fast.reference.gelu_mlp import gelu_mlp as ref_gelu_mlp  # noqa: E402
from sslam_fast.reference.inverse_block_mask import inverse_block_mask as ref_inverse_block_mask  # noqa: E402
from sslam_fast.reference.layer_targets import layer_targets as ref_layer_targets  # noqa: E402
from sslam_fast.reference.mask_indices import mask_indices as ref_mask_indices  # noqa: E402
from sslam_fast.reference.masked_mse import masked_mse as ref_masked_mse  # noqa: E402
from sslam_fast.reference.mix_waveforms import mix_waveforms as ref_mix_waveforms  # noqa: E402
from sslam_fast.reference.partial_max_mix import partial_max_mix as ref_partial_max_mix  # noqa: E402

BF16_FLOP_S = 989e12  # H100 / H200 SXM dense bf16 (HBM bandwidth differs: common.hbm_peak)
MASK_NOISE_STD = 0.01
KEEP_OF_512 = 102  # SSLAM: int(512 * (1 - 0.8)) visible tokens per row

ALL_OPS = ("clone_gather", "decoder_scatter", "attention", "ema_update_", "layer_targets", "decoder_block",
           "masked_mse", "gelu_mlp", "partial_max_mix", "mix_waveforms", "masks")


@dataclass
class Case:
    """One op at one shape: tensor arguments, the reference, the public op and its cost model."""

    op: str
    shape: str
    args: list
    ref: Callable  # ref(*args)
    run: Callable  # run(backend, *args)
    registry: str | None  # name in sslam_fast._backend (None: no backend choice)
    grad_args: tuple[int, ...] = ()  # indices into args that get gradients in the fwd+bwd timing
    bytes_fwd: float = 0.0
    bytes_bwd: float = 0.0
    flops_fwd: float = 0.0  # > 0: report TFLOP/s instead of GB/s
    flops_bwd: float = 0.0
    extra: dict = field(default_factory=dict)


# --- input construction (works on the meta device for --dry-run) ------------------------------------------------------


class Maker:
    def __init__(self, device: str, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype, self.meta = device, dtype, device == "meta"
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=None, scale=1.0):
        dtype = dtype or self.dtype
        if self.meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        return (torch.randn(shape, generator=self.gen) * scale).to(self.device, dtype)

    def masks(self, rows: int, n: int, keep: int):
        """(mask (rows, n) bool True = masked, ids_keep (rows, keep) ascending, ids_restore (rows, n))."""
        if self.meta:
            e = lambda *s, dt: torch.empty(s, dtype=dt, device="meta")  # noqa: E731
            return e(rows, n, dt=torch.bool), e(rows, keep, dt=torch.int64), e(rows, n, dt=torch.int64)
        score = torch.rand(rows, n, generator=self.gen)
        order = score.argsort(dim=1)
        mask = torch.ones(rows, n, dtype=torch.bool).scatter_(1, order[:, :keep], False)
        ids_shuffle = mask.to(torch.int8).argsort(dim=1, stable=True)  # kept (ascending), then masked (ascending)
        ids_restore = ids_shuffle.argsort(dim=1)
        return mask.to(self.device), ids_shuffle[:, :keep].contiguous().to(self.device), ids_restore.to(self.device)


def _b(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def build_cases(device: str, quick: bool, dtype: torch.dtype, names: list[str]) -> list[Case]:
    real = device in ("cuda", "meta-cuda")
    dev = "meta" if device.startswith("meta") else device
    mk = Maker(dev, dtype)
    f32 = torch.float32
    cases: list[Case] = []
    # SSLAM stage 2 on one GPU: 12 clips doubled to 24, 8 clones -> 192 student rows; D 768, 12 heads
    B, K, D, H = (24, 8, 768, 12) if real else (2, 4, 192, 3)
    N, k = 512, KEEP_OF_512
    R = B * K

    if "clone_gather" in names:
        x = mk.randn(B, N, D)
        _, ids_keep, _ = mk.masks(R, N, k)
        cls, w, b = mk.randn(D, dtype=f32), mk.randn(D, dtype=f32, scale=0.1) + 1, mk.randn(D, dtype=f32, scale=0.1)
        io = _b(x) + _b(ids_keep) + R * (1 + k) * D * x.element_size()
        cases.append(Case(
            "clone_gather", f"B{B} K{K} N{N} k{k} D{D}", [x, ids_keep, cls, w, b],
            lambda x, i, c, w, b: ref_clone_gather(x, i, K, c, w, b),
            lambda be, x, i, c, w, b: ops.clone_gather(x, i, K, c, w, b, backend=be),
            "clone_gather", grad_args=(0, 2, 3, 4), bytes_fwd=io, bytes_bwd=io + _b(x)))

    if "decoder_scatter" in names:
        x = mk.randn(R, 1 + k, D)
        _, _, ids_restore = mk.masks(R, N, k)
        out_b = R * N * D * x.element_size()
        cases.append(Case(
            "decoder_scatter", f"R{R} k{k} N{N} D{D}", [x, ids_restore],
            lambda x, r: ref_decoder_scatter(x, r, ref_mask_noise(x, N - k, MASK_NOISE_STD)),
            lambda be, x, r: ops.decoder_scatter(x, r, MASK_NOISE_STD, backend=be),
            "decoder_scatter", grad_args=(0,), bytes_fwd=_b(x) + _b(ids_restore) + out_b,
            bytes_bwd=out_b + _b(ids_restore) + _b(x)))

    if "attention" in names:
        # encoder self-attention: student (rows x heads, 1 + 102 tokens) and teacher (clips x heads, 1 + 512 tokens)
        shapes = [(192, 12, 103), (24, 12, 513)] if real else [(8, 3, 103), (8, 3, 513)]
        for bb, hh, L in shapes[: 1 if quick else 2]:
            qkv = [mk.randn(bb, hh, L, 64, scale=0.5) for _ in range(3)]
            flops = 4.0 * bb * hh * L * L * 64
            cases.append(Case(
                "attention", f"BH {bb}x{hh} L{L} d64", qkv, ref_attention,
                lambda be, q, kk, v: ops.attention(q, kk, v, backend=be), "attention",
                grad_args=(0, 1, 2), flops_fwd=flops, flops_bwd=2.5 * flops))

    if "ema_update_" in names:
        # the ~200 EAT encoder + decoder parameter tensors at width D (12 blocks), fp32 master and fp32 student
        shapes = []
        for _ in range(12):
            shapes += [(3 * D, D), (3 * D,), (D, D), (D,), (4 * D, D), (4 * D,), (D, 4 * D), (D,)] + [(D,)] * 4
        shapes += [(D, D // 16, 3, 3), (D,)] * 6 + [(D,)] * 4
        teach = [mk.randn(*s, dtype=f32) for s in shapes]
        stud = [mk.randn(*s, dtype=f32).requires_grad_() for s in shapes]
        n_el = sum(t.numel() for t in teach)
        decay = 0.9998
        cases.append(Case(
            "ema_update_", f"{len(shapes)} tensors, {n_el / 1e6:.1f} M fp32", [teach, stud],
            lambda t, s: ref_ema_update_(t, s, decay),
            lambda be, t, s: ops.ema_update_(t, s, decay), None, bytes_fwd=3 * 4 * n_el))

    if "layer_targets" in names:
        clips = B if real else 4  # the teacher sees all 2B clips once (no clones)
        layers = mk.randn(12, clips, N, D)
        cases.append(Case(
            "layer_targets", f"L12 B{clips} T{N} D{D}", [layers], lambda y: ref_layer_targets(y),
            lambda be, y: ops.layer_targets(y, 12, backend=be), "layer_targets",
            bytes_fwd=_b(layers) + clips * N * D * 4))

    if "decoder_block" in names:
        C, G, hh, ww = D, 16, 64, 8
        z = mk.randn(R, C, hh, ww)
        wt, bs = mk.randn(C, C // G, 3, 3, scale=0.1), mk.randn(C, scale=0.1)
        flops = 2.0 * R * C * (C // G) * 9 * hh * ww
        cases.append(Case(
            "decoder_block", f"R{R} C{C} {hh}x{ww} g{G}", [z, wt, bs],
            lambda z, w, b: ref_decoder_block(z, w, b, G),
            lambda be, z, w, b: ops.decoder_block(z, w, b, G, backend=be), "decoder_block",
            grad_args=(0, 1, 2), flops_fwd=flops, flops_bwd=2 * flops))

    if "masked_mse" in names:
        pred, target = mk.randn(R, N, D), mk.randn(B, N, D, dtype=f32)
        mask, _, _ = mk.masks(R, N, k)
        cases.append(Case(
            "masked_mse", f"R{R} (B{B} x K{K}) N{N} D{D}", [pred, target, mask],
            lambda p, t, m: ref_masked_mse(p, t, m, K),
            lambda be, p, t, m: ops.masked_mse(p, t, m, clones=K, backend=be), "masked_mse",
            grad_args=(0, 1), bytes_fwd=_b(pred) + _b(target) + _b(mask),
            bytes_bwd=_b(pred) + _b(target) + _b(mask) + _b(pred) + _b(target)))

    if "gelu_mlp" in names:
        # one block's MLP on the student rows: (rows, 1 + 102 tokens, D) -> 4 D -> D
        x = mk.randn(R, 1 + k, D)
        w1, b1 = mk.randn(4 * D, D, scale=0.02), mk.randn(4 * D, scale=0.02)
        w2, b2 = mk.randn(D, 4 * D, scale=0.02), mk.randn(D, scale=0.02)
        flops = 2.0 * 2 * R * (1 + k) * D * 4 * D
        cases.append(Case(
            "gelu_mlp", f"R{R} L{1 + k} D{D} H{4 * D}", [x, w1, b1, w2, b2], ref_gelu_mlp,
            lambda be, *a: ops.gelu_mlp(*a), None, grad_args=(0, 1, 2, 3, 4), flops_fwd=flops, flops_bwd=2 * flops))

    if "partial_max_mix" in names:
        clips = 12 if real else 4
        spec = mk.randn(clips, 1, 1024, 128, dtype=f32)  # the normalised fbank batch, before autocast
        s1, s2 = 100, 500
        cases.append(Case(
            "partial_max_mix", f"B{clips} T1024 F128 concat fp32", [spec],
            lambda s: ref_partial_max_mix(s, s1, s2, 240, True),
            lambda be, s: ops.partial_max_mix(s, (s1, s2), concat=True, backend=be), "partial_max_mix",
            bytes_fwd=3 * _b(spec)))

    if "mix_waveforms" in names:
        clips = 12 if real else 4
        a, b = mk.randn(clips, 160000, dtype=f32), mk.randn(clips, 160000, dtype=f32)
        snr = mk.randn(clips, dtype=f32, scale=5.0)
        cases.append(Case(
            "mix_waveforms", f"B{clips} N160000 fp32", [a, b, snr], ref_mix_waveforms,
            lambda be, a, b, s: ops.mix_waveforms(a, b, s, backend=be), "mix_waveforms", bytes_fwd=3 * _b(a)))

    if "masks" in names:
        clips = 12
        gen = torch.Generator().manual_seed(0)
        mk_dev = dev if dev != "meta" else "cpu"
        cases.append(Case(
            "inverse_block_mask", f"B{clips} K8 grid 64x8", [],
            lambda: ref_inverse_block_mask(clips, 8, generator=gen, device=mk_dev),
            lambda be: ops.inverse_block_mask(clips, 8, generator=gen, device=mk_dev, backend=be),
            "inverse_block_mask", bytes_fwd=clips * 8 * N))
        mask, _, _ = mk.masks(clips * 8, N, k)
        cases.append(Case(
            "mask_indices", f"R{clips * 8} N{N} k{k}", [mask], lambda m: ref_mask_indices(m, k),
            lambda be, m: ops.mask_indices(m), None, bytes_fwd=_b(mask) + clips * 8 * (k + N) * 8))
    return cases


# --- measurement ------------------------------------------------------------------------------------------------------


def _cpu_peak_bytes(fn) -> int:
    """Peak of the running sum of CPU allocator events during ``fn()`` (bytes above the level at its start)."""
    act = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=act, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def _cuda_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _grad_closure(fn, case: Case):
    """fwd+bwd of ``fn(*args)``: fresh leaves each call (so grads never accumulate), backward of a fixed gradient."""
    leaves = [a.detach().requires_grad_(i in case.grad_args) if isinstance(a, torch.Tensor) else a
              for i, a in enumerate(case.args)]
    with torch.no_grad():
        out = fn(*leaves)
    grad_out = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)

    def call():
        for i in case.grad_args:
            leaves[i].grad = None
        fn(*leaves).backward(grad_out)

    return call


@dataclass
class Row:
    path: str
    fwd_s: float | None = None
    bwd_s: float | None = None  # fwd+bwd
    fwd_mem: int | None = None
    bwd_mem: int | None = None
    note: str = ""


def measure(case: Case, path: str, fn, device: str, repeats: int, warmup: int) -> Row:
    """Time (and measure peak memory of) ``fn(*args)`` forward and, if the op has gradients, forward+backward."""
    cuda = device == "cuda"
    peak = _cuda_peak_bytes if cuda else _cpu_peak_bytes
    # Memory-bound ops (no FLOP model) get a flushed L2 before each timed call on CUDA; see the module docstring.
    flush = case.flops_fwd == 0

    def timed(f):
        if cuda:
            return cuda_median_time(f, repeats=repeats, warmup=warmup, flush_l2=flush)
        return median_time(f, repeats=repeats, warmup=warmup)

    row = Row(path)
    if fn is None:
        row.note = "not run"
        return row

    def fwd():
        with torch.no_grad():
            fn(*case.args)

    try:
        row.fwd_s = timed(fwd)
        row.fwd_mem = peak(fwd)
        if case.grad_args:
            step = _grad_closure(fn, case)
            row.bwd_s = timed(step)
            row.bwd_mem = peak(step)
    except Exception as exc:
        if not path.startswith("compile"):
            raise  # the reference or an op failing is a bug, not a result
        # inductor failing on a reference is a result: reported in the row, with its exception type
        row.note = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    return row


def _compiled(fn):
    torch._dynamo.reset()  # a fresh cache per op: no recompile-limit interference between ops
    return torch.compile(fn)


def paths_for(case: Case, device: str, skip_compile: str) -> list[tuple[str, Callable]]:
    out = [("reference", case.ref)]
    if skip_compile:
        out.append((f"compile(reference): skipped ({skip_compile})", None))
    else:
        out.append(("compile(reference)", _compiled(case.ref)))
    if case.registry is None:
        out.append(("op (single implementation)", lambda *a: case.run("auto", *a)))
    elif device == "cpu":
        chosen = _backend.base_name(_backend.resolve(case.registry, "auto", device))
        out.append((f"op auto -> {chosen}", lambda *a: case.run("auto", *a)))
    else:
        for b in _backend.available_backends(case.registry, device):
            if b != "reference":
                out.append((f"op[{b}]", lambda *a, b=b: case.run(b, *a)))
    return out


# --- report -----------------------------------------------------------------------------------------------------------


def _ms(t):
    return "-" if t is None else f"{t * 1e3:.3f}"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def _rate(case: Case, fwd_s, bwd_s) -> tuple[str, str]:
    """(achieved, share of the roofline) for fwd and fwd+bwd, as 'fwd / fwd+bwd'; bytes per the module's rule."""
    flop = case.flops_fwd > 0
    work_f = case.flops_fwd if flop else case.bytes_fwd
    work_b = (case.flops_fwd + case.flops_bwd) if flop else (case.bytes_fwd + case.bytes_bwd)
    peak, unit, scale = (BF16_FLOP_S, "TFLOP/s", 1e12) if flop else (hbm_peak()[0], "GB/s", 1e9)
    if not work_f:
        return "-", "-"
    vals, shares = [], []
    for work, t in ((work_f, fwd_s), (work_b, bwd_s)):
        if t is None or not work:
            continue
        vals.append(f"{work / t / scale:.1f}")
        shares.append(f"{100 * work / t / peak:.0f}%")
    return (" / ".join(vals) + f" {unit}") if vals else "-", " / ".join(shares) or "-"


def table(results: list[tuple[Case, list[Row]]], device: str) -> str:
    head = ["op", "shape", "path", "fwd ms", "fwd+bwd ms", "fwd peak MiB", "fwd+bwd peak MiB", "fwd vs ref"]
    if device == "cuda":
        head += ["achieved (fwd / fwd+bwd)", "roofline share"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for case, rows in results:
        ref_t = rows[0].fwd_s
        for r in rows:
            speed = f"{ref_t / r.fwd_s:.2f}x" if ref_t and r.fwd_s else "-"
            cells = [case.op, case.shape, r.path]
            if r.note and r.fwd_s is None:
                cells += [r.note] + ["-"] * (len(head) - 4)
            elif r.note:  # the forward ran, the backward failed
                cells += [_ms(r.fwd_s), r.note, _mib(r.fwd_mem), "-", speed] + ["-"] * (len(head) - 8)
            else:
                cells += [_ms(r.fwd_s), _ms(r.bwd_s), _mib(r.fwd_mem), _mib(r.bwd_mem), speed]
                if device == "cuda":
                    cells += list(_rate(case, r.fwd_s, r.bwd_s))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dry_run(device: str, quick: bool, names: list[str]) -> int:
    """Build every case on the meta device at ``device``'s shapes and print its cost model; time nothing."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = build_cases(f"meta-{device}" if device == "cuda" else "meta", quick, dtype, names)
    print(machine_line())
    print(f"dry run: {len(cases)} cases at the {device} shapes on the meta device ({dtype})")
    print("| op | shape | grads | MB fwd / bwd | GFLOP fwd / bwd | auto/registry backends here |")
    print("|---|---|---|---|---|---|")
    for c in cases:
        avail = _backend.available_backends(c.registry, device) if c.registry else ["single implementation"]
        print(f"| {c.op} | {c.shape} | {len(c.grad_args)} | {c.bytes_fwd / 1e6:.1f} / {c.bytes_bwd / 1e6:.1f} | "
              f"{c.flops_fwd / 1e9:.1f} / {c.flops_bwd / 1e9:.1f} | {','.join(avail)} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats, one attention shape, no torch.compile")
    p.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma-separated subset of {','.join(ALL_OPS)}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) path")
    p.add_argument("--compile", action="store_true", help="with --quick: time torch.compile(reference) anyway")
    p.add_argument("--dry-run", action="store_true", help="build the cases on the meta device, time nothing")
    p.add_argument("--plot", action="store_true", help="also chart the speed and memory ratios against the reference: "
                   "benchmarks/charts/bench_ops_<device>.png (matplotlib)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_OPS))
    if unknown:
        p.error(f"--ops: unknown op(s) {unknown}; choose from {list(ALL_OPS)}")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.dry_run:
        return dry_run(args.device, args.quick, names)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --dry-run to check the CUDA shapes)")

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    repeats, warmup = (3, 1) if args.quick else ((20, 5) if args.device == "cuda" else (7, 2))
    machine = machine_line()
    print(machine, flush=True)
    # inductor needs ~5-10 s per graph on a small CPU, more than the whole --quick budget: --quick skips it
    skip = "--no-compile" if args.no_compile else ("--quick" if args.quick and not args.compile else "")
    results = []
    for case in build_cases(args.device, args.quick, dtype, names):
        rows = []
        for path, fn in paths_for(case, args.device, skip):
            r = measure(case, path, fn, args.device, repeats, warmup)
            print(f"  {case.op:18s} {path:28s} fwd {_ms(r.fwd_s):>9s} ms  fwd+bwd {_ms(r.bwd_s):>9s} ms  {r.note}",
                  flush=True)
            rows.append(r)
        results.append((case, rows))
    body = table(results, args.device)
    notes = [f"threads {torch.get_num_threads()}; {dtype}; median of {repeats} after {warmup} warm-up calls"
             f"{' (--quick)' if args.quick else ''}; peak MiB = bytes allocated above the call's start level "
             f"({'max_memory_allocated' if args.device == 'cuda' else 'torch.profiler CPU allocator events'})"]
    if args.device == "cuda":
        notes.append(f"CUDA-event times, L2 flushed before each call of the GB/s ops; roofline = {hbm_peak()[1]} HBM "
                     f"(bytes: inputs read once + outputs written once, see the docstring) or 989 TFLOP/s bf16")
    title = f"### Every op vs reference and torch.compile(reference), device {args.device}"
    cmd = "python benchmarks/bench_ops.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n\n".join([title, machine + "  \ncommand: `" + cmd.strip() + "`; " + "; ".join(notes), body])
    print()
    print(text)
    if args.plot:
        import plots  # imports matplotlib when it draws

        text = plots.chart_section(f"bench_ops_{args.device}", text, publish=not args.no_write)
    if not args.no_write:
        write_section(f"bench_ops_{args.device}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
