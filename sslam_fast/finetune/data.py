"""Labelled clips for fine-tuning: upstream manifests with their label files, class folders, and the built-in set.

Three kinds of source, each giving a :class:`LabelledData` (files in a fixed order and their (N, C) targets):

* an upstream manifest ``<split>.tsv`` (fairseq format: the root folder, then ``relpath<TAB>num_samples`` lines) with
  the label file ``<split>.lbl`` beside it, one line per manifest entry in the same order, ``clip_id<TAB>mid,mid,...``
  (upstream splits the line on whitespace and reads the second field; the clip id is not used), and a labels CSV
  ``index,mid,display_name`` (``label_descriptors.csv`` beside the manifest, as upstream names it, or AudioSet's
  ``class_labels_indices.csv``, or ``labels=``). The class of a mid is the CSV's ``index`` column. This is the format
  of ``[E] tasks/finetuning.py : MaeImageClassificationTask.load_labels / load_dataset`` (multi-hot targets as
  ``[E] data/add_class_target_dataset.py : AddClassTargetDataset`` builds them); ``[S]
  SPASS_Finetune_LinearEval/SPASS_Create_Manifests/create_all_manifests_SPASS.py`` writes it.
* a class folder ``root/<label>/*.wav`` (single-label; the classes are the sub-folders holding audio, sorted by name,
  or the rows of ``labels=`` matched by mid or display name). ``fold=k`` splits it ESC-50-style: ``split="valid"`` is
  fold ``k``, ``split="train"`` the other folds, a file's fold being the ``fold`` column of ``root/meta/esc50.csv``
  when that file exists, else the number before the first ``-`` of its name (ESC-50's ``{fold}-{clip}-{take}-
  {target}.wav``).
* ``""``: the built-in synthetic polyphonic set (``sslam_fast.data.make_default_dataset``, generated once under
  ``synthetic_root``): ``split="train"`` is its ``train/`` part, ``"valid"`` its ``heldout/`` part.

A manifest names one split itself, so ``split`` does not apply to it; a class folder without ``fold`` gives all its
files for either split. Bad input raises :class:`~sslam_fast.data.DataError` naming the file (and line); a clip with
no labels is an all-zero row, a mid the labels CSV does not hold is an error.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sslam_fast.audio import AUDIO_EXTENSIONS, list_audio
from sslam_fast.data import DataError, read_manifest

__all__ = ["LabelledData", "load_labelled", "read_label_csv", "read_lbl"]

#: The labels CSV looked for beside a manifest when ``labels=""``, in this order (upstream's default name first).
LABEL_CSV_NAMES = ("label_descriptors.csv", "class_labels_indices.csv")

_FOLD_PREFIX = re.compile(r"^(\d+)-")


@dataclass
class LabelledData:
    """Clips and their targets: ``files[i]`` has the multi-hot (or one-hot) row ``targets[i]`` (float32, (N, C));
    ``class_names`` / ``mids`` name the C columns; ``multilabel`` is False when every clip has exactly one label."""

    files: list[Path]
    targets: torch.Tensor
    class_names: list[str]
    mids: list[str]
    multilabel: bool

    def __post_init__(self) -> None:
        t = self.targets
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.float32:
            raise ValueError(f"targets must be a (N, C) float32 tensor, got {getattr(t, 'shape', t)!r}")
        if t.shape[0] != len(self.files):
            raise ValueError(f"targets has {t.shape[0]} rows for {len(self.files)} files")
        if not len(self.class_names) == len(self.mids) == t.shape[1]:
            raise ValueError(f"targets has {t.shape[1]} columns, class_names {len(self.class_names)} and mids "
                             f"{len(self.mids)}")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return int(self.targets.shape[1])


# --- the labels CSV and the .lbl file --------------------------------------------------------------------------------


def read_label_csv(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(mids, display_names)`` indexed by class from a labels CSV ``index,mid[,display_name]``.

    A first row whose first field is ``index`` is a header (AudioSet's ``class_labels_indices.csv``; its column names
    then place the fields); without one the columns are index, mid, display name (upstream's ``label_descriptors.csv``)
    and a missing display name is the mid. Indices must be 0..C-1, each once, and mids distinct."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels CSV {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"labels CSV {path} is not a text file") from None
    cols = (0, 1, 2)
    by_index: dict[int, tuple[str, str]] = {}
    seen_mids: dict[str, int] = {}
    first = True
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        row = [f.strip() for f in row]
        if not row or not any(row):
            continue
        if first and row[0].lower() == "index":
            names = [f.lower() for f in row]
            if "mid" not in names:
                raise DataError(f"labels CSV {path} line {lineno}: the header {row} has no 'mid' column")
            cols = (0, names.index("mid"), names.index("display_name") if "display_name" in names else -1)
            first = False
            continue
        first = False
        where = f"labels CSV {path} line {lineno}"
        if len(row) < 2 or len(row) <= cols[1]:
            raise DataError(f"{where}: expected 'index,mid,display_name', got {','.join(row)!r}")
        try:
            index = int(row[cols[0]])
            if index < 0:
                raise ValueError
        except ValueError:
            raise DataError(f"{where}: the index {row[cols[0]]!r} is not a non-negative integer") from None
        mid = row[cols[1]]
        if not mid:
            raise DataError(f"{where}: empty mid")
        name = row[cols[2]] if 0 <= cols[2] < len(row) and row[cols[2]] else mid
        if index in by_index:
            raise DataError(f"{where}: class index {index} appears twice")
        if mid in seen_mids:
            raise DataError(f"{where}: mid {mid!r} appears twice (first at index {seen_mids[mid]})")
        by_index[index] = (mid, name)
        seen_mids[mid] = index
    if not by_index:
        raise DataError(f"labels CSV {path} lists no classes")
    missing = sorted(set(range(len(by_index))) - set(by_index))
    if missing:
        raise DataError(f"labels CSV {path}: the class indices must be 0..{len(by_index) - 1}, each once; "
                        f"{missing[0]} is missing (the largest is {max(by_index)})")
    return [by_index[i][0] for i in range(len(by_index))], [by_index[i][1] for i in range(len(by_index))]


def read_lbl(path: str | os.PathLike, mids: list[str]) -> list[list[int]]:
    """The class indices of each clip, in line order, from an upstream ``.lbl`` file: ``clip_id<TAB>mid,mid,...``
    per line (fields split on the tab, or on whitespace where a line has no tab; blank lines skipped). A line with the
    id alone is a clip without labels; a mid not in ``mids`` raises :class:`DataError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"label file {path} is not a text file") from None
    column = {m: i for i, m in enumerate(mids)}
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in (line.split("\t") if "\t" in line else line.split())]
        while len(fields) > 1 and not fields[-1]:
            fields.pop()
        if len(fields) > 2 or not fields[0]:
            raise DataError(f"label file {path} line {lineno}: expected 'clip_id<TAB>mid,mid,...', got {line!r}")
        row = []
        for mid in (m.strip() for m in (fields[1] if len(fields) == 2 else "").split(",")):
            if not mid:
                continue
            if mid not in column:
                raise DataError(f"label file {path} line {lineno}: label {mid!r} is not a class of the labels CSV")
            if column[mid] not in row:
                row.append(column[mid])
        out.append(row)
    return out


def _targets(rows: list[list[int]], num_classes: int) -> torch.Tensor:
    out = torch.zeros(len(rows), num_classes, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, row] = 1.0
    return out


# --- the three kinds of source ---------------------------------------------------------------------------------------


def _from_manifest(path: Path, labels: str) -> LabelledData:
    root, entries = read_manifest(path)
    if labels:
        csv_path = Path(labels)
    else:
        found = [path.parent / n for n in LABEL_CSV_NAMES if (path.parent / n).is_file()]
        if not found:
            raise DataError(f"manifest {path}: no labels CSV; put {' or '.join(LABEL_CSV_NAMES)} (index,mid,"
                            f"display_name) beside it or pass labels=")
        csv_path = found[0]
    mids, names = read_label_csv(csv_path)
    lbl = path.with_suffix(".lbl")
    if not lbl.is_file():
        raise DataError(f"manifest {path}: its label file {lbl} (one 'clip_id<TAB>mid,mid,...' line per clip) does "
                        f"not exist")
    rows = read_lbl(lbl, mids)
    if len(rows) != len(entries):
        raise DataError(f"label file {lbl} has {len(rows)} clip lines, its manifest {path} {len(entries)} clips: "
                        f"they must match line for line")
    return LabelledData(files=[root / rel for rel, _ in entries], targets=_targets(rows, len(mids)),
                        class_names=names, mids=mids, multilabel=any(len(r) != 1 for r in rows))


def _esc50_folds(meta: Path) -> dict[str, int]:
    """``{file name: fold}`` from ESC-50's ``meta/esc50.csv`` (columns ``filename`` and ``fold``)."""
    with open(meta, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "filename" not in fields or "fold" not in fields:
            raise DataError(f"{meta}: needs the columns 'filename' and 'fold', has {fields}")
        reader.fieldnames = fields
        out = {}
        for lineno, r in enumerate(reader, start=2):
            try:
                out[r["filename"].strip()] = int(r["fold"])
            except (TypeError, ValueError, AttributeError):
                raise DataError(f"{meta} line {lineno}: the fold {r.get('fold')!r} is not an integer") from None
    return out


def _file_folds(files: list[Path], root: Path) -> list[int]:
    meta = root / "meta" / "esc50.csv"
    if meta.is_file():
        table = _esc50_folds(meta)
        folds = []
        for f in files:
            if f.name not in table:
                raise DataError(f"{f}: not listed in {meta}, so its fold is unknown")
            folds.append(table[f.name])
        return folds
    folds = []
    for f in files:
        m = _FOLD_PREFIX.match(f.name)
        if m is None:
            raise DataError(f"{f}: cannot tell its fold: the name does not start with '<fold>-' (ESC-50's "
                            f"'{{fold}}-{{clip}}-{{take}}-{{target}}.wav') and {root} has no meta/esc50.csv")
        folds.append(int(m.group(1)))
    return folds


def _from_folder(root: Path, labels: str, fold: int, split: str) -> LabelledData:
    loose = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
    if loose:
        raise DataError(f"{loose[0]}: an audio file directly in {root}; a class folder holds root/<label>/*.wav")
    classes = {d.name: list_audio(d) for d in sorted(root.iterdir(), key=lambda d: d.name)
               if d.is_dir() and not d.name.startswith(".")}
    classes = {name: files for name, files in classes.items() if files}
    if not classes:
        raise DataError(f"{root}: no class folder with audio files (expected root/<label>/*.wav)")
    if labels:
        mids, names = read_label_csv(labels)
        lookup = {m: i for i, m in enumerate(mids)}
        for i, n in enumerate(names):
            lookup.setdefault(n, i)
        unknown = [c for c in classes if c not in lookup]
        if unknown:
            raise DataError(f"{root / unknown[0]}: the class folder {unknown[0]!r} is neither a mid nor a display "
                            f"name of the labels CSV {labels}")
        column = {c: lookup[c] for c in classes}
    else:
        mids = names = list(classes)
        column = {c: i for i, c in enumerate(classes)}
    files = [f for c in classes for f in classes[c]]
    rows = [[column[c]] for c in classes for _ in classes[c]]
    if fold:
        folds = _file_folds(files, root)
        keep = [(fo == fold) == (split == "valid") for fo in folds]
        if not any(keep):
            what = f"fold {fold} holds no file" if split == "valid" else f"every file is in fold {fold}"
            raise DataError(f"{root}: {what} (the folds found: {sorted(set(folds))})")
        files = [f for f, k in zip(files, keep) if k]
        rows = [r for r, k in zip(rows, keep) if k]
    return LabelledData(files=files, targets=_targets(rows, len(mids)), class_names=list(names), mids=list(mids),
                        multilabel=False)


def _from_synthetic(root: str | os.PathLike | None, labels: str, split: str) -> LabelledData:
    from sslam_fast.data import make_default_dataset

    if root is None:
        from sslam_fast.train.loop import default_data_root

        root = default_data_root("runs/finetune")  # the pretrainer's and the fine-tuner's shared default
    try:
        ds = make_default_dataset(root)
    except OSError as e:
        raise DataError(f"cannot write the built-in data set to {root}: {e.strerror or e}") from None
    part = "train" if split == "train" else "heldout"
    data_root, entries = read_manifest(ds.manifest(part))
    targets = ds.labels(part)
    mids = names = list(ds.class_names)
    if labels:
        mids, names = read_label_csv(labels)
        if len(mids) != targets.shape[1]:
            raise DataError(f"labels CSV {labels} lists {len(mids)} classes, the built-in set has {targets.shape[1]}")
    return LabelledData(files=[data_root / rel for rel, _ in entries], targets=targets, class_names=list(names),
                        mids=list(mids), multilabel=True)


def load_labelled(source: str | os.PathLike, *, labels: str | os.PathLike = "", fold: int = 0, split: str = "train",
                  synthetic_root: str | os.PathLike | None = None) -> LabelledData:
    """The labelled clips of ``source``: a manifest ``.tsv`` (with its ``.lbl``), a class folder, or ``""`` for the
    built-in synthetic set (see the module docstring). ``labels`` is a labels CSV (``""``: the one beside a manifest,
    the folder names, the built-in names); ``fold`` (a class folder only, 0 = all files) holds out that fold for
    ``split="valid"`` and keeps the others for ``"train"``; ``synthetic_root`` is where the built-in set lives
    (default ``sslam_fast.train.loop.default_data_root("runs/finetune")``)."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    if not isinstance(fold, int) or isinstance(fold, bool) or fold < 0:
        raise ValueError(f"fold must be a non-negative int (0 = not folded), got {fold!r}")
    labels = str(labels) if labels else ""
    if str(source) == "":
        if fold:
            raise ValueError(f"fold={fold} applies to a class folder root/<label>/*.wav, not the built-in set")
        return _from_synthetic(synthetic_root, labels, split)
    path = Path(source)
    if path.is_dir():
        return _from_folder(path, labels, fold, split)
    if not path.exists():
        raise DataError(f"data source {path}: no such manifest or folder")
    if path.suffix.lower() in AUDIO_EXTENSIONS:
        raise DataError(f"data source {path} is one audio file; give a manifest .tsv or a class folder")
    if fold:
        raise ValueError(f"fold={fold} applies to a class folder root/<label>/*.wav, not the manifest {path} (a "
                         f"manifest names its split itself)")
    return _from_manifest(path, labels)
