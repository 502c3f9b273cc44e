"""Write a manifest's or a folder's audio into tar shards in the WebDataset layout, for ``train.py --data=DIR``.

    python -m sslam_fast.shard train.tsv --out shards/ --shard-size 1000 [--workers 8] [--shuffle --seed 0]
                              [--format copy|flac|wav] [--sample-rate 16000] [--overwrite]

Per clip, in source order (``--shuffle``: the order ``numpy.random.default_rng(seed).permutation``), two members of
``shard-000000.tar``, ``shard-000001.tar``, ...: ``<key>.<ext>`` and ``<key>.json``, the key being the clip's
nine-digit number among the written clips. ``--format copy`` (default) stores the file's bytes under its own extension;
``flac`` re-encodes losslessly (8-, 16- and 24-bit PCM; other sample formats are kept as they are); ``wav`` stores
the decoded samples as WAV of the same sample format (compressed formats as float). ``--sample-rate 16000`` (with
``flac`` or ``wav``) stores instead what the trainer's loader makes of each file before cropping: the channel average,
resampled with torchaudio, x32768 to 16-bit (``sslam_fast.data.shards.clip_item``), so that resampling is paid once
when writing rather than in every epoch, with the same numbers. The JSON holds ``path`` (relative to the manifest's
root or the folder), ``num_samples`` and ``sample_rate`` of the stored audio (with ``--sample-rate`` also
``source_sample_rate``), and, when a ``.lbl`` file
(upstream's ``clip_id<TAB>mid,mid,...``, one line per manifest entry) lies beside the manifest, ``clip_id`` and
``labels`` (the list of mids). Shards are written under a temporary name and renamed when complete; ``shards.json``
(shard names, clip counts, total, the arguments) is written last, so a folder with it is a complete set.

Every file is decoded in full by ``--workers`` processes before it is stored: a file soundfile cannot read, one with
no samples or with NaN / infinite samples is skipped and reported (``skipped.tsv``: path and reason). Tar headers
carry no time or owner, so the same input and arguments give byte-identical shards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslam_fast._files import write_text_atomic
from sslam_fast.audio import AUDIO_EXTENSIONS, list_audio
from sslam_fast.data.dataset import DataError, read_manifest

__all__ = ["ShardReport", "main", "write_shards"]

FORMATS = ("copy", "flac", "wav")
_FLAC_SUBTYPES = {"PCM_S8": "int16", "PCM_U8": "int16", "PCM_16": "int16", "PCM_24": "int32"}
_WAV_DTYPES = {"PCM_S8": "int16", "PCM_U8": "int16", "PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32",
               "FLOAT": "float32", "DOUBLE": "float64"}


@dataclass
class ShardReport:
    """What :func:`write_shards` did: the shards (names, clip counts), the clips written and the skipped files."""

    out: Path
    shards: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def clips(self) -> int:
        return sum(n for _, n in self.shards)


def _entries(source: Path) -> tuple[Path, list[str], list[tuple[str, list[str]] | None]]:
    """``(root, relative paths, labels)`` of a manifest (labels from the ``.lbl`` beside it) or a folder."""
    if source.is_dir():
        files = list_audio(source)
        if not files:
            raise DataError(f"source {source}: the folder holds no audio files")
        rels = [f.relative_to(source).as_posix() for f in files]
        return source, rels, [None] * len(rels)
    if not source.is_file():
        raise DataError(f"source {source}: no such manifest or folder")
    if source.suffix.lower() in AUDIO_EXTENSIONS:
        return source.parent, [source.name], [None]
    root, entries = read_manifest(source)
    rels = [rel for rel, _ in entries]
    labels: list = [None] * len(rels)
    lbl = source.with_suffix(".lbl")
    if lbl.is_file():
        lines = [ln for ln in lbl.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(lines) != len(rels):
            raise DataError(f"label file {lbl} has {len(lines)} lines, its manifest {source} {len(rels)} entries")
        labels = []
        for ln in lines:
            parts = ln.split()
            labels.append((parts[0], parts[1].split(",") if len(parts) > 1 else []))
    return root, rels, labels


def _encode(data: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


def _resampled(raw: bytes, rate: int, fmt: str) -> tuple[bytes, int, int]:
    """``(encoded 16-bit mono audio at rate, its samples, the file's rate)``: the loader's decoding before the crop."""
    import soundfile
    import torch
    import torchaudio

    data, sr = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    x = torch.from_numpy(data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0].copy())
    if sr != rate:
        x = torchaudio.functional.resample(x, orig_freq=sr, new_freq=rate)
    x16 = (x * 32768.0).round().clamp_(-32768, 32767).to(torch.int16).numpy()
    return _encode(x16, rate, "FLAC" if fmt == "flac" else "WAV", "PCM_16"), int(x16.shape[0]), int(sr)


def _prepare(task) -> tuple:
    """One clip, in a worker: ``(ext, bytes, meta, None)`` or ``(None, None, None, reason)``."""
    import soundfile

    path, rel, labels, fmt, rate = task
    try:
        raw = Path(path).read_bytes()
        with soundfile.SoundFile(io.BytesIO(raw)) as f:
            sr, subtype = f.samplerate, f.subtype
            check = f.read(dtype="float32", always_2d=True)
        if check.size == 0:
            return None, None, None, "the file has no audio samples"
        if not np.isfinite(check).all():
            return None, None, None, "the audio holds NaN or infinite samples"
        ext = Path(rel).suffix.lower()[1:]
        meta = {"path": rel, "num_samples": int(check.shape[0]), "sample_rate": int(sr)}
        if rate is not None:
            raw, n, _ = _resampled(raw, rate, fmt)
            ext = fmt
            meta.update(num_samples=n, sample_rate=rate, source_sample_rate=int(sr))
        elif fmt == "flac" and subtype in _FLAC_SUBTYPES and ext != "flac":
            data, _ = soundfile.read(io.BytesIO(raw), dtype=_FLAC_SUBTYPES[subtype], always_2d=True)
            raw, ext = _encode(data, sr, "FLAC", subtype), "flac"
        elif fmt == "wav" and ext != "wav":
            dtype = _WAV_DTYPES.get(subtype, "float32")
            data, _ = soundfile.read(io.BytesIO(raw), dtype=dtype, always_2d=True)
            raw, ext = _encode(data, sr, "WAV", subtype if subtype in _WAV_DTYPES else "FLOAT"), "wav"
        if not ext or "." in ext:
            ext = "wav"  # a file without a usable extension: soundfile reads it by its header anyway
        if labels is not None:
            meta["clip_id"], meta["labels"] = labels
        return ext, raw, meta, None
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the damage
        return None, None, None, f"cannot decode audio ({type(e).__name__}: {e})"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def write_shards(source: str | os.PathLike, out: str | os.PathLike, shard_size: int, *, workers: int = 1,
                 seed: int = 0, shuffle: bool = False, fmt: str = "copy", sample_rate: int | None = None,
                 overwrite: bool = False, progress=None) -> ShardReport:
    """Write the shards (see the module docstring) and return the :class:`ShardReport`. Raises :class:`DataError`
    for a bad source, an ``out`` that already holds shards (unless ``overwrite``) or no readable file at all."""
    if not isinstance(shard_size, int) or not 1 <= shard_size <= 1 << 20:
        raise ValueError(f"shard_size must be an int in [1, {1 << 20}], got {shard_size!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if sample_rate is not None and (not isinstance(sample_rate, int) or sample_rate < 1000 or fmt == "copy"):
        raise ValueError(f"sample_rate must be an int >= 1000 with format flac or wav, got {sample_rate!r} with "
                         f"format {fmt}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    source, out = Path(source), Path(out)
    root, rels, labels = _entries(source)
    order = np.random.default_rng(seed).permutation(len(rels)).tolist() if shuffle else range(len(rels))
    out.mkdir(parents=True, exist_ok=True)
    old = [p for p in out.iterdir() if p.name in ("shards.json", "skipped.tsv") or p.suffix == ".tar"]
    if old and not overwrite:
        raise DataError(f"{out} already holds shards ({old[0].name}, ...); pass --overwrite to replace them")
    for p in old:
        p.unlink()
    report = ShardReport(out)
    tasks = ((str(root / rels[i]), rels[i], labels[i], fmt, sample_rate) for i in order)
    pool = None
    if workers > 1:
        import multiprocessing

        # fork where there is one: the workers run soundfile and numpy only, and a spawned worker would re-import
        # the caller's main module
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers, initializer=_init_worker)
        results = pool.imap(_prepare, tasks, chunksize=4)
    else:
        results = map(_prepare, tasks)
    tf, tmp, written = None, None, 0
    try:
        for i, (ext, raw, meta, error) in zip(order, results):
            if error is not None:
                report.skipped.append((str(root / rels[i]), error))
                continue
            if tf is None:
                name = f"shard-{len(report.shards):06d}.tar"
                tmp = out / f".{name}.tmp"
                tf = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
                report.shards.append((name, 0))
            key = f"{written:09d}"
            _add(tf, f"{key}.{ext}", raw)
            _add(tf, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            written += 1
            name, n = report.shards[-1]
            report.shards[-1] = (name, n + 1)
            if n + 1 == shard_size:
                tf.close()
                os.replace(tmp, out / name)
                tf = None
                if progress is not None:
                    progress(report)
        if tf is not None:
            tf.close()
            os.replace(tmp, out / report.shards[-1][0])
            tf = None
    finally:
        if tf is not None:
            tf.close()
            tmp.unlink(missing_ok=True)
        if pool is not None:
            pool.terminate()
    if report.skipped:
        lines = "".join(f"{p}\t{' '.join(r.split())}\n" for p, r in report.skipped)
        (out / "skipped.tsv").write_text(lines, encoding="utf-8")
    if not report.shards:
        raise DataError(f"{source}: none of its {len(rels)} file(s) could be read; see {out / 'skipped.tsv'}")
    _write_json(out / "shards.json", {
        "format": "webdataset", "shards": [{"name": n, "clips": c} for n, c in report.shards],
        "total": report.clips, "source": str(source), "shard_size": shard_size, "shuffle": shuffle, "seed": seed,
        "audio": fmt, "sample_rate": sample_rate, "skipped": len(report.skipped)})
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sslam_fast.shard", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="an upstream manifest (.tsv) or a folder of audio files")
    parser.add_argument("--out", required=True, help="the folder to write the shards into")
    parser.add_argument("--shard-size", type=int, default=1000, help="clips per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes reading and checking the files (default: min(8, CPU cores))")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --shuffle")
    parser.add_argument("--shuffle", action="store_true", help="write the clips in a seeded random order")
    parser.add_argument("--format", choices=FORMATS, default="copy", help="audio members: the file's bytes (copy), "
                        "FLAC or WAV (default copy)")
    parser.add_argument("--sample-rate", type=int, default=None, help="store each clip as the loader decodes it: "
                        "mono, resampled to this rate, 16-bit (needs --format flac or wav)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    args = parser.parse_args(argv)

    from sslam_fast._progress import progress_bar

    bar = progress_bar(None, desc="shards", unit="shard")  # drawn on a terminal only: a log gets the summary line

    def progress(rep: ShardReport) -> None:
        bar.update(1)
        bar.set_postfix(clips=rep.clips, skipped=len(rep.skipped), refresh=False)

    try:
        rep = write_shards(args.source, args.out, args.shard_size, workers=args.workers, seed=args.seed,
                           shuffle=args.shuffle, fmt=args.format, sample_rate=args.sample_rate,
                           overwrite=args.overwrite, progress=progress)
    except (DataError, ValueError, OSError) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar.close()
    for path, reason in rep.skipped[:10]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if len(rep.skipped) > 10:
        print(f"... and {len(rep.skipped) - 10} more", file=sys.stderr)
    note = ""
    if rep.skipped:
        note = f"; skipped {len(rep.skipped)} unreadable file(s), listed in {rep.out / 'skipped.tsv'}"
    print(f"wrote {rep.clips} clips in {len(rep.shards)} shards to {rep.out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
