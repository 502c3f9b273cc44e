"""The fine-tuning step of ``benchmarks/bench_train.py --task finetune``: the upstream-faithful step against sslam_fast,
eager and under torch.compile.

    python benchmarks/bench_train.py --task finetune --preset tiny --threads 1 --write --plot
    python benchmarks/bench_train.py --task finetune --preset base --device cuda --write
    python benchmarks/bench_train.py --task finetune --preset tiny --profile

One step is one update of the AS-20K recipe (docs/ALGORITHM.md §9; ``sslam_fast.finetune.config.PRESETS``: ``tiny``
for ``--preset tiny``, ``as20k`` with ViT-B for ``--preset base``) from a batch of raw int16 waveforms and its multi-hot
targets: waveform roll, fbank, batch mixup, SpecAugment, the classifier (encoder -> CLS -> ``fc_norm`` -> head, drop
path on), BCE, backward, the gradient norm, AdamW over the layer-decayed groups and the per-group cosine schedule (bf16
autocast on CUDA, fp32 on the CPU). Variants:

- (a) plain: what upstream runs, where it runs it. Per clip, as ``[E] data/raw_audio_dataset.py :
  FileAudioDataset.__getitem__`` does in the DataLoader workers: ``x / 32768`` (soundfile's float read), ``x -
  x.mean()``, ``_roll_mag_aug`` (``np.roll`` by ``randint(len)`` and a ``Beta(10, 10) + 0.5`` gain, numpy),
  ``kaldi.fbank`` with the ALGORITHM §1 arguments, zero pad / crop, ``(x - mean) / (2 std)``. On the batch, as ``[E]
  models/EAT_audio_classification.py : MaeImageClassificationModel.forward`` does: ``[E] utils/mixup.py : Mixup`` in
  batch mode (numpy lambda, in-place ``x.mul_(lam).add_(x.flip(0).mul_(1 - lam))``), then ``spectrogram_augment``
  (torchaudio ``FrequencyMasking(128 r)`` and ``TimeMasking(T r)`` with ``iid_masks=True`` on the transposed batch);
  the encoder the upstream way (``sslam_fast.reference.model``: materialised ``softmax_fp32(q k^T) v``, plain
  ``fc2(gelu(fc1(x)))``) with timm's ``drop_path`` on both branches of each post-LN block (``[E] models/modules.py :
  AltBlock.forward``); ``nan_to_num`` of the logits and BCE-with-logits (``reduction="none"``, then the mean, the
  normalisation ``finetune_loss`` uses; upstream divides the sum by the positive-label count, a constant factor);
  fairseq's ``clip_grad_norm_`` with ``clip_norm 0`` (the total norm from the per-parameter norms, clipping off) and
  its finiteness check (a host read); AdamW parameter by parameter (``foreach=False``: fairseq's ``Adam`` on the CPU;
  on CUDA ``fused=True`` as apex's ``FusedAdam``, with the multi-tensor norm) over the same layer-decayed groups as
  (c) (``[F] optim/composite.py`` builds one Adam per group from the same overrides).
- (b) (a) with the classifier and the loss under ``torch.compile``.
- (c) fast: as ``sslam_fast/finetune/loop.py : _Stepper`` runs it: ``roll_aug``, ``eat_features`` (backend auto),
  ``mixup`` and ``spec_augment`` on the device from one generator, ``AudioClassifier`` (``sslam_fast.ops``: SDPA
  attention, the GELU-recomputing MLP), ``finetune_loss``, ``get_total_norm`` and the fused AdamW of
  ``sslam_fast.finetune.optim.build_optimizer`` (the update skipped on the device through ``found_inf``), no value
  checks (nothing read back to the host).
- (d) (c) with the classifier and the loss under ``torch.compile``.

On CUDA, (a) and (b) start from the per-clip worker output already on the device (computed on the CPU at 1 thread
outside the timed region, as upstream's workers do it beside the GPU step; their time per clip is printed below the
table); mixup and SpecAugment stay in the step, where upstream runs them. Timing (round-robin, median), peak memory
(CPU: peak RSS above the step's start in a fresh process; CUDA: ``max_memory_allocated`` above the step's start) and
the final ``fast/reference`` line are as for the pre-training step (see ``bench_train.py``).

Loss agreement: (a)'s and (c)'s forward and loss on identical weights, features and targets in fp32 with augmentation
and drop path off (eval mode): max relative difference of the logits (max |diff| / max |logit|) and of the loss.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import step_bench as sb
import torch
import torch.nn.functional as F
from common import machine_line

from sslam_fast import _backend
from sslam_fast._checks import value_checks
from sslam_fast.finetune.augment import finetune_loss, mixup, roll_aug, spec_augment
from sslam_fast.finetune.config import PRESETS, FinetuneConfig
from sslam_fast.finetune.optim import build_optimizer, build_scheduler, param_groups
from sslam_fast.models import AudioClassifier
from sslam_fast.ops import eat_features
from sslam_fast.reference import model as refm

SEED = 0
TINY_CLASSES = 10  # the built-in synthetic set's classes (sslam_fast.data.synthetic.CLASS_NAMES)

# key: (label, fast path, classifier + loss under torch.compile)
VARIANTS = {
    "a": ("(a) plain (upstream-faithful)", False, False),
    "b": ("(b) plain + torch.compile(model)", False, True),
    "c": ("(c) fast (sslam_fast)", True, False),
    "d": ("(d) fast + torch.compile(model)", True, True),
}


# --- set-up -----------------------------------------------------------------------------------------------------------


@dataclass
class FtSetup:
    preset: str
    device: torch.device
    batch: int
    cfg: FinetuneConfig  # the recipe, batch_size = batch
    num_classes: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def samples(self) -> int:
        return self.cfg.clip_samples

    @property
    def target_length(self) -> int:
        return self.cfg.target_length


def default_batch(preset: str, device: str) -> int:
    """The recipe's batch (tiny 16; AS-20K 48 on CUDA), 2 for ViT-B on the CPU."""
    if preset == "tiny":
        return PRESETS["tiny"].batch_size
    return PRESETS["as20k"].batch_size if device == "cuda" else 2


def make_setup(preset: str, batch: int, device: torch.device) -> FtSetup:
    recipe = "tiny" if preset == "tiny" else "as20k"
    cfg = dataclasses.replace(PRESETS[recipe], batch_size=batch).validate()  # mixup needs an even batch
    return FtSetup(preset, device, batch, cfg, TINY_CLASSES if preset == "tiny" else 527)


def make_audio(s: FtSetup) -> torch.Tensor:
    """(B, samples) int16 PCM on the device (``step_bench.synthetic_audio``)."""
    return sb.synthetic_audio(s.batch, s.samples, s.device, SEED, s.cfg.sample_rate)


def make_targets(s: FtSetup) -> torch.Tensor:
    """(B, C) float32 multi-hot targets on the device: each class on with probability 0.2, at least one per clip."""
    g = torch.Generator().manual_seed(SEED + 2)
    t = torch.rand(s.batch, s.num_classes, generator=g) < 0.2
    t[torch.arange(s.batch), torch.randint(0, s.num_classes, (s.batch,), generator=g)] = True
    return t.float().to(s.device)


def initial_model(s: FtSetup) -> AudioClassifier:
    torch.manual_seed(SEED)
    return AudioClassifier(s.cfg.model_config(), s.num_classes).to(s.device).train()


def flop_per_clip(s: FtSetup) -> float:
    """Matmul FLOPs of one clip's forward and backward (3x the forward): patch embedding, per block 12 D^2 per token
    (qkv, proj, MLP) and 2 L^2 D (scores, weighting); fc_norm and the head are negligible."""
    m = s.cfg.model_config()
    n = m.grid[0] * m.grid[1]
    L, D = n + 1, m.embed_dim
    macs = n * m.patch_size**2 * D + m.depth * (12 * D * D * L + 2 * L * L * D)
    return 3 * 2 * macs


# --- the upstream way (a), (b) ----------------------------------------------------------------------------------------


def plain_clip_features(clips: torch.Tensor, cfg: FinetuneConfig, rng: np.random.RandomState | None) -> torch.Tensor:
    """``FileAudioDataset.__getitem__`` per clip on the CPU (``rng`` None: no roll): (B, 1, T, 128) float32."""
    import torchaudio.compliance.kaldi as kaldi

    out = []
    for clip in clips:
        x = clip.float() / 32768.0 if clip.dtype == torch.int16 else clip.float()
        x = x - x.mean()
        if rng is not None:  # _roll_mag_aug
            w = np.roll(x.numpy(), rng.randint(len(x)))
            x = torch.Tensor(w * (rng.beta(10, 10) + 0.5))
        fb = kaldi.fbank(x[None], htk_compat=True, sample_frequency=cfg.sample_rate, use_energy=False,
                         window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
        n = fb.shape[0]
        T = cfg.target_length
        fb = F.pad(fb, (0, 0, 0, T - n)) if n < T else fb[:T]
        out.append(((fb - cfg.norm_mean) / (cfg.norm_std * 2))[None])
    return torch.stack(out)


def plain_mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float, prob: float, rng: np.random.RandomState):
    """``Mixup._mix_batch`` + ``mixup_target``: one numpy lambda per batch, the batch mixed in place with its flip."""
    lam = 1.0
    if rng.rand() < prob:
        lam = float(rng.beta(alpha, alpha))
    if lam != 1.0:
        x_flipped = x.flip(0).mul_(1.0 - lam)
        x.mul_(lam).add_(x_flipped)
    return x, targets * lam + targets.flip(0) * (1.0 - lam)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """timm's ``drop_path`` (``scale_by_keep``): per sample, keep with probability 1 - p and divide by it."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
    return x * mask


def plain_forward(model: AudioClassifier, fbank: torch.Tensor) -> torch.Tensor:
    """``MaeImageClassificationModel.forward`` (CLS-token mode) on ``model``'s parameters: patch embedding and
    positions, CLS and input LayerNorm, the post-LN blocks the upstream way with drop path, ``fc_norm``, head."""
    enc = model.encoder
    x = enc.add_cls_and_norm(enc.patchify(enc.check_fbank(fbank)))
    for blk in enc.blocks:
        p = float(getattr(blk.drop_path, "p", 0.0))
        x = x + _drop_path(refm.attention(blk.attn, x), p, model.training)
        r = x = blk.norm1(x)
        x = blk.norm2(r + _drop_path(refm.mlp(blk.mlp, x), p, model.training))
    return model.head(model.fc_norm(x[:, 0]))


def plain_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """The loss of ``MaeImageClassificationModel.forward`` after ``nan_to_num``: BCE with logits, or the soft-target
    cross-entropy of the mixup path, per element, then averaged as ``finetune_loss`` averages."""
    x = torch.nan_to_num(logits)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(x, targets.float(), reduction="none").mean()
    return (-targets * F.log_softmax(x.float(), dim=-1)).sum(-1).mean()


# --- one variant ------------------------------------------------------------------------------------------------------


class Variant(sb.StepVariant):
    """One variant's model copy, optimizer, schedule and step function."""

    def __init__(self, key: str, s: FtSetup, model0: AudioClassifier, audio_targets: torch.Tensor):
        from torchaudio.transforms import FrequencyMasking, TimeMasking

        super().__init__(key, s, VARIANTS)
        cfg = s.cfg
        self.targets = audio_targets
        self.model = model = copy.deepcopy(model0).train()
        if self.fast:
            self.opt = build_optimizer(model, cfg)
            self.generator = torch.Generator(device=s.device).manual_seed(SEED)
        else:
            groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
            for g in groups:
                g["lr"] = g["initial_lr"] = cfg.lr * g["lr_scale"]
            kw = {"fused": True} if s.cuda else {"foreach": False}  # FusedAdam on CUDA; fairseq's Adam loop on the CPU
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, **kw)
            self.rng = np.random.RandomState(SEED)  # the workers' and Mixup's numpy draws
            self.freq_mask = FrequencyMasking(128 * cfg.mask_ratio, iid_masks=True)
            self.time_mask = TimeMasking(cfg.target_length * cfg.mask_ratio, iid_masks=True)
        self.sched = build_scheduler(self.opt, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fused = bool(self.opt.defaults.get("fused"))
        kind = cfg.loss

        def loss_fn(fbank, targets):
            if self.fast:
                return finetune_loss(model(fbank), targets, kind)
            return plain_loss(plain_forward(model, fbank), targets, kind)

        self.loss_fn = torch.compile(loss_fn) if self.compiled else loss_fn

    def prepare(self, audio: torch.Tensor, n: int | None = None):
        """(a) / (b) on CUDA: the workers' per-clip features on the device, computed on the CPU at 1 thread (not part
        of the timed step; the CPU time is kept in ``_last_worker``, (roll + fbank s,)); None for every other variant
        and on the CPU."""
        if not self.workers:
            return None
        audio_cpu = audio.cpu()
        with sb.worker_threads():
            t0 = time.perf_counter()
            fbank = plain_clip_features(audio_cpu, self.s.cfg, self.rng if self.s.cfg.roll_aug else None)
            self._last_worker = (time.perf_counter() - t0,)
        return fbank.to(self.s.device)

    def _inputs(self, audio: torch.Tensor, prepared):
        cfg = self.s.cfg
        if self.fast:  # sslam_fast/finetune/loop.py : _Stepper.inputs
            g = self.generator
            x = audio
            if cfg.roll_aug:
                x = roll_aug(audio, None, g)  # int16 PCM: float32 / 32768, rolled and scaled in one pass
            fb = eat_features(x, sample_rate=cfg.sample_rate, target_length=cfg.target_length,
                              norm_mean=cfg.norm_mean, norm_std=cfg.norm_std)
            targets = self.targets
            if cfg.mixup > 0:
                fb, targets = mixup(fb, targets, cfg.mixup, cfg.mixup_prob, g)
            if cfg.mask_ratio > 0:
                fb = spec_augment(fb, cfg.mask_ratio, g)
            return fb, targets
        fb = prepared if prepared is not None else plain_clip_features(
            audio, cfg, self.rng if cfg.roll_aug else None)
        targets = self.targets
        if cfg.mixup > 0:
            fb, targets = plain_mixup(fb, targets, cfg.mixup, cfg.mixup_prob, self.rng)
        if cfg.mask_ratio > 0:  # spectrogram_augment: on (B, 1, F, T)
            fb = self.time_mask(self.freq_mask(fb.transpose(2, 3))).transpose(2, 3)
        return fb, targets

    def step(self, audio: torch.Tensor, prepared=None) -> torch.Tensor:
        s, cfg = self.s, self.s.cfg
        if prepared is None:
            prepared = self.prepare(audio)
        with value_checks(not self.fast):
            fb, targets = self._inputs(audio, prepared)
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=s.cuda):
                loss = self.loss_fn(fb, targets)
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.fast or s.cuda:  # torch's foreach norm; upstream on CUDA: apex's multi-tensor L2 norm
            norm = torch.nn.utils.get_total_norm(grads)
        else:  # fairseq's utils.clip_grad_norm_ on the CPU
            norm = torch.norm(torch.stack([torch.norm(g, p=2, dtype=torch.float32) for g in grads]))
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, cfg.clip_norm, norm, foreach=self.fast or s.cuda)
        if self.fast:
            finite = torch.isfinite(norm) & torch.isfinite(loss.detach())
            if self.fused:
                self.opt.found_inf = (~finite).to(torch.float32)
            self.opt.step()
        elif bool(torch.isfinite(norm)):  # fairseq's trainer: a non-finite gradient norm skips the update
            self.opt.step()
        self.sched.step()
        self.n += 1
        return loss.detach()


def memory_variant(preset: str, batch: int, key: str) -> tuple[Variant, torch.Tensor]:
    """The CPU peak-memory subprocess's variant and audio (``bench_train.py --_memory-child finetune:KEY``)."""
    s = make_setup(preset, batch, torch.device("cpu"))
    return Variant(key, s, initial_model(s), make_targets(s)), make_audio(s)


# --- loss agreement ---------------------------------------------------------------------------------------------------


def loss_agreement(s: FtSetup, model0: AudioClassifier, audio: torch.Tensor, targets: torch.Tensor) -> dict:
    """Max relative difference of the logits and of the loss, fast against plain, on identical inputs (fp32, eval
    mode: no drop path; no augmentation)."""
    model = copy.deepcopy(model0).eval()
    fbank = plain_clip_features(audio.cpu(), s.cfg, None).to(s.device)
    with sb.no_tf32(), torch.no_grad():
        la, lc = plain_forward(model, fbank), model(fbank)
        a, c = plain_loss(la, targets, s.cfg.loss), finetune_loss(lc, targets, s.cfg.loss)
    logits = float((la - lc).abs().max() / la.abs().max().clamp_min(1e-30))
    return {"logits": logits, "loss": sb.rel_diff(float(a), float(c))}


# --- run --------------------------------------------------------------------------------------------------------------


def run(args, device: torch.device, cpu_peak) -> sb.StepResult:
    """Warm-up, round-robin timing and peak memory of every variant (``step_bench.measure``); ``cpu_peak(key)``
    measures one variant's CPU peak in a fresh process."""
    s = make_setup(args.preset, args.batch, device)
    model0, audio, targets = initial_model(s), make_audio(s), make_targets(s)
    torch._dynamo.reset()
    variants = [Variant(k, s, model0, targets) for k in VARIANTS]
    return sb.measure(s, variants, audio, args, "finetune", cpu_peak,
                      lambda: loss_agreement(s, model0, audio, targets))


def markdown(r: sb.StepResult) -> str:
    """The markdown: title, table, CPU-worker line (CUDA), loss-agreement line."""
    s, m = r.setup, r.setup.cfg.model_config()
    title = (f"### Fine-tuning ({s.cfg.preset} recipe), preset {s.preset}, batch {s.batch}, {s.num_classes} classes, "
             f"D {m.embed_dim} x {m.depth} blocks, {s.samples / s.cfg.sample_rate:g} s clips, T {s.target_length}, "
             f"device {s.device.type}")
    return sb.result_text(r, title, flop_per_clip(s), ("roll + fbank",),
                          "[finetune] (fp32, identical weights/features/targets, no augmentation, no drop path)")


def main(args, argv, cpu_peak) -> int:
    """``bench_train.py --task finetune``: run, print, optionally profile and write the RESULTS.md section."""
    device = torch.device(args.device)
    machine = machine_line()
    print(machine, flush=True)
    fbank_be = _backend.base_name(_backend.resolve("eat_features", "auto", device))
    notes = sb.notes_line(args, device, f"eat_features[{fbank_be}], roll_aug / mixup / spec_augment on the device", "",
                          "roll + fbank from CPU workers outside the step (their time below the table), fused AdamW, "
                          "multi-tensor norm")
    print(notes, flush=True)
    r = run(args, device, cpu_peak)
    return sb.finish(args, argv, machine=machine, notes=notes, text=markdown(r),
                     profiles=[("Fine-tuning", label, table) for label, table in r.profiles],
                     heading=f"## Fine-tuning step, preset {args.preset}, device {args.device}",
                     section=f"bench_finetune_{args.preset}_{args.device}",
                     profile_name=f"finetune_{args.preset}_{args.device}.txt", last=sb.final_line(r.variants))
