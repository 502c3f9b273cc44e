"""Upstream manifests (and fine-tuning label files) from a folder of audio.

    python -m sslam_fast.manifest DIR --out train.tsv [--valid-percent P] [--seed S] [--ext wav,flac,...]
        [--workers N] [--labels folder|SEGMENTS_CSV] [--class-labels class_labels_indices.csv]

The manifest is fairseq's (``[F] examples/wav2vec/wav2vec_manifest.py : main``): the first line is the real path of
``DIR``, then one ``relative/path<TAB>num_samples`` line per file, ``num_samples`` being the frame count at the file's
own rate as ``soundfile.info`` reports it. The files are those below ``DIR`` (recursively) whose extension is in
``--ext`` (default: every extension of ``sslam_fast.audio.AUDIO_EXTENSIONS``), sorted by relative path; only their
headers are read, by a pool of ``--workers`` threads, so a corpus of millions of files is listed quickly.

``--valid-percent P`` moves a share of the files into ``valid.tsv`` beside ``--out``. As in fairseq, ``P`` is a
fraction in [0, 1] (0.01 = 1 %). A file goes to the valid set when a hash of ``(seed, relative path)`` falls below
``P``: the split depends only on the seed and the file's own path, so it is the same on every run and a file keeps its
side when others are added or removed.

Files that cannot be used are skipped: unreadable or not audio (``soundfile.info`` fails), no samples, a path the
manifest format cannot hold (a tab or a line break in it), and, with an AudioSet segments CSV, files it has no row for.
stderr gets their count and the first names; ``<out>.bad.txt`` lists them all, ``relative/path<TAB>reason`` (an old
one is removed when nothing is skipped).

``--labels`` writes what ``sslam_fast.finetune.data.load_labelled`` and upstream's fine-tuning read (``[E]
tasks/finetuning.py : MaeImageClassificationTask.load_labels``): a ``.lbl`` beside each ``.tsv`` (``train.lbl``,
``valid.lbl``), one ``clip_id<TAB>mid,mid,...`` line per manifest entry in the same order, and
``label_descriptors.csv`` (``index,mid,display_name``, no header) in the folder of ``--out``.

* ``--labels folder``: a file's label is the name of the folder holding it (``DIR/<label>/.../x.wav``: the innermost
  one); the clip id is the file name without extension; the classes are the folder names sorted, written as
  ``index,name,name``.
* ``--labels SEGMENTS_CSV``: AudioSet's segments CSV (``YTID, start_seconds, end_seconds, positive_labels``, ``#``
  comment lines, the labels a quoted comma list). A file belongs to the YouTube id its name starts with, bare
  (``<YTID>...``) or behind a ``Y`` (``Y<YTID>...``, the common download layout); an id is 11 characters. The clip id
  is the YouTube id. The classes are every mid of the CSV, sorted, written as ``index,mid,mid``.
* ``--class-labels CSV`` (AudioSet's ``class_labels_indices.csv`` or any ``index,mid,display_name`` file) takes the
  classes, their order and names from that file instead; every label met must then be one of its mids (a folder name
  may also be a display name, and is written to the ``.lbl`` as its mid).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sslam_fast._files import write_text_atomic
from sslam_fast.audio import AUDIO_EXTENSIONS, list_audio
from sslam_fast.data import DataError

__all__ = ["ManifestResult", "main", "parse_extensions", "read_segments", "scan_audio", "write_manifest"]

LABEL_CSV_NAME = "label_descriptors.csv"  # upstream's name for the labels CSV beside the manifests
YTID_LENGTH = 11
_SHOWN_BAD = 5  # names printed on stderr; the rest are in <out>.bad.txt
_CHUNK = 256  # files per thread-pool task


@dataclass
class ManifestResult:
    """What :func:`write_manifest` wrote: the manifests and label files, the entry counts and the skipped files."""

    root: Path
    train: Path
    valid: Path | None
    train_entries: list[tuple[str, int]]
    valid_entries: list[tuple[str, int]]
    bad: list[tuple[str, str]] = field(default_factory=list)
    bad_list: Path | None = None
    label_files: list[Path] = field(default_factory=list)


def parse_extensions(spec: str | Iterable[str] | None) -> frozenset[str]:
    """``"wav,flac"`` / ``["wav", ".FLAC"]`` -> ``{".wav", ".flac"}``; None or ``""`` -> every audio extension."""
    if spec is None or spec == "":
        return AUDIO_EXTENSIONS
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        ext = str(item).strip().lower()
        if not ext:
            continue
        ext = ext if ext.startswith(".") else "." + ext
        if len(ext) < 2 or any(c in ext[1:] for c in "./\\ \t"):
            raise ValueError(f"--ext: {item!r} is not a file extension (expected e.g. wav,flac)")
        out.add(ext)
    if not out:
        raise ValueError(f"--ext names no extension: {spec!r}")
    return frozenset(out)


def _probe(path: Path) -> tuple[int, str]:
    """``(frames, "")`` for a usable file, ``(0, reason)`` otherwise; reads only the header."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the damage
        return 0, f"cannot read audio ({type(e).__name__}: {' '.join(str(e).split()) or 'unknown format'})"
    if info.samplerate <= 0:
        return 0, f"invalid sample rate {info.samplerate}"
    if info.frames <= 0:
        return 0, "no audio samples"
    return int(info.frames), ""


def scan_audio(root: str | os.PathLike, *, extensions: str | Iterable[str] | None = None,
               workers: int | None = None) -> tuple[Path, list[tuple[str, int]], list[tuple[str, str]]]:
    """Every audio file below ``root`` -> ``(real root, [(relpath, num_samples)], [(relpath, reason)])``.

    ``extensions`` selects the files (:func:`parse_extensions`); the headers are read by ``workers`` threads (default
    ``min(32, 4 x CPUs)``). Both lists are sorted by relative path (``/``-separated). Raises :class:`DataError` when
    ``root`` is not a folder."""
    root_in = Path(root)
    if not root_in.is_dir():
        raise DataError(f"{root_in}: no such folder")
    exts = parse_extensions(extensions)
    workers = _check_workers(workers)
    base = Path(os.path.realpath(root_in))
    audio, other = list_audio(base, return_skipped=True)
    files = sorted((f for f in audio + other if f.suffix.lower() in exts), key=lambda f: f.relative_to(base).as_posix())
    problem = _path_problem(str(base))
    if problem:
        raise DataError(f"{root_in}: the folder's path {problem}")
    good, bad = [], []
    rels = [f.relative_to(base).as_posix() for f in files]
    problems = [_path_problem(rel) for rel in rels]
    probe = [f for f, why in zip(files, problems) if not why]
    chunks = [probe[k:k + _CHUNK] for k in range(0, len(probe), _CHUNK)]  # a few thousand tasks for millions of files
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = iter([r for part in pool.map(_probe_many, chunks) for r in part])
    for rel, why in zip(rels, problems):
        if why:
            bad.append((_printable(rel), f"the path {why}"))
            continue
        frames, reason = next(results)
        (bad.append((rel, reason)) if reason else good.append((rel, frames)))
    return base, good, bad


def _probe_many(paths: list[Path]) -> list[tuple[int, str]]:
    return [_probe(p) for p in paths]


def _path_problem(path: str) -> str:
    """Why a path cannot be a manifest line (a tab, a line break, not UTF-8), or ``""``."""
    if any(c in path for c in "\t\n\r"):
        return "holds a tab or line break, which a manifest line cannot"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8, which a manifest (a UTF-8 text file) cannot hold"
    return ""


def _printable(path: str) -> str:
    return path.encode("utf-8", "backslashreplace").decode("utf-8").replace("\t", "\\t").replace(
        "\n", "\\n").replace("\r", "\\r")


def _check_workers(workers: int | None) -> int:
    if workers is None:
        return min(32, 4 * (os.cpu_count() or 1))
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    return workers


def _is_valid(rel: str, seed: int, fraction: float) -> bool:
    """The file's side of the split: a 64-bit hash of ``(seed, relpath)`` as a number in [0, 1), below ``fraction``."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}\0{rel}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


# --- labels ----------------------------------------------------------------------------------------------------------


def read_segments(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{YTID: [mid, ...]}`` from an AudioSet segments CSV (``YTID, start_seconds, end_seconds, positive_labels``;
    ``#`` lines are comments). An id listed twice gets the union of its labels. Raises :class:`DataError` naming the
    line of a malformed row, or when the file lists no segment."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"segments CSV {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"segments CSV {path} is not a text file") from None
    out: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        row = next(csv.reader([line], skipinitialspace=True))
        if len(row) != 4:
            raise DataError(f"segments CSV {path} line {lineno}: expected 'YTID, start_seconds, end_seconds, "
                            f"\"mid,mid,...\"', got {line!r}")
        ytid = row[0].strip()
        if len(ytid) != YTID_LENGTH:
            raise DataError(f"segments CSV {path} line {lineno}: {ytid!r} is not an {YTID_LENGTH}-character "
                            f"YouTube id")
        mids = out.setdefault(ytid, [])
        for mid in (m.strip() for m in row[3].split(",")):
            if mid and mid not in mids:
                mids.append(mid)
    if not out:
        raise DataError(f"segments CSV {path} lists no segment")
    return out


def _ytid_of(rel: str, table: dict[str, list[str]]) -> str | None:
    """The YouTube id a file name starts with (``<YTID>...`` or ``Y<YTID>...``), if the segments table has it."""
    stem = Path(rel).stem
    candidates = [stem[:YTID_LENGTH]]
    if stem.startswith("Y"):
        candidates.append(stem[1:YTID_LENGTH + 1])
    found = [c for c in candidates if len(c) == YTID_LENGTH and c in table]
    exact = [c for c in found if stem in (c, "Y" + c)]
    return (exact or found or [None])[0]


@dataclass
class _Labels:
    """Per-file labels (the clip id and the mids) and the classes of ``label_descriptors.csv``."""

    rows: dict[str, tuple[str, list[str]]]  # relpath -> (clip id, mids)
    classes: list[tuple[str, str]]  # (mid, display name) by index


def _class_table(class_labels: str | os.PathLike) -> tuple[list[tuple[str, str]], dict[str, str]]:
    from sslam_fast.finetune.data import read_label_csv

    mids, names = read_label_csv(class_labels)
    lookup = {m: m for m in mids}
    for m, n in zip(mids, names):
        lookup.setdefault(n, m)
    return list(zip(mids, names)), lookup


def _folder_labels(entries: list[tuple[str, int]], root: Path, class_labels) -> _Labels:
    rows = {}
    for rel, _ in entries:
        parts = rel.split("/")
        if len(parts) < 2:
            raise DataError(f"{root / rel}: with --labels folder each file must lie in a class folder "
                            f"(DIR/<label>/.../file), this one lies in DIR itself")
        label = parts[-2]
        if "," in label:
            raise DataError(f"{root / rel}: the class folder name {label!r} holds a comma, which separates labels in "
                            f"a .lbl file; rename the folder")
        rows[rel] = (Path(rel).stem, [label])
    if class_labels:
        classes, lookup = _class_table(class_labels)
        for rel, (clip, (label,)) in rows.items():
            if label not in lookup:
                raise DataError(f"{root / rel}: the class folder {label!r} is neither a mid nor a display name of "
                                f"{class_labels}")
            rows[rel] = (clip, [lookup[label]])
    else:
        classes = [(name, name) for name in sorted({r[1][0] for r in rows.values()})]
    return _Labels(rows, classes)


def _segment_labels(entries: list[tuple[str, int]], segments: str | os.PathLike, class_labels,
                    bad: list[tuple[str, str]]) -> tuple[list[tuple[str, int]], _Labels]:
    """Labels from an AudioSet segments CSV; files it has no row for move from ``entries`` to ``bad``."""
    table = read_segments(segments)
    rows, kept = {}, []
    for rel, n in entries:
        ytid = _ytid_of(rel, table)
        if ytid is None:
            bad.append((rel, f"no row in the segments CSV {Path(segments).name} (the name must start with the "
                             f"YouTube id, or Y and the id)"))
            continue
        rows[rel] = (ytid, table[ytid])
        kept.append((rel, n))
    if class_labels:
        classes, lookup = _class_table(class_labels)
        known = {m for m, _ in classes}
        for rel, (_, mids) in rows.items():
            for mid in mids:
                if mid not in known:
                    raise DataError(f"segments CSV {segments}: label {mid!r} (of {rel}) is not a mid of "
                                    f"{class_labels}")
    else:
        classes = [(m, m) for m in sorted({m for mids in table.values() for m in mids})]
    bad.sort()
    return kept, _Labels(rows, classes)


# --- writing ---------------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _csv_line(*fields) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue()


def write_manifest(root: str | os.PathLike, out: str | os.PathLike, *, valid_percent: float = 0.0, seed: int = 0,
                   extensions: str | Iterable[str] | None = None, workers: int | None = None, labels: str = "",
                   class_labels: str | os.PathLike = "") -> ManifestResult:
    """Scan ``root`` and write ``out`` (and ``valid.tsv``, the label files, ``<out>.bad.txt``) as the module
    docstring describes; ``labels`` is ``""``, ``"folder"`` or the path of a segments CSV. Raises :class:`DataError`
    when nothing usable is found or a label source does not fit, ``ValueError`` for bad arguments."""
    out = Path(out)
    if not 0.0 <= valid_percent <= 1.0:
        raise ValueError(f"valid_percent is a fraction in [0, 1] as in fairseq's wav2vec_manifest.py (0.01 = 1 %), "
                         f"got {valid_percent!r}")
    if out.suffix != ".tsv":
        raise ValueError(f"--out must name a .tsv file, got {out}")
    valid = out.with_name("valid.tsv") if valid_percent > 0 else None
    if valid is not None and valid.name == out.name:
        raise ValueError(f"--out {out}: the valid split is written to valid.tsv beside it; name the output "
                         f"differently (e.g. train.tsv)")
    if class_labels and not labels:
        raise ValueError("--class-labels needs --labels (folder or a segments CSV)")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: the folder {out.parent} does not exist")
    base, entries, bad = scan_audio(root, extensions=extensions, workers=workers)
    if not entries and not bad:
        exts = ", ".join(sorted(parse_extensions(extensions)))
        raise DataError(f"{root}: no audio file below it (extensions {exts})")
    lab = None
    if labels == "folder":
        lab = _folder_labels(entries, base, class_labels)
    elif labels:
        entries, lab = _segment_labels(entries, labels, class_labels, bad)
    if not entries:
        raise DataError(f"{root}: none of its {len(bad)} audio files can be used (first: {bad[0][0]}: {bad[0][1]})")
    train_entries = [e for e in entries if not _is_valid(e[0], seed, valid_percent)]
    valid_entries = [e for e in entries if _is_valid(e[0], seed, valid_percent)]
    result = ManifestResult(root=base, train=out, valid=valid, train_entries=train_entries,
                            valid_entries=valid_entries, bad=bad)
    for path, part in ((out, train_entries), (valid, valid_entries)):
        if path is not None:
            _write_atomic(path, [str(base), *(f"{rel}\t{n}" for rel, n in part)])
    if lab is not None:
        for path, part in ((out, train_entries), (valid, valid_entries)):
            if path is not None:
                lbl = path.with_suffix(".lbl")
                _write_atomic(lbl, (f"{lab.rows[rel][0]}\t{','.join(lab.rows[rel][1])}" for rel, _ in part))
                result.label_files.append(lbl)
        csv_path = out.with_name(LABEL_CSV_NAME)
        _write_atomic(csv_path, (_csv_line(i, mid, name) for i, (mid, name) in enumerate(lab.classes)))
        result.label_files.append(csv_path)
    bad_list = out.with_name(out.name + ".bad.txt")
    if bad:
        _write_atomic(bad_list, (f"{rel}\t{reason}" for rel, reason in bad))
        result.bad_list = bad_list
    elif bad_list.exists():
        bad_list.unlink()
    return result


def _report(result: ManifestResult) -> None:
    n = len(result.train_entries) + len(result.valid_entries)
    split = f" ({len(result.train_entries)} train, {len(result.valid_entries)} valid)" if result.valid else ""
    written = ", ".join(str(p) for p in [result.train, result.valid, *result.label_files] if p is not None)
    print(f"manifest: {n} files{split} under {result.root} -> {written}", file=sys.stderr)
    for path, part in ((result.train, result.train_entries), (result.valid, result.valid_entries)):
        if path is not None and not part:
            print(f"manifest: warning: {path} lists no file (the split left none for it)", file=sys.stderr)
    if result.bad:
        shown = "; ".join(f"{rel}: {reason}" for rel, reason in result.bad[:_SHOWN_BAD])
        more = f" (all {len(result.bad)} in {result.bad_list})"
        print(f"manifest: skipped {len(result.bad)} files: {shown}{more}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sslam_fast.manifest", description=__doc__.split("\n")[0])
    p.add_argument("root", metavar="DIR", help="folder of audio files (walked recursively)")
    p.add_argument("--out", required=True, help="the manifest to write, e.g. DEST/train.tsv")
    p.add_argument("--valid-percent", type=float, default=0.0,
                   help="fraction in [0, 1] of the files for DEST/valid.tsv, as fairseq (0.01 = 1 %%; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train / valid split (default 0)")
    p.add_argument("--ext", default="", help="comma-separated extensions to include (default: every audio one)")
    p.add_argument("--workers", type=int, default=None, help="threads reading headers (default min(32, 4 x CPUs))")
    p.add_argument("--labels", default="",
                   help="'folder' (parent folder name) or an AudioSet segments CSV: also write .lbl files and "
                        f"{LABEL_CSV_NAME}")
    p.add_argument("--class-labels", default="", help="index,mid,display_name CSV giving the classes (with --labels)")
    args = p.parse_args(argv)
    try:
        result = write_manifest(args.root, args.out, valid_percent=args.valid_percent, seed=args.seed,
                                extensions=args.ext, workers=args.workers, labels=args.labels,
                                class_labels=args.class_labels)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    _report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
