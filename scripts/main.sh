#!/usr/bin/env bash
# The main job: set-up, then a short SSLAM-style pretraining (EAT stage 1, tiny preset) on the built-in synthetic
# polyphonic set, ending with the linear-probe line: one process per GPU when CUDA is present (NCCL for the model,
# gloo for the host bookkeeping), else 2 CPU processes (gloo). Extra arguments are passed to train.py (e.g.
# --max_updates=100 or --device=cpu). Each run gets its own folder under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh

gpus=$(.venv/bin/python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
nproc=2
if [ "$gpus" -gt 0 ] && [[ " $* " != *" --device=cpu "* ]]; then
    nproc=$gpus
fi
exec .venv/bin/torchrun --standalone --nproc_per_node="$nproc" train.py --preset=tiny --run_dir="runs/tiny-$(date +%Y%m%d-%H%M%S)" "$@"
