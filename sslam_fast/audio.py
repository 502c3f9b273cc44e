"""Audio decoding helpers for the inference tools (ALGORITHM §1 steps 1-3).

``load_audio(path)`` reads a file with ``soundfile.read(dtype="float32", always_2d=True)`` (values in [-1, 1], no
x32768 scaling, as upstream ``FileAudioDataset``) and averages the channels to mono. The channel average happens here,
BEFORE any resampling (ALGORITHM §11.8: upstream resamples the (N, C) array first, along the wrong axis); resampling to
16 kHz and the per-clip mean removal are done by ``sslam_fast.ops.eat_features``.

``list_audio(path)`` expands a file or a directory (walked recursively, sorted) into audio files by extension.
``clip_frames`` / ``default_target_length`` give the Kaldi frame count of a clip and the target length the tools use.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioError",
    "clip_frames",
    "default_target_length",
    "list_audio",
    "load_audio",
]

#: Extensions ``list_audio`` picks up in a directory (lower-cased comparison). mp3 / opus need libsndfile >= 1.1.
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd", ".caf",
     ".w64", ".rf64", ".nist", ".sph", ".voc", ".wv"}
)

EAT_SAMPLE_RATE = 16000
_FRAME_LENGTH = 400  # 25 ms at 16 kHz
_FRAME_SHIFT = 160  # 10 ms at 16 kHz


class AudioError(ValueError):
    """A file that cannot be used as audio: missing, unreadable, corrupt, or with no samples. The message names it."""


def load_audio(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """Read ``path`` -> ``(waveform, sample_rate)``: a 1-D float32 CPU tensor (channel average) and the file's rate.

    Raises :class:`AudioError` (a ``ValueError``) naming the file when it does not exist, cannot be decoded, has no
    samples, or holds non-finite values.
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the damage
        raise AudioError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from None
    if data.size == 0 or data.shape[0] == 0:
        raise AudioError(f"{path}: the file has no audio samples")
    if sr <= 0:
        raise AudioError(f"{path}: invalid sample rate {sr}")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: the audio holds NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)), int(sr)


def list_audio(path: str | os.PathLike, *, return_skipped: bool = False):
    """The audio files under ``path``: ``[path]`` for a file (whatever its extension), else every file below the
    directory whose extension is in :data:`AUDIO_EXTENSIONS`, recursively, sorted by relative path.

    With ``return_skipped=True`` returns ``(audio_files, other_files)``, the second list being the directory's files
    that were not picked (so callers can report them). Raises ``FileNotFoundError`` if ``path`` does not exist.
    """
    root = Path(path)
    if root.is_file():
        return ([root], []) if return_skipped else [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or directory")
    audio, other = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            f = Path(dirpath) / name
            (audio if f.suffix.lower() in AUDIO_EXTENSIONS else other).append(f)
    key = lambda f: f.relative_to(root).as_posix()  # noqa: E731
    audio.sort(key=key)
    other.sort(key=key)
    return (audio, other) if return_skipped else audio


def clip_frames(num_samples: int, sample_rate: int) -> int:
    """Kaldi fbank frames (``snip_edges``: 1 + (N - 400) // 160, 0 below one frame) of a clip after the resampling to
    16 kHz that ``eat_features`` applies (``ceil(N * 16000 / sr)`` samples)."""
    n = num_samples if sample_rate == EAT_SAMPLE_RATE else -(-num_samples * EAT_SAMPLE_RATE // sample_rate)
    return 0 if n < _FRAME_LENGTH else 1 + (n - _FRAME_LENGTH) // _FRAME_SHIFT


def default_target_length(num_samples: int, sample_rate: int, cap: int = 1024, patch: int = 16) -> int:
    """The clip's frame count rounded UP to a multiple of ``patch`` (at least one patch), capped at ``cap`` (itself
    rounded down to a multiple of ``patch``). ALGORITHM §8: the target length must be a multiple of 16."""
    cap = max(patch, cap // patch * patch)
    frames = clip_frames(num_samples, sample_rate)
    return min(cap, max(patch, -(-frames // patch) * patch))
