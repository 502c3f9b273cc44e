#!/usr/bin/env bash
# The main job: set-up, then the demo of the ops on generated (and, when present, shipped) recordings.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/python -m sslam_fast.demo "$@"
