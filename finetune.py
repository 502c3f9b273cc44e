"""Fine-tuning and linear evaluation of a pretrained SSLAM / EAT encoder, with upstream's recipes.

    torchrun --standalone --nproc_per_node=N finetune.py --preset=as20k --init_checkpoint=CKPT \\
        --data=DIR/train.tsv --valid_data=DIR/eval.tsv --run_dir=DIR [--key=value ...] [--resume]
    python finetune.py --preset=esc50 --init_checkpoint=CKPT --data=ESC-50/audio_by_class --folds=all
    python finetune.py --preset=spass --init_checkpoint=CKPT --data=... --linear=true      # linear evaluation
    python finetune.py --preset=tiny --init_checkpoint=runs/tiny/checkpoint_last.pt          # the built-in comparison

Presets: as20k (default), as2m, esc50, spc2, spass, tiny; then ``--config FILE`` (YAML), then ``--key=value``, as
``train.py``. A run resumes automatically when ``run_dir`` holds ``checkpoint_last.pt``; ``--resume`` makes a missing
one an error; ``--stop_after=K`` stops after K updates of this invocation (checkpoint saved, as on SIGTERM).

``--preset=tiny`` on the built-in synthetic set with an ``--init_checkpoint`` (and neither ``--linear`` nor
``--folds``) runs three: fine-tuning from the checkpoint, linear evaluation from it, and the same fine-tuning from a
random encoder (in ``<run_dir>/finetuned``, ``linear``, ``random_init``), and ends with one line ``fine-tune mAP:
finetuned=0.XXX linear=0.YYY random-init=0.ZZZ``; ``--compare=false`` runs the fine-tuning alone.

Configuration, data and checkpoint errors print one ``error: ...`` line and exit with code 2; a rank that loses
another process of the run says so in one line and exits with 1.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from sslam_fast.finetune.config import PRESETS, load_finetune_config
    from sslam_fast.finetune.loop import demonstration, finetune
    from sslam_fast.train.runtime import run_entry_point

    def body(args: list[str], resume: bool, stop_after: int | None) -> None:
        compare = _compare_flag(args)
        cfg = load_finetune_config(args)
        if compare is None:
            compare = cfg.preset == "tiny" and bool(cfg.init_checkpoint) and cfg.data == "" \
                and cfg.linear == "false" and cfg.folds == ""
        run = demonstration if compare else finetune
        run(cfg, resume=resume, stop_after=stop_after)

    return run_entry_point(__doc__, PRESETS, argv, body)


def _compare_flag(args: list[str]) -> bool | None:
    """Remove ``--compare=true|false`` from ``args``; its value, or None when absent (the preset decides)."""
    from sslam_fast.train import ConfigError

    value = None
    for a in list(args):
        if a.startswith("--compare="):
            args.remove(a)
            v = a.split("=", 1)[1].strip().lower()
            if v not in ("true", "false", "1", "0"):
                raise ConfigError(f"bad value for --compare: {a!r} (true or false)")
            value = v in ("true", "1")
    return value


if __name__ == "__main__":
    sys.exit(main())
