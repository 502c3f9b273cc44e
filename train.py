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
    from sslam_fast.train.config import PRESETS, config_help
    from sslam_fast.train.distributed import teardown
    from sslam_fast.train.loop import TrainingError, train
    from sslam_fast.train.runtime import lost_a_peer, reports_here, split_run_flags

    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        text = config_help(__doc__, PRESETS, argv)
        if text is not None:
            print(text)
            return 0
        args, resume, stop_after = split_run_flags(argv)
        cfg = load_config(args)
        train(cfg, resume=resume, stop_after=stop_after)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        if reports_here(e):
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


if __name__ == "__main__":
    sys.exit(main())
