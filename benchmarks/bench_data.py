"""Loader throughput per DataLoader worker: folders, manifests, tar shards and HDF5 against upstream's per-clip path.

    python benchmarks/bench_data.py                     # 256 x 10 s clips at 16 kHz, 64 at 44.1 kHz (16-bit wav)
    python benchmarks/bench_data.py --clips 64 --no-write

Every source is read by one DataLoader worker process (``num_workers=1``, the trainer's other loader settings: batches
of ``--batch`` clips, ``collate``, prefetch 2, persistent workers so that the timed pass does not include the worker's
start-up), the main process only receiving the batches; the table gives clips/s of that worker (median of
``--passes`` timed passes after one warm pass, so the files are in the page cache: this measures the CPU, not the
file system) and from it the CPU cores one GPU needs to be fed 400 clips/s (``400 / clips per s``). In sslam_fast the
worker only reads and decodes (int16, resampled to 16 kHz, cropped / padded); fbank, masks and mixing run in the
training step on the device.

The baseline is what upstream's DataLoader worker does per clip in ``[E] data/raw_audio_dataset.py :
FileAudioDataset.__getitem__`` (+ ``MaeImageDataset``'s masks): ``soundfile.read`` (float32),
``torchaudio.functional.resample`` to 16 kHz, mean removal, ``torchaudio.compliance.kaldi.fbank`` with EAT's arguments,
pad to 1024 frames, normalise, and ``compute_block_mask_2d`` for 16 clones (``upstream_block_mask_2d`` of
bench_masks.py), the batch then concatenated by the collater; also one worker.

Sources, each holding the same clips: a folder of wav files (``AudioClipDataset(folder)``), an upstream manifest
(``AudioClipDataset(manifest)``), tar shards of the wav bytes (``python -m sslam_fast.shard``, ``ShardDataset``,
shuffle buffer 1000) and upstream's HDF5 layout (``<file>.h5/<name>`` manifest entries, int16 datasets with a
``sample_rate`` attribute, ``HDF5ClipDataset``); the shards also as FLAC. The 44.1 kHz rows add the resampling to the
worker's work, and one more row has shards written already resampled to 16 kHz (``--sample-rate 16000``), whose
worker decodes what the 16 kHz rows decode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_masks import upstream_block_mask_2d  # noqa: E402
from common import machine_line, write_section  # noqa: E402

from sslam_fast.data import (  # noqa: E402
    AudioClipDataset,
    HDF5ClipDataset,
    ResumableSampler,
    ShardCollate,
    ShardDataset,
    collate,
)
from sslam_fast.shard import write_shards  # noqa: E402

TARGET_RATE = 400  # clips/s one GPU consumes (the figure for ViT-B pretraining)
SECONDS = 10
CLIP = 16000 * SECONDS


def make_clips(folder: Path, n: int, sr: int, seed: int) -> list[Path]:
    """``n`` 10 s mono 16-bit wav files of band-limited noise with a few tones (not silence: codecs and fbank see
    realistic numbers)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    t = np.arange(SECONDS * sr) / sr
    import soundfile

    files = []
    for k in range(n):
        tones = sum(0.1 * np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 4000, 3))
        x = 0.05 * rng.standard_normal(t.shape) + tones
        files.append(folder / f"{k:05d}.wav")
        soundfile.write(files[-1], (x * 0.5 * 32767).astype(np.int16), sr, subtype="PCM_16")
    return files


def write_manifest(path: Path, root: Path, rels: list[str], n: int) -> Path:
    path.write_text(f"{root}\n" + "".join(f"{r}\t{n}\n" for r in rels))
    return path


def write_hdf5(root: Path, files: list[Path], sr: int, per_file: int = 100) -> Path:
    """Upstream's h5_format: datasets named like the wav files at the top level of ``k.h5``, a manifest of
    ``k.h5/<name>`` entries."""
    import h5py
    import soundfile

    rels = []
    for start in range(0, len(files), per_file):
        name = f"{start // per_file}.h5"
        with h5py.File(root / name, "w") as f:
            for p in files[start:start + per_file]:
                ds = f.create_dataset(p.name, data=soundfile.read(p, dtype="int16")[0])
                ds.attrs["sample_rate"] = sr
                rels.append(f"{name}/{p.name}")
    return write_manifest(root / "train_h5.tsv", root, rels, SECONDS * sr)


class UpstreamClips(torch.utils.data.Dataset):
    """Upstream's per-clip worker path (see the module docstring): fbank features and masks of each clip."""

    def __init__(self, files: list[Path], clones: int = 16):
        self.files, self.clones = files, clones

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        import soundfile
        import torchaudio

        wav, sr = soundfile.read(str(self.files[i]), dtype="float32")
        x = torch.from_numpy(wav).float()
        if sr != 16000:
            x = torchaudio.functional.resample(x, orig_freq=sr, new_freq=16000)
        x = x - x.mean()
        fb = torchaudio.compliance.kaldi.fbank(x[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                                               window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
        n = fb.shape[0]
        fb = torch.nn.functional.pad(fb, (0, 0, 0, 1024 - n)) if n < 1024 else fb[:1024]
        return {"source": ((fb + 4.268) / (4.569 * 2))[None], "mask": upstream_block_mask_2d(self.clones)}


def upstream_collate(items: list[dict]) -> dict:
    return {"source": torch.stack([it["source"] for it in items]), "mask": torch.cat([it["mask"] for it in items])}


def loader_for(kind: str, src, files: list[Path], batch: int, sr: int) -> tuple[torch.utils.data.DataLoader, int]:
    """``(loader, clips per pass)`` of one source with one worker."""
    common = dict(num_workers=1, persistent_workers=True, prefetch_factor=2)
    if kind == "shards":
        ds = ShardDataset(src, CLIP)
        return torch.utils.data.DataLoader(ds, batch_size=batch, collate_fn=ShardCollate(ds), **common), len(files)
    if kind == "upstream":
        ds = UpstreamClips(files)
        return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=upstream_collate,
                                           **common), len(files)
    ds = HDF5ClipDataset(src, CLIP) if kind == "hdf5" else AudioClipDataset(src, CLIP)
    sampler = ResumableSampler(len(ds), batch_size=batch)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, **common), len(sampler) * batch


def one_pass(loader) -> float:
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def run(clips: int, clips_441: int, batch: int, passes: int, tmp: Path) -> list[str]:
    """The table rows. Per rate, every source's loader is warmed by one pass (worker start-up, page cache), then
    timed in ``passes`` interleaved rounds (one pass of each source per round), so that a load change on a shared
    machine hits every source alike; the median pass counts."""
    rows = ["| rate | source | clips/s per worker | ms per clip | cores per GPU at 400 clips/s | vs upstream |",
            "|---|---|---|---|---|---|"]
    for sr, n in ((16000, clips), (44100, clips_441)):
        if n <= 0:
            continue
        root = tmp / f"sr{sr}"
        files = make_clips(root / "wav", n, sr, seed=sr)
        manifest = write_manifest(root / "train.tsv", root / "wav", [p.name for p in files], SECONDS * sr)
        write_shards(manifest, root / "shards", 64, workers=2)
        write_shards(manifest, root / "shards_flac", 64, workers=2, fmt="flac")
        sources = [("upstream", "upstream per-clip path (read, resample, fbank, masks)", None),
                   ("folder", "folder (AudioClipDataset)", root / "wav"),
                   ("manifest", "manifest (AudioClipDataset)", manifest),
                   ("shards", "tar shards of the wav files (ShardDataset)", root / "shards"),
                   ("shards", "tar shards, FLAC (`--format flac`)", root / "shards_flac")]
        if sr != 16000:
            for fmt in ("wav", "flac"):
                write_shards(manifest, root / f"shards_16k_{fmt}", 64, workers=2, fmt=fmt, sample_rate=16000)
                sources.append(("shards", f"tar shards, resampled when written (`--format {fmt} --sample-rate "
                                f"16000`)", root / f"shards_16k_{fmt}"))
        try:
            sources.append(("hdf5", "HDF5, upstream layout (HDF5ClipDataset)", write_hdf5(root, files, sr)))
        except ImportError:
            print("h5py is not installed: no HDF5 row", file=sys.stderr)
        loaders = [loader_for(kind, src, files, batch, sr) for kind, _, src in sources]
        for loader, _ in loaders:
            one_pass(loader)
        times: list[list[float]] = [[] for _ in loaders]
        for _ in range(passes):
            for k, (loader, _) in enumerate(loaders):
                times[k].append(one_pass(loader))
        base = None
        for (_, label, _), (_, m), t in zip(sources, loaders, times):
            rate = m / statistics.median(t)
            base = base or rate
            rows.append(f"| {sr / 1000:g} kHz | {label} | {rate:.0f} | {1e3 / rate:.2f} | {TARGET_RATE / rate:.2f} | "
                        f"{rate / base:.1f}x |")
            print(rows[-1], flush=True)
        del loaders
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=256, help="10 s clips at 16 kHz (default 256)")
    parser.add_argument("--clips-441", type=int, default=64, help="10 s clips at 44.1 kHz (default 64; 0: none)")
    parser.add_argument("--batch", type=int, default=12, help="clips per batch (default 12, the trainer's)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per source (default 3)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    machine = machine_line()
    print(machine)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        rows = run(args.clips, args.clips_441, args.batch, args.passes, Path(tmp))
    load = f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print("\n".join(rows) + "\n" + load)
    if not args.no_write:
        body = (f"## Loader: clips/s per DataLoader worker ({args.clips} + {args.clips_441} x 10 s clips, cpu)\n\n"
                f"{machine}  \ncommand: `python benchmarks/bench_data.py`; one worker process, batches of "
                f"{args.batch}, median of {args.passes} interleaved passes after a warm one (files in the page "
                f"cache); {load}\n\n" + "\n".join(rows))
        write_section("bench_data_cpu", body)


if __name__ == "__main__":
    main()
