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


def main(argv: list[str] | None = None) -> int:
    from sslam_fast.train import load_config
    from sslam_fast.train.config import PRESETS
    from sslam_fast.train.loop import train
    from sslam_fast.train.runtime import run_entry_point

    def body(args: list[str], resume: bool, stop_after: int | None) -> None:
        train(load_config(args), resume=resume, stop_after=stop_after)

    return run_entry_point(__doc__, PRESETS, argv, body)


if __name__ == "__main__":
    sys.exit(main())
