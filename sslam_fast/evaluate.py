"""mAP of a fine-tuned checkpoint over a labelled set (ALGORITHM §8), the counterpart of
``[S] SSLAM_Inference/evaluation/eval.py`` (mAP = mean over classes of ``sklearn.average_precision_score``).

    python -m sslam_fast.evaluate --checkpoint FINETUNED --manifest TSV --labels CSV [--targets CSV]
        [--batch-size 32] [--device cpu|cuda] [--target-length 1024|auto]

Every clip is padded / cropped to ``--target-length`` frames, 1024 by default as upstream's evaluation does
(``auto``: each clip's own length rounded up to 16; see ``sslam_fast.extract``).

Accepted formats:

* ``--manifest``: fairseq-style ``.tsv``. Line 1 is the root folder; every further non-empty line is
  ``relative_path[<TAB>size[<TAB>mids]]``. ``size`` is ignored (no ``min_sample_size`` filter at evaluation).
* ``--labels``: AudioSet ``class_labels_indices.csv`` with header ``index,mid,display_name``; class ``index`` is the
  model output column, ``mid`` is what the targets name.
* the targets of a clip: with ``--targets CSV``, a CSV whose rows are ``relative_path,mids`` (no header; a first row
  whose path is ``relative_path``/``path``/``file`` is taken as a header and skipped); ``mids`` are separated by ``;``,
  and a quoted field with commas or extra columns (``a.wav,/m/x,/m/y``) also work. Without ``--targets``, the third
  manifest column holds the mids, separated by ``,`` or ``;``. A clip with no targets entry is reported and skipped; a
  clip with an empty mid list counts as all-negative; an unknown mid is reported once and ignored.

mAP = mean of the per-class average precision over the classes with at least one positive (classes without positives
are undefined in sklearn and left out); ``sslam_fast.metrics.mean_average_precision`` computes it (sklearn's step-wise
AP, tied scores forming one threshold). Files that cannot be read are reported on stderr and skipped; the exit code is
0 when at least one clip was scored.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from sslam_fast._progress import progress
from sslam_fast.extract import (
    MAX_TARGET_LENGTH,
    Reporter,
    add_target_length_arg,
    check_target_length,
    load_model_or_exit,
    resolve_device,
)
from sslam_fast.metrics import mean_average_precision
from sslam_fast.predict import predict, read_class_labels

__all__ = ["evaluate", "main", "read_manifest", "read_targets"]

_SPLIT = re.compile(r"[;,]")


def read_manifest(path: str | os.PathLike) -> tuple[Path, list[tuple[str, list[str] | None]]]:
    """``(root, [(relative_path, mids from column 3 or None), ...])`` of a fairseq ``.tsv`` manifest."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: the first line of a manifest must be the root folder")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = (path.parent / root) if not root.exists() else root
    rows = []
    for line in lines[1:]:
        if not line.strip():
            continue
        cols = line.split("\t")
        mids = [m.strip() for m in _SPLIT.split(cols[2]) if m.strip()] if len(cols) > 2 else None
        rows.append((cols[0].strip(), mids))
    return root, rows


def read_targets(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{relative_path: [mid, ...]}`` from a ``relative_path,mids`` CSV (see the module docstring)."""
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if i == 0 and row[0].strip().lower() in ("relative_path", "path", "file", "filename"):
                continue
            out[row[0].strip()] = [m.strip() for f in row[1:] for m in _SPLIT.split(f) if m.strip()]
    return out


def evaluate(model, root: Path, rows, targets: dict[str, list[str]] | None, mids: list[str], *, batch_size=32,
             device=None, target_length=MAX_TARGET_LENGTH, report=None, show_progress: bool = False) -> dict:
    """Score every manifest clip; returns ``{"mAP", "ap" (C,), "scores" (N, C), "targets" (N, C), "files"}``.
    ``show_progress``: a progress bar over the clips on stderr when that is a terminal."""
    report = report or Reporter()
    col = {m: i for i, m in enumerate(mids) if m}
    labels: dict[Path, np.ndarray] = {}
    unknown: set[str] = set()
    files = []
    for rel, own in rows:
        clip_mids = targets.get(rel) if targets is not None else own
        f = root / rel
        if clip_mids is None:
            report(f, "no targets for this clip")
            continue
        y = np.zeros(len(mids), dtype=np.int8)
        for m in clip_mids:
            if m in col:
                y[col[m]] = 1
            elif m not in unknown:
                unknown.add(m)
                print(f"warning: unknown label mid {m!r} ignored", file=sys.stderr)
        labels[f] = y
        files.append(f)
    got_files, got_scores = [], []
    clips = progress(files, desc="evaluate", unit="clip") if show_progress else files
    for f, z in predict(model, clips, batch_size=batch_size, device=device, target_length=target_length,
                        on_error=report, logits=True):
        got_files.append(f)
        got_scores.append(z.numpy())
    if not got_files:
        return {"mAP": float("nan"), "ap": None, "scores": None, "targets": None, "files": []}
    logits = np.stack(got_scores)[:, : len(mids)]
    y = np.stack([labels[f] for f in got_files])
    # ranked by the logits, as the fine-tuner's evaluation ranks them: the sigmoid is monotone, but in float32 it
    # rounds close logits to equal scores, and ties change the average precision
    m, ap = mean_average_precision(np.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0), y)
    scores = torch.sigmoid(torch.from_numpy(logits)).numpy()
    return {"mAP": m, "ap": ap, "scores": scores, "targets": y, "files": got_files}


def _class_mids(classes: list[tuple[int, str, str]], num_classes: int, labels) -> tuple[list[str], str | None]:
    """The mid of each of the model's ``num_classes`` outputs ("" for one the labels file does not name), and the
    error when the file has classes the model has not: then it belongs to another model, and its indices would
    name the wrong outputs."""
    outside = [i for i, _, _ in classes if not 0 <= i < num_classes]
    if outside:
        return [], (f"--labels {labels} has {len(classes)} classes with indices up to {max(i for i, _, _ in classes)}, "
                    f"the model {num_classes} (0-{num_classes - 1}): labels of another model?")
    mids = [""] * num_classes
    for i, mid, _ in classes:
        mids[i] = mid
    return mids, None


def _no_positive_class(rows, targets: dict[str, list[str]] | None, mids: list[str], labels) -> str | None:
    """The error when no clip has a positive label among the model's classes (mAP would be NaN over 0 classes)."""
    wanted = {m for rel, own in rows for m in ((targets.get(rel) or []) if targets is not None else (own or []))}
    known = {m for m in mids if m}
    if not wanted:
        return "no clip has a target label (every list of mids is empty): mAP needs positives"
    if not wanted & known:
        return (f"none of the {len(wanted)} target labels (e.g. {sorted(wanted)[0]}) is a class of --labels {labels} "
                f"(e.g. {sorted(known)[0] if known else 'none'}): targets and labels of different ontologies?")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sslam_fast.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", required=True, help=".tsv: root folder, then relative_path<TAB>size[<TAB>mids]")
    p.add_argument("--labels", required=True, help="class_labels_indices.csv (index,mid,display_name)")
    p.add_argument("--targets", default=None, help="CSV relative_path,mid1;mid2 (else manifest column 3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    add_target_length_arg(p)
    p.add_argument("--trust-checkpoint", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    device = resolve_device(p, args.device)
    try:
        classes = read_class_labels(args.labels)
        root, rows = read_manifest(args.manifest)
        targets = read_targets(args.targets) if args.targets else None
    except (OSError, ValueError) as e:
        p.error(str(e))
    if targets is None and any(own is None for _, own in rows):
        p.error("--manifest has lines without a third (mids) column; pass --targets CSV")
    model = load_model_or_exit(args.checkpoint, device, args.trust_checkpoint)
    if model is None:
        return 2
    if not hasattr(model, "head"):
        p.error(f"--checkpoint: {args.checkpoint} is a pre-trained encoder; evaluate needs a fine-tuned classifier")
    check_target_length(p, args.target_length, model)
    C = model.head.out_features
    mids, problem = _class_mids(classes, C, args.labels)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if len(classes) < C:  # legitimate (a labels file of the classes one cares about), yet worth a word
        print(f"warning: --labels {args.labels} names {len(classes)} of the model's {C} classes; the other "
              f"{C - len(classes)} are not scored", file=sys.stderr)
    problem = _no_positive_class(rows, targets, mids, args.labels)
    if problem:  # found before the model runs over the whole set
        print(f"error: {problem}", file=sys.stderr)
        return 2
    report = Reporter()
    res = evaluate(model, root, rows, targets, mids, batch_size=args.batch_size, device=device,
                   target_length=args.target_length, report=report, show_progress=True)
    report.summary(len(res["files"]), "clip")
    if not res["files"]:
        print(f"error: no clip of {args.manifest} could be scored", file=sys.stderr)
        return 1
    n_cls = int(np.sum(~np.isnan(res["ap"])))
    if n_cls == 0:
        print(f"error: none of the {len(res['files'])} clips scored has a positive label (the clips with one could "
              "not be read): mAP is undefined", file=sys.stderr)
        return 1
    print(f"mAP {res['mAP']:.6f} over {n_cls} classes with positives, {len(res['files'])} clips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
