#!/usr/bin/env bash
# The test command: set-up, then the whole suite (Triton kernels under TRITON_INTERPRET=1 on CPU, C++ kernels,
# a compile check of every CUDA source when nvcc is present).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
