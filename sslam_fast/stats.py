"""The normalisation statistics of a corpus: the mean and standard deviation of its log-mel fbank.

    python -m sslam_fast.stats MANIFEST_OR_DIR [--clips 2000] [--seed 0] [--target-length 1024]
        [--sample-rate 16000] [--workers N] [--json]

prints ``--norm_mean=-4.268 --norm_std=4.569``, the form ``train.py`` and ``finetune.py`` take (ALGORITHM §1.6:
the model input is ``(x - norm_mean) / (2 norm_std)``), and with ``--json`` a JSON line with every figure below.

Where the AudioSet constants come from. EAT ships no statistics script; its ``-4.268 / 4.569`` are AST's AudioSet
constants (-4.2677393, 4.5689974), computed by AST's ``src/get_norm_stats.py`` (YuanGongND/ast) over the balanced
training set. SSLAM's authors computed their SPASS statistics with the same script (``[S]
SPASS_Finetune_LinearEval/SPASS_Create_Manifests/calculate_mean_std/get_norm_std_comb.py`` and its ``dataloader.py``):

* each clip: the whole waveform minus its mean, the Kaldi fbank (128 bins, 25 ms / 10 ms, Hanning, no dither), its
  first ``target_length`` frames kept, shorter clips padded with zero rows (1024 frames);
* the padded (zero) rows are INCLUDED, so every clip weighs the same (``target_length x 128`` values) and a short
  clip pulls the mean towards 0;
* the clips go in batches of 1000 in file order; per batch the mean and the (unbiased) standard deviation of all
  its values are taken, and the result is the plain average of the batch means and of the batch deviations (a last,
  smaller batch counts as much as a full one).

This module does exactly that (``norm_mean`` / ``norm_std``) over a seeded random sample of ``--clips`` clips, taken
in file order; with at most 1000 clips it is the mean and standard deviation of all their values at once. It follows
SSLAM's run of the script, which switches AST's training augmentation off (``freqm = timem = mixup = 0``). AST's
script as published runs with it on (mixup 0.5, SpecAugment masks of 24 bins and 192 frames), and AST's author states
that the AudioSet constants include its effect (YuanGongND/ast issue #16); the EAT / SSLAM pretraining input has
neither, so it is left out here (on AudioSet the result may therefore differ a little from AST's constants). Two
further
figures are reported: ``pooled_*`` (all sampled values at once, no batches: the plain estimate, equal to
``norm_*`` up to 1000 clips) and ``valid_*`` (the unpadded frames only). Departures from the script, each small:
the clips are mono by channel average (the script keeps channel 0 of a multi-channel file) and resampled to
``--sample-rate`` first (as the trainer does, ALGORITHM §1; the script takes the file's own rate), and files that
cannot be decoded or are shorter than one 25 ms frame are skipped and counted instead of stopping the run. A
skipped file is not replaced, so fewer clips than ``--clips`` may be used.

The fbank is ``sslam_fast.ops.kaldi_fbank`` on padded batches (the C++ kernel on the CPU), its output accumulated
in float64 (Chan's pairwise update of count, mean and sum of squared deviations, per clip); files are decoded and
resampled by a pool of ``--workers`` threads ahead of the fbank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sslam_fast.audio import AUDIO_EXTENSIONS, AudioError, list_audio, load_audio
from sslam_fast.data import DataError, read_manifest

__all__ = ["NormStats", "compute_stats", "main", "sample_files", "source_files"]

MEL_BINS = 128  # EAT's filterbank width
UPSTREAM_BATCH = 1000  # clips per batch of the statistics script (its DataLoader batch_size)
_SHOWN_BAD = 5


@dataclass
class NormStats:
    """The statistics of a sample of clips (see the module docstring for what each figure averages)."""

    norm_mean: float
    norm_std: float
    pooled_mean: float
    pooled_std: float
    valid_mean: float
    valid_std: float
    clips: int  # clips used
    files: int  # files in the source
    requested: int
    padded_share: float  # share of the target_length x 128 values that are padding
    seed: int
    target_length: int
    sample_rate: int
    seconds: float
    bad: list[tuple[str, str]] = field(default_factory=list)

    def flags(self) -> str:
        return f"--norm_mean={self.norm_mean:.3f} --norm_std={self.norm_std:.3f}"

    def to_json(self) -> str:
        d = asdict(self)
        d["bad"] = len(self.bad)
        d["bad_examples"] = [f"{p}: {r}" for p, r in self.bad[:_SHOWN_BAD]]
        return json.dumps(d)


class _Moments:
    """Count, mean and sum of squared deviations in float64, merged with Chan et al.'s pairwise formula."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0  # unbiased, as torch.std


def source_files(source: str | os.PathLike) -> list[Path]:
    """The audio files of a manifest (in its order) or a folder (``list_audio``: recursive, sorted)."""
    path = Path(source)
    if path.is_dir():
        files = list_audio(path)
        if not files:
            raise DataError(f"{path}: the folder holds no audio files")
        return files
    if path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS:
        raise DataError(f"{path} is one audio file; give a manifest (.tsv) or a folder of audio")
    if not path.exists():
        raise DataError(f"{path}: no such manifest or folder")
    root, entries = read_manifest(path)
    return [root / rel for rel, _ in entries]


def sample_files(num_files: int, clips: int, seed: int) -> list[int]:
    """Indices of the clips to use, ascending: all when ``clips >= num_files``, else ``clips`` drawn without
    replacement by ``numpy.random.default_rng(seed)``."""
    if clips >= num_files:
        return list(range(num_files))
    return sorted(np.random.default_rng(seed).choice(num_files, size=clips, replace=False).tolist())


def _load(path: Path, sample_rate: int, keep: int, min_samples: int):
    """The clip minus its mean, resampled and cut to its first ``keep`` samples, or the reason it cannot be used."""
    try:
        wav, sr = load_audio(path)
    except AudioError as e:
        return str(e)
    except Exception as e:  # one damaged file never stops the run
        return f"{path}: {type(e).__name__}: {e}"
    if sr != sample_rate:
        import torchaudio.functional as AF

        wav = AF.resample(wav, orig_freq=sr, new_freq=sample_rate)
    if wav.numel() < min_samples:
        return f"{path}: too short: {wav.numel()} samples at {sample_rate} Hz, less than one 25 ms frame"
    return (wav - wav.mean())[:keep].contiguous()


def _batch_moments(waves: list[torch.Tensor], sample_rate: int, target_length: int, backend: str):
    """Per clip: (valid values, their sum, their sum of squared deviations) of the fbank's first frames."""
    from sslam_fast.ops import kaldi_fbank
    from sslam_fast.reference.kaldi_fbank import FrameParams

    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.int64)
    x = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        x[i, : w.numel()] = w
    feats = kaldi_fbank(x, lengths, sample_rate=sample_rate, num_mel_bins=MEL_BINS, backend=backend).double()
    p = FrameParams.at(sample_rate)
    frames = torch.tensor([min(p.num_frames(n), target_length) for n in lengths.tolist()])
    feats = feats[:, :target_length]
    counts = frames * MEL_BINS
    sums = feats.sum(dim=(1, 2))  # frames past a row's own are 0
    means = sums / counts
    valid = (torch.arange(feats.shape[1]) < frames[:, None]).unsqueeze(-1)
    m2 = torch.where(valid, feats - means[:, None, None], 0.0).square().sum(dim=(1, 2))
    return counts.tolist(), means.tolist(), m2.tolist()


def compute_stats(source: str | os.PathLike, *, clips: int = 2000, seed: int = 0, target_length: int = 1024,
                  sample_rate: int = 16000, workers: int | None = None, batch_size: int = 32,
                  backend: str = "auto") -> NormStats:
    """The statistics of ``clips`` clips of ``source`` (a manifest or a folder) drawn with ``seed``; see the module
    docstring. Raises :class:`DataError` for an unusable source or when no clip can be used, ``ValueError`` for bad
    arguments."""
    from sslam_fast.reference.kaldi_fbank import FrameParams

    for name, value, low in (("clips", clips, 1), ("target_length", target_length, 1), ("batch_size", batch_size, 1),
                             ("sample_rate", sample_rate, 200)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    t0 = time.perf_counter()
    files = source_files(source)
    chosen = [files[i] for i in sample_files(len(files), clips, seed)]
    p = FrameParams.at(sample_rate)
    keep = (target_length - 1) * p.frame_shift + p.frame_length  # the samples the first target_length frames read
    per_clip = target_length * MEL_BINS
    groups: list[_Moments] = []
    pooled, valid = _Moments(), _Moments()
    bad: list[tuple[str, str]] = []
    used = 0
    batches = [chosen[k:k + batch_size] for k in range(0, len(chosen), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(batch):
            return [(f, pool.submit(_load, f, sample_rate, keep, p.frame_length)) for f in batch]

        pending = [submit(b) for b in batches[:2]]
        for k in range(len(batches)):
            loaded = [(f, fut.result()) for f, fut in pending.pop(0)]
            if k + 2 < len(batches):
                pending.append(submit(batches[k + 2]))
            bad.extend((str(f), r) for f, r in loaded if isinstance(r, str))
            waves = [r for _, r in loaded if not isinstance(r, str)]
            if not waves:
                continue
            for n, mean, m2 in zip(*_batch_moments(waves, sample_rate, target_length, backend)):
                valid.add(n, mean, m2)
                clip = _Moments()  # the clip with its zero rows: the valid block merged with a block of zeros
                clip.add(n, mean, m2)
                clip.add(per_clip - n, 0.0, 0.0)
                pooled.add(clip.n, clip.mean, clip.m2)
                if used % UPSTREAM_BATCH == 0:
                    groups.append(_Moments())
                groups[-1].add(clip.n, clip.mean, clip.m2)
                used += 1
    if not used:
        first = f" (first: {bad[0][1]})" if bad else ""
        raise DataError(f"{source}: none of the {len(chosen)} sampled files could be used{first}")
    return NormStats(
        norm_mean=float(np.mean([g.mean for g in groups])), norm_std=float(np.mean([g.std() for g in groups])),
        pooled_mean=pooled.mean, pooled_std=pooled.std(), valid_mean=valid.mean, valid_std=valid.std(),
        clips=used, files=len(files), requested=clips, padded_share=1.0 - valid.n / pooled.n, seed=seed,
        target_length=target_length, sample_rate=sample_rate, seconds=time.perf_counter() - t0, bad=bad)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sslam_fast.stats", description=__doc__.split("\n")[0])
    p.add_argument("source", metavar="MANIFEST_OR_DIR", help="an upstream manifest (.tsv) or a folder of audio")
    p.add_argument("--clips", type=int, default=2000, help="clips to sample (default 2000; all when fewer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--target-length", type=int, default=1024, help="frames per clip after crop / pad (default 1024)")
    p.add_argument("--sample-rate", type=int, default=16000, help="rate the clips are resampled to (default 16000)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default min(8, CPUs))")
    p.add_argument("--json", action="store_true", help="also print a JSON line with every figure")
    args = p.parse_args(argv)
    try:
        stats = compute_stats(args.source, clips=args.clips, seed=args.seed, target_length=args.target_length,
                              sample_rate=args.sample_rate, workers=args.workers)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stats.bad:
        shown = "; ".join(reason for _, reason in stats.bad[:_SHOWN_BAD])
        print(f"stats: skipped {len(stats.bad)} unusable files: {shown}", file=sys.stderr)
    print(f"stats: {stats.clips} clips of {stats.files} in {stats.seconds:.1f} s; {100 * stats.padded_share:.1f} % of "
          f"the values are padding; unpadded frames alone: mean {stats.valid_mean:.3f}, std {stats.valid_std:.3f}",
          file=sys.stderr)
    print(stats.flags())
    if args.json:
        print(stats.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
