"""Feature extraction CLI (ALGORITHM §1, §8), the counterpart of ``[S]
SSLAM_Inference/feature_extract/feature_extract.py``.

    python -m sslam_fast.extract --checkpoint CKPT --audio PATH --out OUT
        [--granularity frame|utterance|all] [--batch-size 8] [--device cpu|cuda] [--target-length 1024|N|auto]

``PATH`` is one audio file or a directory (walked recursively for audio extensions, see ``sslam_fast.audio``). Each
input file gives one float32 ``.npy``: ``OUT/<relative path with .npy suffix>`` for a directory (if two inputs would
map to the same name, e.g. ``a.wav`` and ``a.flac``, those keep their extension: ``a.wav.npy``), ``OUT`` itself when
the input is a single file and ``OUT`` ends in ``.npy``, else ``OUT/<stem>.npy``.

Per clip: mono = channel average (before resampling, ALGORITHM §11.8); ``eat_features(wave, sample_rate=sr,
target_length=T)`` (resample to 16 kHz, mean removal, Kaldi fbank, pad/crop, AudioSet normalisation); the model's
``extract_features`` = block-12 output of the student (ALGORITHM §8). ``frame`` = (N, D) patch tokens, token
n = 8 t + f; ``utterance`` = (D,) CLS; ``all`` = (1 + N, D), CLS first.

Target length (ALGORITHM §1.5, §8): by default every clip is padded (zero log-mel rows at the end, before the
normalisation) or cropped (its first frames kept) to ``--target-length 1024`` frames, as ``[E]
feature_extract/feature_extract.py`` and ``[S] SSLAM_Inference/feature_extract/feature_extract.py : main`` do with the
``--target_length=1024`` of their scripts (the pre-training length): a 10 s clip gives (513, 768) with ``all``, the
upstream features. ``--target-length auto`` uses each clip's own frame count rounded UP to a multiple of 16 instead
(capped at 1024 and at the model's positional table): fewer tokens and less compute, but other features than
upstream's. Batching never changes a clip's result: only clips with the same sample rate and the same T share a batch
(no cross-clip padding), each row is resampled and mean-normalised over its own samples, and rows do not interact in
the model, so a directory run equals running each file alone. Unreadable, empty, too-short (< one 25 ms frame) and
non-audio files are reported on stderr, one line each, plus a count at the end, and skipped; the exit code is 0 when
at least one file worked, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from sslam_fast._progress import progress, write
from sslam_fast.audio import AudioError, clip_frames, default_target_length, list_audio, load_audio

__all__ = [
    "Reporter",
    "add_target_length_arg",
    "extract_features",
    "iter_batches",
    "load_model",
    "main",
    "output_paths",
    "parse_target_length",
]

GRANULARITIES = ("frame", "utterance", "all")
MAX_TARGET_LENGTH = 1024


class Reporter:
    """Collects skipped files: one stderr line each (printed above a progress bar, if one is drawn), then a count
    (``summary``)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream
        self.skipped: list[tuple[Path, str]] = []

    def __call__(self, path, reason: str) -> None:
        self.skipped.append((Path(path), reason))
        write(f"skipped {path}: {reason}", file=self.stream or sys.stderr)

    def summary(self, done: int, what: str = "file") -> None:
        if self.skipped:
            print(f"{len(self.skipped)} {what}(s) skipped, {done} processed", file=self.stream or sys.stderr)


def load_model(checkpoint: str | os.PathLike, device: torch.device, trust_checkpoint: bool = False):
    """``sslam_fast.load_pretrained`` in eval mode on ``device``."""
    from sslam_fast import load_pretrained

    return load_pretrained(checkpoint, trust_checkpoint=trust_checkpoint).to(device).eval()


def load_model_or_exit(checkpoint: str, device: torch.device, trust_checkpoint: bool = False):
    """:func:`load_model`, or ``None`` after one ``error: --checkpoint ...`` line on stderr when the file is missing or
    is not a checkpoint it can load (a user error: the CLIs then exit 2, without a traceback)."""
    from sslam_fast.checkpoint import CheckpointError

    try:
        return load_model(checkpoint, device, trust_checkpoint)
    except (CheckpointError, OSError) as e:
        print(f"error: --checkpoint {checkpoint}: {e}", file=sys.stderr)
        return None


def unwritable(path: Path, *, file: bool = False) -> str | None:
    """Why the folder ``path`` (or, ``file=True``, the file ``path``) cannot be written, in words that follow its
    name, or None. It may not exist yet: nothing is created, so that a run that fails later leaves no empty folder."""
    path = path.absolute()
    folder = path.parent if file else path
    existing = next(a for a in (folder, *folder.parents) if a.exists())  # "/" exists
    if not existing.is_dir():
        return "is a file, not a folder" if existing == path else f"is under {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: {existing} is read-only or not writable by this user"
    return None


def model_max_frames(model) -> int:
    cfg = model.cfg
    return cfg.max_time_patches * cfg.patch_size


def iter_batches(
    files: Iterable[Path],
    *,
    batch_size: int,
    device: torch.device,
    target_length: int | None,
    max_length: int = MAX_TARGET_LENGTH,
    on_error: Callable[[Path, str], None],
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Read ``files`` and yield ``(paths, x)`` with ``x`` = ``eat_features`` (B, 1, T, 128) float32 on ``device``.

    Clips are grouped by (sample rate, T); a group is emitted when it holds ``batch_size`` clips, the rest at the end
    (so at most one partial batch per group is held in memory). Failing files go to ``on_error(path, reason)``.
    """
    from sslam_fast.ops import eat_features

    groups: dict[tuple[int, int], list[tuple[Path, torch.Tensor]]] = {}

    def flush(key):
        sr, T = key
        items = groups.pop(key)
        lengths = torch.tensor([w.numel() for _, w in items], dtype=torch.int64)
        waves = torch.zeros((len(items), int(lengths.max())), dtype=torch.float32)
        for i, (_, w) in enumerate(items):
            waves[i, : w.numel()] = w
        x = eat_features(waves.to(device), lengths.to(device), sample_rate=sr, target_length=T)
        return [p for p, _ in items], x

    for f in files:
        try:
            wave, sr = load_audio(f)
        except AudioError as e:
            on_error(f, str(e).removeprefix(f"{f}: "))
            continue
        if clip_frames(wave.numel(), sr) == 0:
            on_error(f, f"too short: {wave.numel()} samples at {sr} Hz is less than one 25 ms frame")
            continue
        T = target_length or default_target_length(wave.numel(), sr, cap=max_length)
        key = (sr, T)
        groups.setdefault(key, []).append((f, wave))
        if len(groups[key]) >= batch_size:
            yield flush(key)
    for key in list(groups):
        yield flush(key)


def select(feats: torch.Tensor, granularity: str) -> torch.Tensor:
    """(B, 1 + N, D) -> frame (B, N, D) | utterance (B, D) | all (B, 1 + N, D)."""
    if granularity == "frame":
        return feats[:, 1:]
    if granularity == "utterance":
        return feats[:, 0]
    if granularity == "all":
        return feats
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def output_paths(audio: Path, files: list[Path], out: Path) -> dict[Path, Path]:
    """Where each input's ``.npy`` goes (see the module docstring)."""
    if audio.is_file():
        return {files[0]: out if out.suffix == ".npy" else out / (files[0].stem + ".npy")}
    rel = {f: f.relative_to(audio) for f in files}
    plain = {f: r.with_suffix(".npy") for f, r in rel.items()}
    counts: dict[Path, int] = {}
    for p in plain.values():
        counts[p] = counts.get(p, 0) + 1
    return {f: out / (plain[f] if counts[plain[f]] == 1 else r.with_name(r.name + ".npy")) for f, r in rel.items()}


@torch.inference_mode()
def extract_features(model, files, *, granularity="frame", batch_size=8, device=None,
                     target_length: int | None = MAX_TARGET_LENGTH, on_error=None) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield ``(path, features)`` (float32 numpy, see ``select``) for each readable file, in batches. Every clip is
    padded / cropped to ``target_length`` frames (upstream's 1024 by default); None: each clip's own length rounded up
    to 16 (capped at 1024)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cap = min(MAX_TARGET_LENGTH, model_max_frames(model))
    on_error = on_error or Reporter()
    for paths, x in iter_batches(files, batch_size=batch_size, device=device, target_length=target_length,
                                 max_length=cap, on_error=on_error):
        feats = select(model.extract_features(x), granularity).float().cpu().numpy()
        yield from zip(paths, feats)


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_target_length(s: str) -> int | None:
    """``--target-length``: ``"auto"`` -> None (each clip's own length), else a positive multiple of 16."""
    if s.strip().lower() == "auto":
        return None
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v <= 0 or v % 16:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive multiple of 16, got {s}")
    return v


def add_target_length_arg(p: argparse.ArgumentParser) -> None:
    """``--target-length`` (also spelled ``--target_length``, upstream's name), shared by extract, predict, evaluate."""
    p.add_argument("--target-length", "--target_length", dest="target_length", type=parse_target_length,
                   default=MAX_TARGET_LENGTH, metavar="1024|N|auto",
                   help=f"frames every clip is padded / cropped to (a multiple of 16); default {MAX_TARGET_LENGTH}, "
                        "as upstream's feature_extract.py / inference.py with --target_length=1024 (matches "
                        "upstream); 'auto': each clip's own length rounded up to 16, capped at 1024 (does not match "
                        "upstream for clips shorter than 10.24 s)")


def check_target_length(p: argparse.ArgumentParser, target_length: int | None, model) -> None:
    """Refuse a ``--target-length`` beyond the model's positional table (after the model is loaded)."""
    if target_length is not None and target_length > model_max_frames(model):
        p.error(f"--target-length {target_length} exceeds the model's {model_max_frames(model)} frames")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="fairseq / HF checkpoint (see sslam_fast.load_pretrained)")
    p.add_argument("--audio", required=True, help="an audio file or a directory (walked recursively)")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of the checkpoint")
    add_target_length_arg(p)


def resolve_device(p: argparse.ArgumentParser, name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {name}")
    return device


def collect_files(p: argparse.ArgumentParser, audio: str, report: Reporter) -> tuple[Path, list[Path]]:
    root = Path(audio)
    try:
        files, others = list_audio(root, return_skipped=True)
    except OSError as e:  # missing, or a folder it may not list
        p.error(f"--audio: {e}")
    for f in others:
        report(f, "not an audio file (extension)")
    return root, files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sslam_fast.extract", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--out", required=True, help="output folder (or a .npy path for a single input file)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="frame")
    args = p.parse_args(argv)
    device = resolve_device(p, args.device)
    report = Reporter()
    root, files = collect_files(p, args.audio, report)
    out = Path(args.out)
    one_npy = root.is_file() and out.suffix == ".npy"  # a single input written to OUT itself
    problem = ("is a folder; name a .npy file, or a folder without the .npy suffix" if one_npy and out.is_dir()
               else unwritable(out, file=one_npy))
    if problem:  # found before the model runs, not after the first clip
        print(f"error: --out {args.out} {problem}", file=sys.stderr)
        return 2
    model = load_model_or_exit(args.checkpoint, device, args.trust_checkpoint)
    if model is None:
        return 2
    check_target_length(p, args.target_length, model)
    dest = output_paths(root, files, out)
    done = 0
    files = progress(files, desc="extract", unit="file")  # a bar on a terminal only
    for path, feat in extract_features(model, files, granularity=args.granularity, batch_size=args.batch_size,
                                       device=device, target_length=args.target_length, on_error=report):
        target = dest[path]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, np.ascontiguousarray(feat, dtype=np.float32))
        except OSError as e:  # the checks above passed, yet the write fails: a full disk, a read-only mount
            print(f"error: cannot write {target}: {e.strerror or e}", file=sys.stderr)
            return 2
        done += 1
    report.summary(done)
    if done == 0:
        print(f"error: no audio file could be processed under {args.audio}", file=sys.stderr)
        return 1
    print(f"wrote {done} feature file(s) ({args.granularity}) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
