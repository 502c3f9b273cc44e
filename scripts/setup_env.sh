#!/usr/bin/env bash
# Creates .venv with the pinned dependencies and installs sslam_fast (editable, C++ extension built) into it.
# Idempotent: a second run only rebuilds what changed. Used by scripts/main.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.sslam_fast_requirements
if [ ! -f "$stamp" ] || ! cmp -s requirements.txt "$stamp"; then
    .venv/bin/pip install --quiet --no-cache-dir --upgrade pip setuptools wheel
    .venv/bin/pip install --quiet --no-cache-dir -r requirements.txt
    cp requirements.txt "$stamp"
fi
# Editable install; setup.py builds sslam_fast._C with ninja (incremental on later runs).
.venv/bin/pip install --quiet --no-build-isolation --no-deps -e . >/dev/null
