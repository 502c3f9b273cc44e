"""A small synthetic polyphonic sound-event set, generated once and cached on disk (the trainer's default data).

Each clip holds 2-4 overlapping events drawn from ten clearly distinct classes (:data:`CLASS_NAMES`) with random onsets,
durations and levels, over a little white background noise, saved as 16-bit PCM wav. The layout under ``root``::

    train/00000.wav ...        heldout/00000.wav ...
    manifest_train.tsv         manifest_heldout.tsv    (upstream format: root folder, then ``relpath<TAB>num_samples``)
    labels.tsv                 (``relpath<TAB>comma-separated class indices``)
    meta.json                  (the generation arguments: a cache whose arguments differ is regenerated)

Generation writes into a temporary sibling folder and renames it into place, so a crash never leaves a half set that
looks complete, and concurrent ranks generating the same set end up with one copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["CLASS_NAMES", "CLASS_BANDS", "DefaultSet", "make_default_dataset"]

_FORMAT_VERSION = 1

#: The ten event classes, in label-index order.
CLASS_NAMES = (
    "tone_low",  # harmonic tone, f0 110-220 Hz, 6 harmonics
    "tone_high",  # harmonic tone, f0 1200-1800 Hz, 3 harmonics
    "chirp_up",  # linear chirp 400 -> 2400 Hz over the event
    "chirp_down",  # linear chirp 2400 -> 400 Hz over the event
    "noise_low",  # noise burst band-limited to 60-400 Hz
    "noise_high",  # noise burst band-limited to 5000-7500 Hz
    "clicks",  # click train, 8-25 clicks/s
    "am_tone",  # pure 600-900 Hz tone, 100 % amplitude modulation at 3-8 Hz
    "sine_sweep",  # pure sine, exponential sweep 3000 -> 4500 Hz (narrow, upper-mid band)
    "square",  # band-limited square wave, 300-500 Hz (odd harmonics)
)

#: The band (Hz) where most of each class's energy lies (used by the tests to check that events are audible).
CLASS_BANDS = {
    "tone_low": (100, 1400),
    "tone_high": (1150, 5500),
    "chirp_up": (380, 2500),
    "chirp_down": (380, 2500),
    "noise_low": (50, 420),
    "noise_high": (4900, 7600),
    "clicks": (0, 8000),
    "am_tone": (550, 950),
    "sine_sweep": (2900, 4600),
    "square": (280, 4000),
}


@dataclass(frozen=True)
class DefaultSet:
    """Paths of a generated set and its class names. ``labels(split)`` -> ``(num_clips, 10)`` float32 multi-hot
    targets in the order of ``manifest_<split>.tsv``."""

    root: Path
    train_manifest: Path
    heldout_manifest: Path
    labels_path: Path
    class_names: tuple[str, ...] = CLASS_NAMES

    def manifest(self, split: str) -> Path:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        return self.train_manifest if split == "train" else self.heldout_manifest

    def labels(self, split: str) -> torch.Tensor:
        from .dataset import read_manifest

        _, entries = read_manifest(self.manifest(split))
        table = {}
        for line in self.labels_path.read_text().splitlines():
            if line.strip():
                rel, _, classes = line.partition("\t")
                table[rel] = [int(c) for c in classes.split(",") if c]
        out = torch.zeros(len(entries), len(self.class_names), dtype=torch.float32)
        for row, (rel, _) in enumerate(entries):
            if rel not in table:
                raise ValueError(f"{self.labels_path}: no labels for {rel}")
            out[row, table[rel]] = 1.0
        return out


def _event(cls: int, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One event of class ``cls``, ``n`` samples, peak-normalised to 1 (before the fade)."""
    t = np.arange(n, dtype=np.float64) / sr
    dur = n / sr
    name = CLASS_NAMES[cls]
    if name in ("tone_low", "tone_high"):
        f0, nh = (rng.uniform(110, 220), 6) if name == "tone_low" else (rng.uniform(1200, 1800), 3)
        k = np.arange(1, nh + 1)[:, None]
        x = (np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi, (nh, 1))) / k).sum(0)
    elif name in ("chirp_up", "chirp_down"):
        f_a, f_b = (400.0, 2400.0) if name == "chirp_up" else (2400.0, 400.0)
        x = np.sin(2 * np.pi * (f_a * t + 0.5 * (f_b - f_a) / dur * t * t))
    elif name in ("noise_low", "noise_high"):
        lo, hi = (60, 400) if name == "noise_low" else (5000, 7500)
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / sr)
        spec[(f < lo) | (f > hi)] = 0
        x = np.fft.irfft(spec, n)
    elif name == "clicks":
        rate = rng.uniform(8, 25)
        x = np.zeros(n)
        x[(np.arange(0, dur, 1 / rate) * sr).astype(np.int64)] = 1.0
        x = np.convolve(x, np.hanning(9), mode="same")  # 0.5 ms clicks, broadband
    elif name == "am_tone":
        f, fm = rng.uniform(600, 900), rng.uniform(3, 8)
        x = np.sin(2 * np.pi * f * t) * 0.5 * (1 - np.cos(2 * np.pi * fm * t))
    elif name == "sine_sweep":
        f_a, f_b = 3000.0, 4500.0
        k = np.log(f_b / f_a) / dur
        x = np.sin(2 * np.pi * f_a * (np.exp(k * t) - 1) / k)
    else:  # square
        f0 = rng.uniform(300, 500)
        k = np.arange(1, 16, 2)[:, None]
        x = (np.sin(2 * np.pi * f0 * k * t) / k).sum(0)
    peak = np.abs(x).max()
    x = x / peak if peak > 0 else x
    fade = min(n // 2, int(0.01 * sr))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        x[:fade] *= ramp
        x[n - fade:] *= ramp[::-1]
    return x


def _clip(n: int, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """A polyphonic clip of ``n`` samples and its sorted distinct class indices (2-4 events of distinct classes)."""
    num_events = int(rng.integers(2, 5))
    classes = sorted(rng.choice(len(CLASS_NAMES), size=num_events, replace=False).tolist())
    y = rng.standard_normal(n) * 10 ** (-50 / 20)  # -50 dBFS-rms background
    for cls in classes:
        length = int(rng.uniform(0.3, 0.8) * n)
        onset = int(rng.integers(0, n - length + 1))
        level = 10 ** (rng.uniform(-18, -8) / 20)
        y[onset:onset + length] += level * _event(cls, length, sr, rng)
    peak = np.abs(y).max()
    if peak > 0.95:
        y *= 0.95 / peak
    return y.astype(np.float32), classes


def _meta(train_clips, heldout_clips, seconds, sample_rate, seed) -> dict:
    return {"version": _FORMAT_VERSION, "train_clips": int(train_clips), "heldout_clips": int(heldout_clips),
            "seconds": float(seconds), "sample_rate": int(sample_rate), "seed": int(seed)}


def _paths(root: Path) -> DefaultSet:
    return DefaultSet(root=root, train_manifest=root / "manifest_train.tsv",
                      heldout_manifest=root / "manifest_heldout.tsv", labels_path=root / "labels.tsv")


def _is_cached(root: Path, meta: dict) -> bool:
    ds = _paths(root)
    if not all(p.is_file() for p in (ds.train_manifest, ds.heldout_manifest, ds.labels_path, root / "meta.json")):
        return False
    try:
        return json.loads((root / "meta.json").read_text()) == meta
    except (OSError, ValueError):
        return False


def _generate(tmp: Path, final_root: Path, meta: dict) -> None:
    import soundfile

    sr = meta["sample_rate"]
    n = int(round(meta["seconds"] * sr))
    label_lines = []
    for split, count, offset in (("train", meta["train_clips"], 0), ("heldout", meta["heldout_clips"], 1)):
        (tmp / split).mkdir()
        rng = np.random.default_rng([meta["seed"], offset])
        lines = [str(final_root)]
        for i in range(count):
            rel = f"{split}/{i:05d}.wav"
            y, classes = _clip(n, sr, rng)
            soundfile.write(str(tmp / rel), y, sr, subtype="PCM_16")
            lines.append(f"{rel}\t{n}")
            label_lines.append(f"{rel}\t{','.join(map(str, classes))}")
        (tmp / f"manifest_{split}.tsv").write_text("\n".join(lines) + "\n")
    (tmp / "labels.tsv").write_text("\n".join(label_lines) + "\n")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # last: its presence marks a complete set


def make_default_dataset(root: str | os.PathLike, *, train_clips: int = 256, heldout_clips: int = 128,
                         seconds: float = 2.56, sample_rate: int = 16000, seed: int = 0) -> DefaultSet:
    """Generate (once) the synthetic set under ``root`` and return its :class:`DefaultSet`.

    Reuses ``root`` when its manifests, labels and ``meta.json`` exist and the arguments match. Otherwise generates into
    a temporary sibling folder and renames it to ``root``; a stale set (one with a ``meta.json``) or an empty folder at
    ``root`` is replaced, any other existing ``root`` raises ``FileExistsError`` rather than being deleted.
    """
    for name, v in (("train_clips", train_clips), ("heldout_clips", heldout_clips)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if not isinstance(sample_rate, int) or sample_rate < 8000:
        raise ValueError(f"sample_rate must be an int >= 8000, got {sample_rate!r}")
    if not seconds > 0.1:
        raise ValueError(f"seconds must be > 0.1, got {seconds!r}")
    root = Path(root).absolute()
    meta = _meta(train_clips, heldout_clips, seconds, sample_rate, seed)
    if _is_cached(root, meta):
        return _paths(root)
    if root.exists() and not (root.is_dir() and (not any(root.iterdir()) or (root / "meta.json").exists())):
        raise FileExistsError(f"{root} exists and is not a synthetic set made by make_default_dataset; not touching it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _generate(tmp, root, meta)
        if root.exists():  # stale or empty: move aside, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            try:
                os.replace(root, old / "set")
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:  # another process renamed its copy in first
            if not _is_cached(root, meta):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)
