"""Options of the pytest-benchmark run of every op (``benchmarks/test_bench_ops.py``).

    pytest benchmarks/ --benchmark-only                              # CPU, bench_ops.py's CPU shapes
    pytest benchmarks/ --benchmark-only --bench-compile              # + torch.compile(reference)
    pytest benchmarks/ --benchmark-only --bench-device cuda          # the real SSLAM shapes, every CUDA backend
    pytest benchmarks/ --benchmark-only --bench-ops attention,masked_mse
    pytest benchmarks/ --benchmark-only --benchmark-save=before      # then, on another commit:
    pytest benchmarks/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

The default test command (``pytest`` from the repository root: ``testpaths = ["tests"]``) does not collect this folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_ops, common


def pytest_addoption(parser):
    group = parser.getgroup("sslam_fast op benchmarks")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default="cpu",
                    help="device of the op benchmarks (cuda: bench_ops.py's CUDA shapes and every CUDA backend)")
    group.addoption("--bench-compile", action="store_true",
                    help="also benchmark torch.compile(reference) (inductor compiles each op first: minutes on a CPU)")
    group.addoption("--bench-ops", default="",
                    help="comma-separated subset of bench_ops.ALL_OPS (default: all)")
