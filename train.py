"""Lean SSLAM / EAT pre-training entry point.

    torchrun --standalone --nproc_per_node=N train.py --preset=tiny --run_dir=DIR [--key=value ...] [--resume]
    python train.py --preset=tiny --run_dir=DIR

A run resumes automatically when ``run_dir`` holds a checkpoint; ``--resume`` makes a missing one an error;
``--stop_after=K`` stops after K updates of this invocation (checkpoint saved, as on SIGTERM).
Configuration, data and checkpoint errors print one ``error: ...`` line (under torchrun on the rank that met it,
or on rank 0 when every rank did) and exit with code 2; a rank that loses another process of the run says so in
one line and exits with 1 (torchrun ``--max-restarts`` then restarts the group from the last checkpoint).
"""

from __future__ import annotations

import sys

import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    from sslam_fast.checkpoint import CheckpointError
    from sslam_fast.data import DataError
    from sslam_fast.train import ConfigError, load_config
    from sslam_fast.train.distributed import teardown
    from sslam_fast.train.loop import TrainingError, train

    args = list(sys.argv[1:] if argv is None else argv)
    resume, stop_after = False, None
    for a in list(args):
        if a.startswith("--stop_after="):
            args.remove(a)
            try:
                stop_after = int(a.split("=", 1)[1])
            except ValueError:
                print(f"error: bad value for --stop_after: {a!r}", file=sys.stderr)
                return 2
            continue
        if a in ("--resume", "--resume=true", "--resume=1"):
            resume = True
            args.remove(a)
        elif a in ("--resume=false", "--resume=0"):
            args.remove(a)
    try:
        cfg = load_config(args)
        train(cfg, resume=resume, stop_after=stop_after)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        if _reports(e):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if not _lost_a_peer(e):
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


# what gloo raises (a plain RuntimeError) when the process at the other end of a connection is gone
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _lost_a_peer(e: RuntimeError) -> bool:
    """Whether ``e`` is a collective that failed because another process of the group died."""
    if not dist.is_initialized():
        return False
    return isinstance(e, dist.DistError) or any(s in str(e) for s in _PEER_GONE)


def _reports(e: Exception) -> bool:
    """Whether this process prints ``e``: the trainer marks an error that another rank reports (``print_here``);
    otherwise rank 0 prints one that every rank of a process group hit alike, and a process without a group (one
    process, or a rank that failed before joining) prints its own."""
    mark = getattr(e, "print_here", None)
    if mark is not None:
        return bool(mark)
    return not dist.is_initialized() or dist.get_rank() == 0


if __name__ == "__main__":
    sys.exit(main())
