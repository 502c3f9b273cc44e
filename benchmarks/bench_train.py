"""The whole pre-training step: the upstream-faithful path against sslam_fast, eager and under torch.compile.

    python benchmarks/bench_train.py --preset tiny --threads 1         # CPU, ModelConfig.tiny(), both stages
    python benchmarks/bench_train.py --preset tiny --quick             # smoke run: few steps, no torch.compile
    python benchmarks/bench_train.py --preset base --device cuda --write
    python benchmarks/bench_train.py --preset tiny --profile           # + top-25 operators of (a) and (c)
    python benchmarks/bench_train.py --task finetune --preset tiny     # the fine-tuning step (finetune_step.py)

One step is everything the trainer does per update, from a batch of raw int16 waveforms already on the device to the
updated teacher: features, masks (and the SSLAM mix windows), the EMA step, the loss terms (bf16 autocast on CUDA),
backward, gradient clipping (max norm 4) and AdamW (betas 0.9 / 0.95, weight decay 0.05 on the matrices); on CUDA,
(a) and (b) start from upstream's CPU-worker output instead (see below). Variants:

- (a) plain: the upstream pipeline. Per clip ``x / 32768``, ``x - x.mean()``, ``torchaudio.compliance.kaldi.fbank``
  with the ALGORITHM §1 arguments, zero-pad / crop to ``target_length`` frames, ``(x + 4.268) / (2 * 4.569)``; masks
  from the per-row upstream loop (``sslam_fast.reference.inverse_block_mask``); the loss terms the upstream way
  (``sslam_fast.reference.model.losses``: repeat-interleaved clones, materialised attention, the decoder module by
  module, ``x[mask]`` gathers); ``clip_grad_norm_`` and AdamW parameter by parameter (``foreach=False``, as fairseq's
  own AdamW on the CPU; on CUDA see below); the Python EMA loop (``sslam_fast.reference.model.ema_step``).
- (b) (a) with the loss function under ``torch.compile`` (default inductor).
- (c) fast: ``eat_features`` and ``inverse_block_mask`` (backend auto), ``PretrainingModel.losses`` (sslam_fast.ops),
  foreach clipping, torch's fused AdamW (CUDA and CPU), ``PretrainingModel.ema_step`` (``ema_update_``).
- (d) (c) with the loss function under ``torch.compile``.

On CUDA the baseline is what upstream really runs on a GPU, which is not the CPU baseline moved to the device:

- fbank and masks: upstream computes them per clip in its CPU DataLoader workers (the dataset's item and batch
  functions), which overlap the GPU step; the GPU step receives the finished batch. So on CUDA the
  step of (a) and (b) starts from the features and masks already on the device: before each timed step they are
  computed on the CPU exactly as above (the per-clip loop and the per-row mask loop, at 1 thread as in a worker) and
  copied to the device, outside the timed region. Their cost is reported separately, as "CPU worker time per clip",
  with the number of worker cores that would keep up with (a). (c) and (d) keep computing both inside the step,
  from int16 audio on the device; neither side's host-to-device copy of the batch is timed (a few MB, ~0.2 ms).
- optimizer: fairseq's ``FairseqAdam`` uses ``FusedAdam`` on CUDA whenever apex (or its own ``fused_adam_cuda``) is
  installed, so (a) and (b) run torch's fused AdamW (``fused=True``) there (the same update, one kernel); and
  fairseq's ``clip_grad_norm_`` then uses apex's ``multi_tensor_l2norm`` (``amp_C``, installed with the same apex),
  so the clipping of (a) and (b) is the foreach one there. On the CPU they keep the per-parameter loops above, so the
  CPU figures in RESULTS.md stay comparable with earlier runs.
- timing: each step is timed with CUDA events around it (``common.cuda_time_once``: synchronize, record, step,
  record), so the figure is the device time of the step, including any time the GPU waits for Python to launch.

Each variant trains its own deep copy of one initial model with its own optimizer. After the warm-up steps (which
also compile (b) and (d)) the variants run round-robin, one step each per round, so a drift of the machine hits them
alike; the table gives the median step time. A failing compile is reported in its row and the run goes on. Masks are
drawn from a generator seeded per step; the SSLAM windows are drawn with ``sample_mix_windows`` every step from a
generator seeded the same every step, so every step sees the same (s1, s2): a compiled loss specialises on these two
ints and would recompile (minutes on a small CPU) for every new pair, while the eager cost does not depend on them.

Peak memory is the memory one step needs above what is held between steps (model, teacher, optimizer state):

- CUDA: ``max_memory_allocated()`` during one step minus ``memory_allocated()`` before it (after
  ``reset_peak_memory_stats``), with the gradients of the previous step freed first; for (a) and (b) the workers'
  batch is already on the device then, as it is when upstream's step starts.
- CPU: peak resident set size of one step above the resident size before it. Each variant runs in a fresh
  subprocess (this script with a hidden flag) so that no other variant's heap is in the way. The subprocess first sets
  glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 64 KiB with ``mallopt``: every large tensor then lives in
  its own mmap and goes back to the kernel when freed, and the heap top is trimmed, so RSS follows the live tensors
  instead of keeping freed blocks. It runs one warm-up step (creating the optimizer state), frees the gradients,
  ``gc.collect()``, writes "5" to ``/proc/self/clear_refs`` (which resets the peak RSS, ``VmHWM``, to the current
  RSS), reads ``VmRSS``, runs one step and reads ``VmHWM``; the difference is the figure. Those steps are not timed:
  mmap-backed allocation is slower than malloc's reuse.

Loss agreement: on identical weights, inputs, masks and windows with ``mask_noise_std=0``, in fp32 (no autocast, no
TF32), ``sslam_fast.reference.model.losses`` and ``PretrainingModel.losses`` are compared term by term (max relative
difference). The variants' own losses differ slightly by construction: the C++ and the per-row mask generators draw
differently.

The last line compares (c) with (a) for the SSLAM stage (EAT if only that ran): ``fast/reference: speedup=clips/s
ratio memory=peak-memory ratio``. On CUDA each row also gives the share of the bf16 roofline,
``clips/s * 1.08e12 / 989e12`` (PERF.md; the FLOP count is the base model's).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_step  # noqa: E402
import step_bench as sb  # noqa: E402
from common import machine_line, upstream_fbank_loop  # noqa: E402

from sslam_fast import _backend  # noqa: E402
from sslam_fast._checks import value_checks  # noqa: E402
from sslam_fast.models import ModelConfig, PretrainingModel  # noqa: E402
from sslam_fast.models.pretraining import mix_windows_tensor  # noqa: E402
from sslam_fast.ops import eat_features, inverse_block_mask, sample_mix_windows  # noqa: E402
from sslam_fast.reference import inverse_block_mask as ref_masks  # noqa: E402
from sslam_fast.reference import model as refm  # noqa: E402
from sslam_fast.train.optim import param_groups  # noqa: E402

FLOP_PER_CLIP = 1.08e12  # base model, stage 1 (PERF.md)
LR, BETAS, EPS, WEIGHT_DECAY, CLIP_NORM = 5e-5, (0.9, 0.95), 1e-8, 0.05, 4.0
SEED = 0
MEMORY_TAG = "MEMORY_CHILD_RESULT "

# key: (label, fast path, loss under torch.compile)
VARIANTS = {
    "a": ("(a) plain (upstream-faithful)", False, False),
    "b": ("(b) plain + torch.compile(losses)", False, True),
    "c": ("(c) fast (sslam_fast)", True, False),
    "d": ("(d) fast + torch.compile(losses)", True, True),
}
STAGE_TITLES = {"sslam": "SSLAM stage 2", "eat": "EAT stage 1"}


# --- set-up -----------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    preset: str
    stage: str
    device: torch.device
    batch: int
    cfg: ModelConfig
    samples: int  # waveform length at 16 kHz
    target_length: int  # frames after pad / crop

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def make_setup(preset: str, stage: str, batch: int, device: torch.device) -> Setup:
    if preset == "tiny":  # the trainer's tiny preset: 2.56 s clips, 256 frames, K = 4 in both stages
        cfg = ModelConfig.tiny(stage=stage)
        return Setup(preset, stage, device, batch, cfg, 40960, 256)
    # base: ALGORITHM §7, K = 16 in stage 1 and 8 in stage 2 (the sslam-as2m preset)
    cfg = ModelConfig.base(stage=stage, clones=8 if stage == "sslam" else 16)
    return Setup(preset, stage, device, batch, cfg, 160000, 1024)


def make_audio(s: Setup) -> torch.Tensor:
    """(B, samples) int16 PCM on the device (``step_bench.synthetic_audio``)."""
    return sb.synthetic_audio(s.batch, s.samples, s.device, SEED)


def initial_model(s: Setup) -> PretrainingModel:
    torch.manual_seed(SEED)
    return PretrainingModel(s.cfg).to(s.device).train()


def _windows(s: Setup):
    if s.stage != "sslam":
        return None
    g = torch.Generator().manual_seed(SEED + 1)  # the same pair every step (see the module docstring)
    return sample_mix_windows(g, num_frames=s.target_length, window_frames=s.cfg.mix_window_frames)


# --- one variant ------------------------------------------------------------------------------------------------------


class Variant(sb.StepVariant):
    """One variant's model copy, optimizer and step function."""

    def __init__(self, key: str, s: Setup, model0: PretrainingModel):
        super().__init__(key, s, VARIANTS)
        self.model = copy.deepcopy(model0).train()
        groups = param_groups(self.model, WEIGHT_DECAY)
        self.params = [p for g in groups for p in g["params"]]
        if not self.fast and not s.cuda:
            kw = {"foreach": False}  # fairseq's AdamW on the CPU: a Python loop over parameters
        elif all(p.is_floating_point() for p in self.params):
            kw = {"fused": True}  # fast: torch's fused AdamW (CUDA and CPU); plain on CUDA: fairseq's FusedAdam
        else:
            kw = {"foreach": True}
        self.opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, **kw)
        # fairseq's clip_grad_norm_ on CUDA: apex's multi-tensor L2 norm (see the docstring); on the CPU a loop
        self.foreach_clip = self.fast or s.cuda
        model, fast = self.model, self.fast
        # the fast variants run as the trainer's steady-state step does: the kept count known from the mask
        # generator, the windows as a device tensor, no value checks (nothing read back to the host)
        num_kept = ref_masks.mask_counts(s.cfg.grid, s.cfg.mask_prob, s.cfg.mask_length, s.cfg.mask_prob_adjust)[1]

        def loss_fn(source, masks, windows):
            if fast:
                return model.losses(source, masks, windows, num_kept=num_kept)
            return refm.losses(model, source, masks, windows)

        self.loss_fn = torch.compile(loss_fn) if self.compiled else loss_fn

    def _mask_kw(self, n: int, device: torch.device) -> dict:
        cfg = self.s.cfg
        g = torch.Generator().manual_seed(SEED * 1_000_003 + n)  # step n's masks, whichever side draws them
        return dict(grid=cfg.grid, mask_prob=cfg.mask_prob, mask_length=cfg.mask_length,
                    mask_prob_adjust=cfg.mask_prob_adjust, generator=g, device=device)

    def prepare(self, audio: torch.Tensor, n: int | None = None):
        """What upstream's CPU DataLoader workers hand the GPU step of (a) / (b) for step ``n`` (default: the next):
        (source, masks) on the device, computed on the CPU at 1 thread; None for every other variant and on the CPU,
        where the step computes them itself. Not part of the timed step; the CPU time is kept in ``_last_worker``
        as (fbank s, masks s) for the whole batch."""
        if not self.workers:
            return None
        s = self.s
        n = self.n if n is None else n
        audio_cpu = audio.cpu()
        with sb.worker_threads():
            t0 = time.perf_counter()
            source = upstream_fbank_loop(audio_cpu, s.target_length)
            t1 = time.perf_counter()
            masks = ref_masks.inverse_block_mask(s.batch, s.cfg.clones, **self._mask_kw(n, torch.device("cpu")))
            t2 = time.perf_counter()
        self._last_worker = (t1 - t0, t2 - t1)
        return source.to(s.device), masks.to(s.device)

    def step(self, audio: torch.Tensor, prepared=None) -> torch.Tensor:
        s, cfg = self.s, self.s.cfg
        if prepared is None:
            prepared = self.prepare(audio)
        # the trainer's order: EMA first, with the updates done
        if self.fast:
            self.model.ema_step(self.n)
        else:
            refm.ema_step(self.model, self.n)
        self.opt.zero_grad(set_to_none=True)
        if prepared is not None:  # (a) / (b) on CUDA: the workers' batch
            source, masks = prepared
        elif self.fast:
            source = eat_features(audio, target_length=s.target_length)
            masks = inverse_block_mask(s.batch, cfg.clones, **self._mask_kw(self.n, s.device))
        else:
            source = upstream_fbank_loop(audio, s.target_length)
            masks = ref_masks.inverse_block_mask(s.batch, cfg.clones, **self._mask_kw(self.n, s.device))
        windows = _windows(s)
        if self.fast and windows is not None:
            windows = mix_windows_tensor(windows, s.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=s.cuda), value_checks(not self.fast):
            out = self.loss_fn(source, masks, windows)
        loss = out["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM, foreach=self.foreach_clip)
        self.opt.step()
        self.n += 1
        return loss.detach()


# --- CPU peak memory in a fresh process -------------------------------------------------------------------------------


def _proc_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def memory_child(args) -> None:
    """The hidden ``--_memory-child STAGE:KEY`` mode: print the peak RSS of one step above the RSS before it."""
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024) != 1:
        raise RuntimeError("glibc mallopt refused the 64 KiB mmap / trim thresholds")
    stage, key = args._memory_child.split(":")
    if stage == "finetune":
        v, audio = finetune_step.memory_variant(args.preset, args.batch, key)
    else:
        s = make_setup(args.preset, stage, args.batch, torch.device("cpu"))
        v, audio = Variant(key, s, initial_model(s)), make_audio(s)
    v.step(audio)  # warm-up: optimizer state, compile, lazy initialisation
    v.opt.zero_grad(set_to_none=True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _proc_kib("VmRSS")
    v.step(audio)
    peak = _proc_kib("VmHWM")
    print(MEMORY_TAG + json.dumps({"peak_bytes": (peak - before) * 1024, "rss_before_bytes": before * 1024}))


def cpu_peak(args, stage: str, key: str) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", f"{stage}:{key}", "--preset", args.preset,
           "--batch", str(args.batch), "--threads", str(args.threads), "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return int(json.loads(line[len(MEMORY_TAG):])["peak_bytes"])
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"memory subprocess for {stage}:{key} exited with {res.returncode}: {tail}")


# --- loss agreement ---------------------------------------------------------------------------------------------------


def loss_agreement(s: Setup, model0: PretrainingModel, audio: torch.Tensor) -> dict[str, float]:
    """Max relative difference, per loss term, of ``PretrainingModel.losses`` against the upstream way
    (``sslam_fast.reference.model.losses``) on identical inputs."""
    model = copy.deepcopy(model0).train()
    source = upstream_fbank_loop(audio, s.target_length)
    cfg = s.cfg
    masks = inverse_block_mask(s.batch, cfg.clones, grid=cfg.grid, mask_prob=cfg.mask_prob, mask_length=cfg.mask_length,
                               mask_prob_adjust=cfg.mask_prob_adjust, generator=torch.Generator().manual_seed(SEED),
                               device=s.device)
    windows = _windows(s)
    with sb.no_tf32(), torch.no_grad():
        plain = refm.losses(model, source, masks, windows, mask_noise_std=0.0)
        fast = model.losses(source, masks, windows, mask_noise_std=0.0)
    return {k: sb.rel_diff(float(plain[k]), float(fast[k])) for k in plain}


# --- one stage --------------------------------------------------------------------------------------------------------


def run_stage(args, stage: str, device: torch.device) -> sb.StepResult:
    s = make_setup(args.preset, stage, args.batch, device)
    model0 = initial_model(s)
    audio = make_audio(s)
    torch._dynamo.reset()  # each stage compiles its own graphs
    variants = [Variant(k, s, model0) for k in VARIANTS]
    return sb.measure(s, variants, audio, args, stage, lambda key: cpu_peak(args, stage, key),
                      lambda: loss_agreement(s, model0, audio))


# --- report -----------------------------------------------------------------------------------------------------------


def stage_text(r: sb.StepResult) -> str:
    """One stage's markdown: its title, the table, the CPU-worker line (CUDA) and the loss-agreement line."""
    s = r.setup
    title = (f"### {STAGE_TITLES[s.stage]} ({s.stage}), preset {s.preset}, batch {s.batch}, clones {s.cfg.clones}, "
             f"{s.samples / 16000:g} s clips, device {s.device.type}")
    return sb.result_text(r, title, FLOP_PER_CLIP, ("fbank", "masks"),
                          f"[{s.stage}] (fp32, identical weights/inputs/masks, mask_noise_std=0)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("pretrain", "finetune"), default="pretrain",
                   help="the pre-training step (default) or the fine-tuning step (benchmarks/finetune_step.py)")
    p.add_argument("--stage", choices=("sslam", "eat", "both"), default="both", help="pre-training stage(s)")
    p.add_argument("--preset", choices=("tiny", "base"), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=None, help="clips per step (tiny 8; base 2 on CPU, 12 on CUDA; "
                   "finetune: tiny 16, base 2 on CPU, 48 on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default 20; 5 for base on CPU; 3 --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="few steps, no torch.compile variants")
    p.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    p.add_argument("--profile", nargs="?", const="", default=None, metavar="PATH",
                   help="profile a few steps of (a) and (c); top-25 operators by self time to PATH "
                        "(default benchmarks/profiles/{train,finetune}_<preset>_<device>.txt)")
    p.add_argument("--plot", action="store_true", help="also chart the speed and memory ratios against (a): "
                   "benchmarks/charts/bench_train_<preset>_<device>.png (matplotlib); linked from RESULTS.md with "
                   "--write")
    p.add_argument("--_memory-child", dest="_memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    if args.batch is None and args.task == "finetune":
        args.batch = finetune_step.default_batch(args.preset, args.device)
    if args.batch is None:
        args.batch = 8 if args.preset == "tiny" else (12 if args.device == "cuda" else 2)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args._memory_child is not None:
        memory_child(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.steps is None:
        args.steps = 3 if args.quick else (5 if args.preset == "base" and args.device == "cpu" else 20)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    # (b) and (d) share the code object of the loss closure: one cache entry per model copy and path
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    argv = argv if argv is not None else sys.argv[1:]
    if args.task == "finetune":
        return finetune_step.main(args, argv, lambda key: cpu_peak(args, "finetune", key))
    device = torch.device(args.device)

    machine = machine_line()
    print(machine, flush=True)
    fbank_be = _backend.base_name(_backend.resolve("eat_features", "auto", device))
    mask_be = _backend.base_name(_backend.resolve("inverse_block_mask", "auto", device))
    notes = sb.notes_line(args, device, f"eat_features[{fbank_be}], inverse_block_mask[{mask_be}]",
                          " (see the docstring)", "fbank and masks from CPU workers outside the step (their time below "
                          "each table), fused AdamW, multi-tensor clipping")
    print(notes, flush=True)
    stages = ["sslam", "eat"] if args.stage == "both" else [args.stage]
    results = [run_stage(args, st, device) for st in stages]
    # the last line: the SSLAM stage (EAT if only that ran)
    last = sb.final_line(next((r for r in results if r.setup.stage == "sslam"), results[0]).variants)
    return sb.finish(args, argv, machine=machine, notes=notes, text="\n\n".join(stage_text(r) for r in results),
                     profiles=[(STAGE_TITLES[r.setup.stage], label, table) for r in results
                               for label, table in r.profiles],
                     heading=f"## Train step, preset {args.preset}, device {args.device}",
                     section=f"bench_train_{args.preset}_{args.device}",
                     profile_name=f"train_{args.preset}_{args.device}.txt", last=last)


if __name__ == "__main__":
    sys.exit(main())
