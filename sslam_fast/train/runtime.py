"""The run scaffolding shared by the pre-trainer (``train.py``) and the fine-tuner (``finetune.py``): rank-0 start-up
work that every rank hears the outcome of, the run folder and its ``metrics.jsonl``, the progress line, unreadable
files gathered over the ranks, and the loader's batches from a saved position on."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from sslam_fast._files import write_text_atomic
from sslam_fast.train.distributed import DistEnv

__all__ = [
    "BAD_EXAMPLES",
    "lost_a_peer",
    "reports_here",
    "split_run_flags",
    "Batches",
    "NoReadableFile",
    "Progress",
    "TrainingError",
    "check_run_dir",
    "gather",
    "on_main",
    "open_run_dir",
    "prepare_run",
    "record_bad_files",
    "remove_if_empty",
    "reported_elsewhere",
    "run_entry_point",
    "agree_before_update",
    "settle_bad_files",
    "trim_metrics",
]


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite losses in a row, a missing checkpoint for ``resume=True``)."""


def reported_elsewhere(e: Exception) -> Exception:
    """Mark ``e`` as not this process's to print (``train.py`` prints an error on the process that hit it, or on rank 0
    for one that every rank hit alike): with torchrun, one process says what went wrong, not every rank."""
    e.print_here = False
    return e


class NoReadableFile(TrainingError):
    """A rank's loader gave only unreadable files for ``20 * batch_size`` items in a row."""


class Progress:
    """The trainer's progress on rank 0: a bar with the loss, lr and clips/s when stderr is a terminal (refreshed on
    log steps, the only steps that read them back), else one line ``step N: loss=... lr=... clips/s=...`` per log
    step, so that a redirected log gets no carriage-return updates (``sslam_fast._progress``)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from sslam_fast._progress import is_terminal, progress_bar

        self.enabled = enabled
        self.bar = progress_bar(total, initial=initial, desc="train", unit="step") if enabled and is_terminal() \
            else None

    def update(self, step: int, rec: dict | None) -> None:
        if not self.enabled:
            return
        post = None
        if rec is not None:
            loss = "n/a" if rec["loss"] is None else f"{rec['loss']:.4f}"
            post = {"loss": loss, "lr": f"{rec['lr']:.2e}", "clips/s": f"{rec['clips_per_s']:.1f}"}
        if self.bar is not None:
            self.bar.update(1)
            if post:
                self.bar.set_postfix(post, refresh=False)
        elif post:
            print(f"step {step}: " + " ".join(f"{k}={v}" for k, v in post.items()), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def on_main(env: DistEnv, fn):
    """``fn()`` on rank 0 alone, after which every rank learns whether it raised, so that no rank is left waiting in
    a collective that a failed rank 0 never reaches. Rank 0 raises its own error (the one printed), the other ranks
    a quiet one."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # anything, a bug included: the other ranks must not hang on it
            error = e
    failed = error is not None
    if env.world > 1:
        failed = env.all_reduce_(torch.tensor([float(failed)], dtype=torch.float64)).tolist()[0] > 0
    if error is not None:
        raise error
    if failed:
        raise reported_elsewhere(TrainingError("rank 0 failed to start the run"))
    return result


def check_run_dir(run_dir: Path) -> None:
    """A ``ConfigError`` when ``run_dir`` cannot be created or written in, found without creating it (a run that fails
    a start-up check leaves no empty folder behind)."""
    from sslam_fast.train.config import ConfigError

    path = run_dir.absolute()
    existing = next(a for a in (path, *path.parents) if a.exists())  # "/" exists
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise ConfigError(f"run_dir {run_dir} {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir {run_dir} cannot be written: {existing} is read-only or not writable by this user")


def prepare_run(env: DistEnv, run_dir: Path, synthetic_root: Path | None) -> None:
    """Rank 0's start-up work before any rank reads its results (:func:`on_main`): check ``run_dir`` without creating
    it, and generate the built-in synthetic set (cached) at ``synthetic_root`` when the run uses it (not None)."""

    def work():
        from sslam_fast.data import DataError, make_default_dataset

        check_run_dir(run_dir)
        if synthetic_root is not None:
            try:
                make_default_dataset(synthetic_root)
            except OSError as e:
                raise DataError(f"cannot write the built-in data set to {synthetic_root}: {e.strerror or e}") from None

    on_main(env, work)


def open_run_dir(run_dir: Path, step: int) -> bool:
    """Create ``run_dir`` (True when this call created it), check that a file can be written in it, and trim its
    ``metrics.jsonl`` to the steps the checkpoint resumed from covers (:func:`trim_metrics`)."""
    from sslam_fast.train.config import ConfigError

    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
        trim_metrics(run_dir / "metrics.jsonl", step)
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir}: cannot write there ({e.strerror or e})") from None
    return created


def trim_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps ``<= step`` in ``metrics.jsonl``, atomically (written aside, then renamed).

    A run resumes from the checkpoint of update ``step``: the lines a killed run logged after it are logged again as
    the resumed run redoes those updates, the summary lines of earlier invocations describe a run that goes on, and a
    kill can leave half a line. Dropping them makes the file of a resumed run read as one run."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # half a line, cut by a kill
            continue
        if isinstance(rec, dict) and not rec.get("summary") and isinstance(rec.get("step"), int) \
                and rec["step"] <= step:
            keep.append(line)
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in keep))


BAD_EXAMPLES = 3  # unreadable files named in the final "done:" line (bad_files.txt lists them all)


def gather(env: DistEnv, obj) -> list:
    """``obj`` of every rank, in rank order (a collective: every rank calls it at the same point)."""
    if env.world == 1:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def record_bad_files(path: Path, names: list[str]) -> list[str]:
    """Add ``names`` to ``bad_files.txt`` (one path a line, each once, kept over resumes); returns all it lists."""
    try:
        old = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        merged = list(dict.fromkeys([*old, *names]))
        if len(merged) != len(old):
            write_text_atomic(path, "".join(n + "\n" for n in merged))
        return merged
    except OSError as e:  # the list is a report: not worth failing the run over
        print(f"warning: cannot write {path}: {e.strerror or e}", file=sys.stderr, flush=True)
        return list(dict.fromkeys(names))


def remove_if_empty(run_dir: Path) -> None:
    """Remove ``run_dir`` when it holds nothing (a run that stopped before writing anything)."""
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only an empty folder is removed


class Batches:
    """The loader's batches in the sampler's order, from a saved position on; a batch of only unreadable files is
    skipped (and its files counted as bad), like any unreadable file. ``cfg`` gives ``seed`` and ``batch_size``; the
    sampler yields lists of indices and has ``load_state_dict({"epoch", "batches_done"})`` and ``batches(epoch)``
    (:class:`sslam_fast.data.ResumableSampler`)."""

    def __init__(self, cfg, dataset, loader, sampler, epoch: int, done: int):
        self.cfg, self.dataset, self.loader, self.sampler = cfg, dataset, loader, sampler
        self.epoch, self.done = epoch, done
        self._it = self._iterate()

    def _iterate(self):
        while True:
            self.sampler.load_state_dict({"epoch": self.epoch, "batches_done": self.done})
            self.dataset.set_epoch(self.epoch)
            self.loader.generator.manual_seed(self.cfg.seed * 7919 + self.epoch)  # worker seeds: the epoch only
            expected = self.sampler.batches(self.epoch)
            for batch in self.loader:
                idx = expected[self.done]
                self.done += 1
                yield batch, idx
            self.epoch, self.done = self.epoch + 1, 0

    def position(self) -> dict:
        """The position a checkpoint saves: ``{"epoch", "batches_done"}`` of the batches handed out."""
        return {"epoch": int(self.epoch), "batches_done": int(self.done)}

    def next(self, bad: list[str]) -> tuple[dict, int]:
        """The next batch with a readable file and its count of readable files; unreadable ones go to ``bad``."""
        n_good, skipped = 0, 0
        while True:
            batch, idx = next(self._it)
            got = set(batch["indices"].tolist())  # a CPU tensor of the collated batch: no device involved
            bad += [str(self.dataset.path(i)) for i in idx if i not in got]
            n_good += len(got)
            if got:
                return batch, n_good
            skipped += len(idx)
            if skipped >= 20 * self.cfg.batch_size:
                raise NoReadableFile(f"no readable file in {skipped} items in a row: {', '.join(bad[-5:])}")


def split_run_flags(args: list[str]) -> tuple[list[str], bool, int | None]:
    """``(the other arguments, resume, stop_after)`` of a ``train.py`` / ``finetune.py`` command line: ``--resume``
    (``=true|1``; ``=false|0`` is dropped) and ``--stop_after=K``. Raises ``ConfigError`` for a bad ``K``."""
    from sslam_fast.train.config import ConfigError

    rest, resume, stop_after = [], False, None
    for a in args:
        if a.startswith("--stop_after="):
            try:
                stop_after = int(a.split("=", 1)[1])
            except ValueError:
                raise ConfigError(f"bad value for --stop_after: {a!r}") from None
        elif a in ("--resume", "--resume=true", "--resume=1"):
            resume = True
        elif a not in ("--resume=false", "--resume=0"):
            rest.append(a)
    return rest, resume, stop_after


# what gloo raises (a plain RuntimeError) when the process at the other end of a connection is gone
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_a_peer(e: RuntimeError) -> bool:
    """Whether ``e`` is a collective that failed because another process of the group died."""
    if not dist.is_initialized():
        return False
    return isinstance(e, dist.DistError) or any(s in str(e) for s in _PEER_GONE)


def reports_here(e: Exception) -> bool:
    """Whether this process prints ``e``: the trainer marks an error that another rank reports (``print_here``);
    otherwise rank 0 prints one that every rank of a process group hit alike, and a process without a group (one
    process, or a rank that failed before joining) prints its own."""
    mark = getattr(e, "print_here", None)
    if mark is not None:
        return bool(mark)
    return not dist.is_initialized() or dist.get_rank() == 0


def run_entry_point(doc: str, presets: dict, argv: list[str] | None, body) -> int:
    """The ``main`` of ``train.py`` and ``finetune.py``: ``--help`` prints ``doc`` and the settings; otherwise
    ``body(args, resume, stop_after)`` runs on the command line without ``--resume`` / ``--stop_after``. Returns the
    exit code: 0; 2 after one ``error: ...`` line for a configuration, data, checkpoint or training error (on the
    process that reports it, see :func:`reports_here`); 1 when this rank lost another process of the run (torchrun
    ``--max-restarts`` then restarts the group from the last checkpoint). Any other exception is a bug and propagates
    with its traceback. The process group is torn down in every case."""
    from sslam_fast.checkpoint import CheckpointError
    from sslam_fast.data import DataError
    from sslam_fast.train.config import ConfigError, config_help
    from sslam_fast.train.distributed import teardown

    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        text = config_help(doc, presets, argv)
        if text is not None:
            print(text)
            return 0
        body(*split_run_flags(argv))
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        # a command line that does not parse fails alike on every rank, before any process group: rank 0 says so
        same_everywhere = isinstance(e, ConfigError) and not dist.is_initialized()
        if reports_here(e) and not (same_everywhere and os.environ.get("RANK", "0") != "0"):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if not lost_a_peer(e):
            raise  # a bug: the traceback says where
        # Another process of the run died (killed, out of memory) and this one lost it in a collective: not a bug of
        # this process. torchrun stops the group, and restarts it from the last checkpoint if --max-restarts allows.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: rank {dist.get_rank()}: lost another process of the run ({first})", file=sys.stderr,
              flush=True)
        return 1
    finally:
        teardown()
    return 0


def agree_before_update(env: DistEnv, stop, n_good: int, n_bad: int, no_data: bool, monitor,
                        counters: dict) -> tuple[str | None, str | None]:
    """The host bookkeeping of one update, summed over the ranks on the CPU (gloo) before it starts, so that every rank
    sees the same totals and stops at the same point, never inside an update that another rank does not make: this
    rank's readable and unreadable files of the update, whether its loader ran dry (``no_data``) and whether it was
    asked to stop (``stop``: a :class:`sslam_fast.train.state.GracefulExit`). Returns ``(failure, stop_reason)``:
    ``("no_data" | "bad_files", None)``, ``(None, signal name)``, or ``(None, None)`` to go on, in which case the
    totals were added to ``monitor`` (:class:`sslam_fast.data.BadFileMonitor`) and to ``counters`` (``good_files``,
    ``bad_files``, ``clips``: each readable file is one clip). A stop leaves the update's batches and counts to the
    resumed run."""
    import signal

    flags = torch.tensor([stop.requested, n_good, n_bad, no_data], dtype=torch.float64)
    stopping, n_good, n_bad, n_no_data = (int(v) for v in env.all_reduce_(flags).tolist())
    if n_no_data:
        return "no_data", None
    if stopping:
        return None, signal.Signals(stop.signum).name if stop.signum else "a signal to another rank"
    monitor.add(n_good, n_bad)
    if monitor.exceeded():
        return "bad_files", None
    counters["good_files"] += n_good
    counters["bad_files"] += n_bad
    counters["clips"] += n_good
    return None, None


def settle_bad_files(env: DistEnv, run_dir: Path, bad_seen, no_data: str | None, failure: str | None, monitor,
                     note: str, created: bool) -> list[str]:
    """The data outcome of a run, after its loop (on every rank): the unreadable files of all ranks, listed once each
    in ``<run_dir>/bad_files.txt`` by rank 0 and returned (as recorded there); for a ``failure`` (``"no_data"``: each
    rank's ``no_data`` message; ``"bad_files"``: the ``monitor``'s verdict) a ``DataError`` with ``note`` appended is
    raised instead, after rank 0 has removed ``run_dir`` if this run ``created`` it and left it empty."""
    from sslam_fast.data import DataError

    gathered = gather(env, (list(bad_seen), no_data))
    bad_names = list(dict.fromkeys(name for names, _ in gathered for name in names))
    if env.is_main and bad_names:
        bad_names = record_bad_files(run_dir / "bad_files.txt", bad_names)
    if failure is None:
        return bad_names
    if failure == "no_data":
        msgs = [m if env.world == 1 else f"rank {r}: {m}" for r, (_, m) in enumerate(gathered) if m]
        err = DataError("; ".join(msgs) + note)
    else:
        err = DataError(str(monitor.error(bad_names)) + note)
    if env.is_main and created:
        remove_if_empty(run_dir)
    raise err
