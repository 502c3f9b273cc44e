"""Tagging CLI for a fine-tuned checkpoint (ALGORITHM §8), the counterpart of ``[S]
SSLAM_Inference/inference/inference.py``.

    python -m sslam_fast.predict --checkpoint FINETUNED --audio PATH [--labels CSV] [--top-k 10]
        [--batch-size 8] [--device cpu|cuda] [--target-length 1024|auto]

Scores = ``sigmoid(logits)`` of ``AudioClassifier`` (CLS -> fc_norm -> head). For every readable file it prints the
``top-k`` classes, best first, one line per class: ``<rank>\\t<score>\\t<index>\\t<name>`` where the name is the
``display_name`` of an AudioSet-style class-labels CSV (header ``index,mid,display_name``) when ``--labels`` is given,
else the class index. With a directory, each file's block starts with a line ``# <path>``.

The input is padded / cropped to 1024 frames by default, as upstream inference and the fine-tuning data pipeline do
(ALGORITHM §1.5); ``--target-length auto`` uses each clip's own length rounded up to 16 (capped at 1024) instead (see
``sslam_fast.extract``). Bad files are reported on stderr and skipped; exit code 0 when at least one file worked.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

from sslam_fast._progress import progress, write
from sslam_fast.extract import (
    MAX_TARGET_LENGTH,
    Reporter,
    add_common_args,
    check_target_length,
    collect_files,
    iter_batches,
    load_model_or_exit,
    model_max_frames,
    resolve_device,
)

__all__ = ["main", "predict", "read_class_labels"]


def read_class_labels(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """``[(index, mid, display_name), ...]`` sorted by index from an AudioSet ``class_labels_indices.csv``.

    Raises ``ValueError`` naming the file when the header lacks ``index``, ``mid`` or ``display_name``, an index is
    not an integer, or indices repeat.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = {"index", "mid", "display_name"} - set(fields)
        if missing:
            raise ValueError(f"{path}: labels CSV needs the header index,mid,display_name (missing {sorted(missing)})")
        reader.fieldnames = fields
        rows = []
        for line, r in enumerate(reader, start=2):
            try:
                rows.append((int(r["index"]), r["mid"].strip(), r["display_name"].strip()))
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"{path}:{line}: bad labels row {r}") from None
    rows.sort()
    idx = [r[0] for r in rows]
    if len(set(idx)) != len(idx):
        raise ValueError(f"{path}: repeated class index")
    return rows


@torch.inference_mode()
def predict(model, files, *, batch_size=8, device=None, target_length=MAX_TARGET_LENGTH, on_error=None,
            logits: bool = False):
    """Yield ``(path, scores)``: the (num_classes,) float32 sigmoid scores of each readable file (``logits=True``: the
    logits, which rank the clips exactly where float32 sigmoids of close logits round to equal values)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cap = min(MAX_TARGET_LENGTH, model_max_frames(model))
    for paths, x in iter_batches(files, batch_size=batch_size, device=device, target_length=target_length,
                                 max_length=cap, on_error=on_error or Reporter()):
        out = model(x).float()
        yield from zip(paths, (out if logits else torch.sigmoid(out)).cpu())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sslam_fast.predict", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--labels", default=None, help="AudioSet class_labels_indices.csv (index,mid,display_name)")
    p.add_argument("--top-k", type=int, default=10)
    args = p.parse_args(argv)
    if args.top_k <= 0:
        p.error(f"--top-k must be positive, got {args.top_k}")
    device = resolve_device(p, args.device)
    names = None
    if args.labels:
        try:
            names = {i: name for i, _, name in read_class_labels(args.labels)}
        except (OSError, ValueError) as e:
            p.error(f"--labels: {e}")
    report = Reporter()
    root, files = collect_files(p, args.audio, report)
    model = load_model_or_exit(args.checkpoint, device, args.trust_checkpoint)
    if model is None:
        return 2
    if not hasattr(model, "head"):
        p.error(f"--checkpoint: {args.checkpoint} is a pre-trained encoder; predict needs a fine-tuned classifier")
    check_target_length(p, args.target_length, model)
    num_classes = model.head.out_features
    if names is not None and len(names) != num_classes:
        print(f"warning: {args.labels} has {len(names)} classes, the model {num_classes}", file=sys.stderr)
    k = min(args.top_k, num_classes)
    many = not root.is_file()
    done = 0
    files = progress(files, desc="predict", unit="file")  # a bar on a terminal only
    for path, scores in predict(model, files, batch_size=args.batch_size, device=device,
                                target_length=args.target_length, on_error=report):
        if many:
            write(f"# {path}", file=sys.stdout)
        top = torch.topk(scores, k)
        for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            name = names.get(i, str(i)) if names is not None else str(i)
            write(f"{rank}\t{s:.6f}\t{i}\t{name}", file=sys.stdout)
        done += 1
    report.summary(done)
    if done == 0:
        print(f"error: no audio file could be processed under {args.audio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
