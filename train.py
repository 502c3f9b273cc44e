"""Lean SSLAM / EAT pre-training entry point.

    torchrun --standalone --nproc_per_node=N train.py --preset=tiny --run_dir=DIR [--key=value ...] [--resume]
    python train.py --preset=tiny --run_dir=DIR

A run resumes automatically when ``run_dir`` holds a checkpoint; ``--resume`` makes a missing one an error;
``--stop_after=K`` stops after K updates of this invocation (checkpoint saved, as on SIGTERM).
Configuration and data errors print ``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import sys


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
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
