#!/usr/bin/env bash
# The main job: set-up, then a short SSLAM-style pretraining (EAT stage 1, tiny preset) on the built-in synthetic
# polyphonic set with 2 processes (torchrun, gloo on CPU), ending with the linear-probe line. Extra arguments are
# passed to train.py (e.g. --max_updates=100). Each run gets its own folder under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh

exec .venv/bin/torchrun --standalone --nproc_per_node=2 train.py --preset=tiny --run_dir="runs/tiny-$(date +%Y%m%d-%H%M%S)" "$@"
