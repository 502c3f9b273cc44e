"""Training clips streamed from tar shards in the WebDataset layout (``python -m sslam_fast.shard`` writes them).

A shard ``shard-000000.tar`` holds, per clip, consecutive members ``<key>.<ext>`` (the audio: ``flac``, ``wav`` or any
extension of ``sslam_fast.audio.AUDIO_EXTENSIONS``) and ``<key>.json`` (optional: ``path``, ``num_samples``,
``sample_rate``, ``labels``); the key is the member name up to the first dot of its base name, as WebDataset groups
members. A folder of shards may hold ``shards.json`` (the index: shard names and clip counts), which fixes the shard
list and lets a shard cut short at a member boundary be noticed. Clips are decoded exactly as
:class:`sslam_fast.data.AudioClipDataset` decodes files (ALGORITHM §1 steps 1-3: soundfile float read, channel
average, resampling to ``sample_rate``, random crop / zero pad, x32768 to int16), so a clip read from a shard equals
the clip read from its file.

Order. Epoch ``e`` reads the shards in the permutation ``numpy.random.default_rng([seed, e]).permutation(S)``; the
shard at position ``p`` goes to global worker ``p % (world_size * num_workers)``, where DataLoader worker ``w`` of rank
``r`` is global worker ``w * world_size + r`` (so a rank's shards, ``perm[r::world_size]``, do not depend on its number
of workers). Each worker reads its shards in that order, members in tar order, through a shuffle buffer of
``shuffle_buffer`` clips drawn from ``numpy.random.default_rng([seed, e, global_worker])``: the first
``shuffle_buffer`` clips fill it; then each further clip replaces the buffered clip at ``rng.integers(shuffle_buffer)``,
which is yielded; at the end the buffer is yielded in the order ``rng.permutation(len(buffer))``. ``shuffle_buffer <=
1`` yields the clips in read order. The buffer holds the members' bytes (up to ``shuffle_buffer`` x ~320 KB for 10 s
of 16-bit audio per worker), which are decoded when a clip leaves it.

Bad data. A member that cannot be used (undecodable or too short audio, no audio member, JSON that does not parse)
yields ``None``, like a bad file of ``AudioClipDataset``; a truncated or corrupt tar stops that shard with one ``None``
(the rest of the shard is lost, the run goes on), as does a shard with fewer clips than ``shards.json`` lists. Each is
recorded in ``bad_files`` as ``(name, reason)`` (``shard.tar:key``) in the process that read it; :class:`ShardCollate`
brings the names of each batch's bad members and the shards it completed to the main process.

Resume (shard granularity). ``state_dict()`` -> ``{"epoch", "shards_done", "num_shards", "world_size"}``, the shards
of this rank whose every clip is in a batch the main process has consumed (:meth:`ShardDataset.consume`, called by
:class:`ShardBatches`). After ``load_state_dict`` the epoch reads only the rank's other shards, each from its start:
what is replayed is every clip already consumed from the shards that were in progress (at most about ``1 +
shuffle_buffer / shard_size`` shards per worker), and the shuffle-buffer order of the rest differs from the
uninterrupted run (the buffer starts empty); a completed shard is never read twice in an epoch, and no clip of the
epoch is lost. Manifests and folders resume exactly (:class:`sslam_fast.data.ResumableSampler`).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..audio import AUDIO_EXTENSIONS, AudioError
from .dataset import MIN_SAMPLES, DataError, collate

__all__ = ["MEMBER_BITS", "ShardBatches", "ShardCollate", "ShardDataset", "clip_item", "collate_shared",
           "decode_clip", "expand_braces", "is_shard_source", "list_shards", "read_shard"]

#: A clip's ``index`` is ``shard_number << MEMBER_BITS | member_number`` (at most 2**20 clips per shard).
MEMBER_BITS = 20
_AUDIO_EXTS = frozenset(e[1:] for e in AUDIO_EXTENSIONS)
_BRACE = re.compile(r"\{([^{}]*)\}")
_SHARD_NAME = re.compile(r"^shard-\d+\.tar$")


# --- shard lists ------------------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar, a-001.tar, a-002.tar`` (zero padded to the width of the first bound);
    ``{x,y}`` lists alternatives; several groups expand left to right. Raises ``ValueError`` for a bad range."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise ValueError(f"bad brace range {{{body}}} in {pattern!r}: expected {{first..last}} with digits")
        width = len(lo) if lo.startswith("0") else 0
        parts = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [x for p in parts for x in expand_braces(head + p + tail)]


def _index_of(folder: Path) -> dict | None:
    index = folder / "shards.json"
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(data.get("shards"), list):
            raise ValueError("no 'shards' list")
        return {str(s["name"]): int(s["clips"]) for s in data["shards"]}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"shard index {index} is malformed ({type(e).__name__}: {e})") from None


def list_shards(source: str | os.PathLike) -> tuple[list[Path], dict[Path, int]]:
    """``(shards, expected clip counts)`` of a brace pattern, one ``.tar`` file, or a folder (the order of its
    ``shards.json``, else its ``*.tar`` files sorted by name). Counts come from the ``shards.json`` beside the shards.
    Raises :class:`DataError` when a named shard is missing or there is none."""
    src = str(source)
    if Path(src).is_dir():
        folder = Path(src)
        index = _index_of(folder)
        shards = [folder / n for n in index] if index is not None else sorted(folder.glob("*.tar"))
        if not shards:
            raise DataError(f"shard folder {folder} holds no .tar shards")
    else:
        try:
            shards = [Path(p) for p in expand_braces(src)]
        except ValueError as e:
            raise DataError(str(e)) from None
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(shards)} shard(s) of {src} do not exist, e.g. {missing[0]}")
    counts: dict[Path, int] = {}
    for folder in dict.fromkeys(p.parent for p in shards):
        index = _index_of(folder) or {}
        counts.update({folder / n: c for n, c in index.items()})
    return shards, {p: counts[p] for p in shards if p in counts}


def is_shard_source(data: str) -> bool:
    """Whether ``--data`` names tar shards: a pattern with ``{..}`` or a path ending in ``.tar``, or a folder with a
    ``shards.json`` or ``shard-*.tar`` files."""
    if not data:
        return False
    if data.endswith(".tar") or (_BRACE.search(data) and ".tar" in data):
        return True
    p = Path(data)
    return p.is_dir() and ((p / "shards.json").is_file() or any(_SHARD_NAME.match(f.name) for f in p.glob("*.tar")))


# --- reading one shard ------------------------------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's ``(key, extension)``: the extension starts at the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def _members(path: Path):
    """``(name, bytes)`` of each regular member in file order; a read error propagates from where it happens. The
    members are read one after the other (headers are parsed as the iteration reaches them, each member's data in one
    read), so a shard is read sequentially once."""
    with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
        for m in tf:
            if m.isfile():
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"unexpected end of data in member {m.name}")
                yield m.name, data


def read_shard(path: str | os.PathLike, shard_number: int = 0, expected: int | None = None):
    """The clips of one shard in tar order: ``(index, name, audio_bytes, meta, error)``, one per key (a group of
    consecutive members), with ``error`` a reason string and ``audio_bytes`` None for a bad clip. A read error
    (truncated or corrupt tar) or fewer clips than ``expected`` ends the shard with one error record."""
    path = Path(path)
    base, member, group_key, group = shard_number << MEMBER_BITS, 0, None, {}

    def finish():
        nonlocal member
        index, name = base | member, f"{path}:{group_key}"
        member += 1
        audio = next((e for e in group if e in _AUDIO_EXTS or e.rsplit(".", 1)[-1] in _AUDIO_EXTS), None)
        if audio is None:
            return index, name, None, None, f"no audio member (members: {', '.join(sorted(group))})"
        meta = None
        if "json" in group:
            try:
                meta = json.loads(group["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError(f"a JSON {type(meta).__name__}, not an object")
            except (ValueError, UnicodeDecodeError) as e:
                return index, name, None, None, f"bad JSON member: {e}"
        return index, name, group[audio], meta, None

    try:
        for name, data in _members(path):
            key, ext = _split_name(name)
            if key != group_key and group:
                yield finish()
                group = {}
            group_key = key
            group[ext] = data
            if member >= 1 << MEMBER_BITS:
                raise DataError(f"more than {1 << MEMBER_BITS} clips in one shard")
    except (tarfile.TarError, OSError, EOFError, DataError) as e:
        last = (1 << MEMBER_BITS) - 1
        if group and member <= last:
            yield finish()
        yield base | min(member, last), str(path), None, None, f"corrupt shard, stopped after {member} clips ({e})"
        return
    if group:
        yield finish()
    if expected is not None and member < expected:
        yield (base | member, str(path), None, None,
               f"truncated shard: {member} clips, shards.json lists {expected}")


# --- decoding ---------------------------------------------------------------------------------------------------------


def _crop_start(n: int, c: int, index: int, *, random_crop: bool, seed: int, epoch: int) -> int:
    if n <= c or not random_crop:
        return 0
    return int(np.random.default_rng([seed, epoch, int(index)]).integers(0, n - c + 1))


def clip_item(wav, sr: int, index: int, *, clip_samples: int, sample_rate: int, random_crop: bool = True,
              seed: int = 0, epoch: int = 0, as_int16: bool = True) -> dict:
    """A mono float waveform (array or tensor, values in [-1, 1]) at ``sr`` -> the ``AudioClipDataset`` item:
    resampled to ``sample_rate`` (torchaudio), cropped at ``default_rng([seed, epoch, index])`` or zero padded to
    ``clip_samples``, x32768 to int16. Raises :class:`AudioError` when fewer than 400 samples remain."""
    wav = torch.as_tensor(np.ascontiguousarray(wav, dtype=np.float32))
    if sr != sample_rate:
        import torchaudio

        wav = torchaudio.functional.resample(wav, orig_freq=sr, new_freq=sample_rate)
    n, c = wav.shape[0], clip_samples
    if n < MIN_SAMPLES:
        raise AudioError(f"too short: {n} samples < {MIN_SAMPLES}")
    if n > c:
        start = _crop_start(n, c, index, random_crop=random_crop, seed=seed, epoch=epoch)
        wav, length = wav[start:start + c], c
    else:
        wav, length = torch.nn.functional.pad(wav, (0, c - n)), n
    if as_int16:
        wav = (wav * 32768.0).round().clamp_(-32768, 32767).to(torch.int16)
    return {"audio": wav.contiguous(), "length": length, "index": int(index)}


def decode_clip(data: bytes, index: int, *, clip_samples: int, sample_rate: int, random_crop: bool = True,
                seed: int = 0, epoch: int = 0, as_int16: bool = True) -> dict:
    """Encoded audio bytes -> the item of :func:`clip_item`. Mono 16-bit PCM at ``sample_rate`` is read as int16,
    only the cropped span (the same numbers as the float path: soundfile's float read is ``x / 32768``)."""
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            n, sr = f.frames, f.samplerate
            if n <= 0:
                raise AudioError("the clip has no audio samples")
            if as_int16 and f.channels == 1 and sr == sample_rate and f.subtype == "PCM_16" and n >= MIN_SAMPLES:
                c = clip_samples
                start = _crop_start(n, c, index, random_crop=random_crop, seed=seed, epoch=epoch)
                if start:
                    f.seek(start)
                x = torch.from_numpy(f.read(min(n, c), dtype="int16"))
                length = x.shape[0]
                if length < MIN_SAMPLES:
                    raise AudioError(f"too short: {length} samples < {MIN_SAMPLES}")
                if length < c:
                    x = torch.nn.functional.pad(x, (0, c - length))
                return {"audio": x, "length": length, "index": int(index)}
            x = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the damage
        raise AudioError(f"cannot decode audio ({type(e).__name__}: {e})") from None
    if x.shape[0] == 0:
        raise AudioError("the clip has no audio samples")
    mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError("the audio holds NaN or infinite samples")
    return clip_item(mono, sr, index, clip_samples=clip_samples, sample_rate=sample_rate, random_crop=random_crop,
                     seed=seed, epoch=epoch, as_int16=as_int16)


# --- the dataset ------------------------------------------------------------------------------------------------------


class ShardDataset(torch.utils.data.IterableDataset):
    """Fixed-length clips streamed from tar shards (``DIR/shard-{000000..000099}.tar``, a folder of shards or one
    ``.tar``), in the order, with the bad-member handling and the resume described in the module docstring.

    Items are ``AudioClipDataset``'s (``{"audio", "length", "index"}`` or ``None``), ``index`` being the global clip
    id ``shard_number << 20 | member_number`` (``shard_number``: the shard's position in :attr:`shards`). Call
    ``set_epoch`` / ``load_state_dict`` before creating the DataLoader iterator of an epoch (workers copy the dataset
    then); use :class:`ShardCollate` as the loader's ``collate_fn`` and :class:`ShardBatches` to drive it.
    """

    def __init__(self, source: str | os.PathLike, clip_samples: int, *, sample_rate: int = 16000, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000, as_int16: bool = True,
                 random_crop: bool = True):
        if not isinstance(clip_samples, int) or clip_samples < MIN_SAMPLES:
            raise ValueError(f"clip_samples must be an int >= {MIN_SAMPLES}, got {clip_samples!r}")
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        self.shards, counts = list_shards(source)
        if len(self.shards) < world_size:
            raise DataError(f"{source}: {len(self.shards)} shard(s) for {world_size} processes; every process needs "
                            f"at least one (write more, smaller shards: python -m sslam_fast.shard --shard-size)")
        self.expected = [counts.get(p) for p in self.shards]
        self.source, self.clip_samples, self.sample_rate = str(source), clip_samples, sample_rate
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.shuffle_buffer, self.as_int16, self.random_crop = shuffle_buffer, as_int16, random_crop
        self.epoch = 0
        self.shards_done: set[int] = set()
        self.bad_files: list[tuple[str, str]] = []
        self._new_bad: list[tuple[str, str]] = []  # since the last drain() (ShardCollate)
        self._new_done: list[int] = []

    @property
    def num_clips(self) -> int | None:
        """The clips of all shards by ``shards.json`` (None without an index)."""
        return None if None in self.expected else sum(self.expected)

    def path(self, index: int) -> str:
        return f"{self.shards[index >> MEMBER_BITS]}#{index & ((1 << MEMBER_BITS) - 1)}"

    def shard_order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.shards)).tolist()

    def worker_shards(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """The shards DataLoader worker ``worker`` of this rank reads in ``epoch``, in order (completed ones left
        out)."""
        g, total = worker * self.world_size + self.rank, num_workers * self.world_size
        return [s for s in self.shard_order(epoch)[g::total] if s not in self.shards_done]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (a new epoch forgets the completed shards; the same epoch keeps a loaded state)."""
        if int(epoch) != self.epoch:
            self.epoch, self.shards_done = int(epoch), set()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shards_done": sorted(self.shards_done), "num_shards": len(self.shards),
                "world_size": self.world_size}

    def load_state_dict(self, sd: dict) -> None:
        if int(sd["num_shards"]) != len(self.shards) or int(sd["world_size"]) != self.world_size:
            raise ValueError(f"the saved shard position is for {sd['num_shards']} shards on {sd['world_size']} "
                             f"process(es); this run has {len(self.shards)} shards on {self.world_size}")
        done = {int(s) for s in sd["shards_done"]}
        if any(not 0 <= s < len(self.shards) for s in done):
            raise ValueError(f"shards_done holds shard numbers outside [0, {len(self.shards)})")
        self.epoch, self.shards_done = int(sd["epoch"]), done

    def consume(self, batch: dict) -> None:
        """Record the shards a consumed batch of :class:`ShardCollate` completed (main process)."""
        self.shards_done.update(int(s) for s in batch.get("shards_done", ()))

    def drain(self) -> tuple[list[int], list[tuple[str, str]]]:
        """The shards completed and bad members met since the last call (in the process that iterates)."""
        done, bad = self._new_done, self._new_bad
        self._new_done, self._new_bad = [], []
        return done, bad

    def _emit(self, rec, left: dict, finished: set):
        index, name, data, _, error = rec
        shard = index >> MEMBER_BITS
        left[shard] -= 1
        if left[shard] == 0 and shard in finished:
            self._new_done.append(shard)
        if error is None:
            try:
                return decode_clip(data, index, clip_samples=self.clip_samples, sample_rate=self.sample_rate,
                                   random_crop=self.random_crop, seed=self.seed, epoch=self.epoch,
                                   as_int16=self.as_int16)
            except AudioError as e:
                error = str(e)
            except Exception as e:  # never let one clip kill the job (ALGORITHM §11.7)
                error = f"{type(e).__name__}: {e}"
        self.bad_files.append((name, error))
        self._new_bad.append((name, error))
        return None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, worker * self.world_size + self.rank])
        size = self.shuffle_buffer
        buf: list = []
        left: dict[int, int] = {}  # records of a shard read but not yet yielded
        finished: set[int] = set()  # shards read to their end
        for shard in self.worker_shards(self.epoch, worker, num_workers):
            left[shard] = 0
            records = read_shard(self.shards[shard], shard, self.expected[shard])
            rec = next(records, None)
            if rec is None:
                self._new_done.append(shard)
            while rec is not None:
                following = next(records, None)  # one ahead: the shard is finished when its last record is in
                left[shard] += 1
                if following is None:
                    finished.add(shard)
                if size <= 1:
                    yield self._emit(rec, left, finished)
                elif len(buf) < size:
                    buf.append(rec)
                else:
                    j = int(rng.integers(size))
                    out, buf[j] = buf[j], rec
                    yield self._emit(out, left, finished)
                rec = following
        for k in rng.permutation(len(buf)).tolist():
            yield self._emit(buf[k], left, finished)


def collate_shared(batch: list) -> dict:
    """:func:`sslam_fast.data.collate`, the audio stacked by ``torch.utils.data.default_collate``: in a DataLoader
    worker straight into shared memory, saving the copy into shared memory that sending a batch otherwise makes."""
    good = [b for b in batch if b is not None]
    if not good:
        return collate(batch)
    return {"audio": torch.utils.data.default_collate([b["audio"] for b in good]),
            "lengths": torch.tensor([b["length"] for b in good], dtype=torch.int64),
            "indices": torch.tensor([b["index"] for b in good], dtype=torch.int64),
            "skipped": len(batch) - len(good)}


class ShardCollate:
    """The loader's ``collate_fn`` for a :class:`ShardDataset`: ``inner(items)`` (default :func:`collate_shared`) plus
    ``"shards_done"`` (shards whose last clip is in this batch or an earlier one of its worker) and ``"bad_files"``
    (``(name, reason)`` of this batch's ``None`` items). Runs where the items were read: in a DataLoader worker it
    takes the events from that worker's copy of the dataset (``get_worker_info().dataset``)."""

    def __init__(self, dataset: ShardDataset, inner=collate_shared):
        self.dataset, self.inner = dataset, inner

    def __call__(self, items: list) -> dict:
        info = torch.utils.data.get_worker_info()
        ds = info.dataset if info is not None else self.dataset
        batch = self.inner(items)
        batch["shards_done"], batch["bad_files"] = ds.drain()
        return batch


class ShardBatches:
    """The trainer's batch source over a :class:`ShardDataset` loader (``collate_fn=ShardCollate(dataset)``), the
    counterpart of ``sslam_fast.train.runtime.Batches``: ``next(bad)`` -> ``(batch, readable clips)``, the names of
    unreadable clips appended to ``bad``, batches with no readable clip skipped, ``error_type`` raised after
    ``20 * batch_size`` unreadable items in a row or an epoch with no batch at all. Epochs follow each other;
    ``state_dict()`` is the position to checkpoint after the batches handed out were used (``ShardDataset``'s state
    plus ``batches_done``, informative), ``state`` the one to resume from."""

    def __init__(self, dataset: ShardDataset, loader, *, batch_size: int, state: dict | None = None,
                 error_type: type[Exception] = DataError):
        self.dataset, self.loader, self.batch_size, self.error_type = dataset, loader, batch_size, error_type
        if state is not None:
            dataset.load_state_dict(state)
        self.epoch, self.done = dataset.epoch, int((state or {}).get("batches_done", 0))
        self._it = self._iterate()

    def _iterate(self):
        empty = 0
        while True:
            self.dataset.set_epoch(self.epoch)
            got = False
            for batch in self.loader:
                got = True
                self.dataset.consume(batch)
                self.done += 1
                yield batch
            empty = 0 if got else empty + 1
            if empty >= 2:
                raise self.error_type(f"{self.dataset.source}: the shards gave no batch in two epochs")
            self.epoch, self.done = self.epoch + 1, 0

    def next(self, bad: list[str]) -> tuple[dict, int]:
        n_good, skipped = 0, 0
        while True:
            batch = next(self._it)
            bad += [name for name, _ in batch["bad_files"]]
            got = int(batch["audio"].shape[0])
            n_good += got
            if got:
                return batch, n_good
            skipped += batch["skipped"]
            if skipped >= 20 * self.batch_size:
                raise self.error_type(f"no readable clip in {skipped} items in a row: {', '.join(bad[-5:])}")

    def state_dict(self) -> dict:
        return {**self.dataset.state_dict(), "batches_done": self.done}

    def position(self) -> dict:
        """What the trainer checkpoints for this rank (``state_dict()``; the counterpart of ``Batches.position``)."""
        return self.state_dict()
