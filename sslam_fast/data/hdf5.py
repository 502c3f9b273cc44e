"""Training clips from HDF5 files laid out as upstream's ``h5_format`` reads them.

Upstream (``[E] data/raw_audio_dataset.py : FileAudioDataset.__getitem__`` with ``h5_format=True`` in ``train_mode``)
reads a manifest whose entries are ``<file>.h5/<clip name><TAB>num_samples`` (the root line first, as every upstream
manifest): the path up to the last ``/`` is the HDF5 file, the last component the name of a dataset at the file's top
level, read whole (``h5py.File(file)[name][:]``) as the 1-D waveform, at a fixed 32 kHz (``curr_sample_rate = 32000``),
then resampled to 16 kHz when ``downsr_16hz``. ``[S] data/raw_audio_dataset.py`` keeps the same code commented out.

:class:`HDF5ClipDataset` reads that layout (or every top-level dataset of one ``.h5`` / ``.hdf5`` file, or of the
files under a folder) into :class:`sslam_fast.data.AudioClipDataset`'s items. Differences from upstream, each where
upstream has no answer: a ``sample_rate`` attribute of the dataset or the file overrides the 32 kHz; integer samples
are scaled to [-1, 1] (int16 by 1/32768, as soundfile reads 16-bit PCM; upstream would feed raw integers to the
fbank); a 2-D dataset ``(samples, channels)`` is averaged over channels (upstream ``postprocess``: ``mean(-1)``)
before resampling (ALGORITHM §11.8). A missing dataset, an unreadable file or a clip with non-finite or too few
samples is ``None`` and recorded in ``bad_files``, like a bad file. Needs ``h5py`` (``pip install h5py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .dataset import MIN_SAMPLES, DataError, read_manifest
from .shards import _crop_start, clip_item

__all__ = ["H5_EXTENSIONS", "HDF5ClipDataset", "is_hdf5_source"]

H5_EXTENSIONS = (".h5", ".hdf5")
#: The rate upstream assumes for every clip of an HDF5 file.
UPSTREAM_H5_RATE = 32000


def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError("HDF5 input needs the h5py package: pip install h5py") from None
    return h5py


def _entry_split(rel: str) -> tuple[str, str] | None:
    """``"10.h5/clip.wav"`` -> ``("10.h5", "clip.wav")``; None when no path component before the last ``/`` is an
    HDF5 file."""
    head, sep, name = rel.rpartition("/")
    if not sep or not name or not head.lower().endswith(H5_EXTENSIONS):
        return None
    return head, name


def is_hdf5_source(data: str) -> bool:
    """Whether ``--data`` names HDF5 audio: an ``.h5`` / ``.hdf5`` file, a folder holding such files (top level), or
    a manifest whose first entry is ``<file>.h5/<name>``."""
    if not data:
        return False
    p = Path(data)
    if p.is_file() and p.suffix.lower() in H5_EXTENSIONS:
        return True
    if p.is_dir():
        return any(f.suffix.lower() in H5_EXTENSIONS for f in p.iterdir() if f.is_file())
    if p.is_file():
        try:
            with open(p, encoding="utf-8") as f:
                f.readline()
                first = f.readline()
        except (OSError, UnicodeDecodeError):
            return False
        return bool(first.strip()) and _entry_split(first.split("\t")[0].strip()) is not None
    return False


def _top_level(path: Path) -> list[str]:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            return sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset))
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None


def _entries(source: Path) -> list[tuple[Path, str]]:
    if source.is_dir():
        files = sorted((f for f in source.rglob("*") if f.is_file() and f.suffix.lower() in H5_EXTENSIONS),
                       key=lambda f: f.relative_to(source).as_posix())
        if not files:
            raise DataError(f"source {source}: the folder holds no .h5 / .hdf5 files")
        return [(f, k) for f in files for k in _top_level(f)]
    if source.is_file() and source.suffix.lower() in H5_EXTENSIONS:
        return [(source, k) for k in _top_level(source)]
    if not source.is_file():
        raise DataError(f"source {source}: no such manifest, HDF5 file or folder")
    root, rows = read_manifest(source)
    out = []
    for rel, _ in rows:
        split = _entry_split(rel)
        if split is None:
            raise DataError(f"manifest {source}: entry {rel!r} is not '<file>.h5/<dataset name>' (upstream h5_format)")
        out.append((root / split[0], split[1]))
    return out


class HDF5ClipDataset(torch.utils.data.Dataset):
    """Fixed-length clips from HDF5 audio (see the module docstring for the layout): ``ds[i]`` ->
    ``{"audio": (clip_samples,) int16 or float32, "length", "index": i}`` or ``None`` for a bad clip, cropped at
    ``numpy.random.default_rng([seed, epoch, i])`` exactly as :class:`sslam_fast.data.AudioClipDataset` crops.
    ``h5_sample_rate`` is the rate of a dataset without a ``sample_rate`` attribute (upstream: 32000). Files are
    opened on first use in each process and kept open."""

    def __init__(self, source: str | os.PathLike, clip_samples: int, *, sample_rate: int = 16000,
                 h5_sample_rate: int = UPSTREAM_H5_RATE, random_crop: bool = True, seed: int = 0,
                 as_int16: bool = True):
        if not isinstance(clip_samples, int) or clip_samples < MIN_SAMPLES:
            raise ValueError(f"clip_samples must be an int >= {MIN_SAMPLES}, got {clip_samples!r}")
        for name, v in (("sample_rate", sample_rate), ("h5_sample_rate", h5_sample_rate)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.entries = _entries(Path(source))
        if not self.entries:
            raise DataError(f"source {source}: no datasets in its HDF5 file(s)")
        self.clip_samples, self.sample_rate, self.h5_sample_rate = clip_samples, sample_rate, h5_sample_rate
        self.random_crop, self.seed, self.as_int16 = random_crop, int(seed), as_int16
        self.epoch = 0
        self.bad_files: list[tuple[str, str]] = []
        self._files: dict[Path, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def path(self, i: int) -> str:
        f, name = self.entries[i]
        return f"{f}/{name}"

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}  # open h5py files do not cross process boundaries

    def _file(self, path: Path):
        if self._pid != os.getpid():  # a forked worker: the parent's handles are not ours
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = _h5py().File(path, "r")
        return f

    def _bad(self, i: int, reason: str):
        self.bad_files.append((self.path(i), reason))
        return None

    def __getitem__(self, i: int):
        path, name = self.entries[i]
        try:
            f = self._file(path)
            if name not in f:
                return self._bad(i, f"no dataset {name!r} in {path}")
            ds = f[name]
            sr = int(ds.attrs.get("sample_rate", f.attrs.get("sample_rate", self.h5_sample_rate)))
            kind = ds.dtype.kind
            if kind not in "fi" or ds.ndim not in (1, 2) or ds.shape[0] == 0:
                return self._bad(i, f"not audio: a {ds.ndim}-D {ds.dtype} dataset of shape {ds.shape}")
            c = self.clip_samples
            if ds.ndim == 1 and sr == self.sample_rate and ds.shape[0] >= MIN_SAMPLES:
                # at the target rate, only the cropped span is read: the same numbers as cropping the whole clip
                n = ds.shape[0]
                start = _crop_start(n, c, i, random_crop=self.random_crop, seed=self.seed, epoch=self.epoch)
                x = ds[start:start + c]
                if kind == "i" and x.dtype.itemsize == 2 and self.as_int16:
                    x = torch.from_numpy(np.ascontiguousarray(x))
                    length = x.shape[0]
                    return {"audio": torch.nn.functional.pad(x, (0, c - length)), "length": length, "index": int(i)}
            else:
                x = ds[()]
        except (OSError, KeyError, ValueError, TypeError, DataError) as e:
            return self._bad(i, f"cannot read: {type(e).__name__}: {e}")
        x = x.astype(np.float32) / np.float32(2 ** (8 * x.dtype.itemsize - 1)) if kind == "i" else x.astype(np.float32)
        if x.ndim == 2:
            x = x.mean(axis=1, dtype=np.float32)
        if not np.isfinite(x).all():
            return self._bad(i, "the audio holds NaN or infinite samples")
        try:
            return clip_item(x, sr, i, clip_samples=c, sample_rate=self.sample_rate, random_crop=self.random_crop,
                             seed=self.seed, epoch=self.epoch, as_int16=self.as_int16)
        except ValueError as e:
            return self._bad(i, str(e))
