"""scripts/gpu_check.sh on a machine without CUDA: it must stop at once with its own exit code and a clear message,
before the set-up, the tests or any benchmark run, and without creating its log folder.

The script is run with a PATH holding nothing (so no nvidia-smi, whatever the machine has installed), by an absolute
bash, with the log folder pointed into tmp_path so that a wrong run could not touch runs/.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
NO_CUDA = 77  # documented in the script's header
BASH = shutil.which("bash") or "/bin/bash"


def _run(tmp_path: Path, **env_changes) -> tuple[subprocess.CompletedProcess, float, Path]:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    log_dir = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=str(empty_bin), GPU_CHECK_LOG_DIR=str(log_dir), **env_changes)
    t0 = time.monotonic()
    # the timeout only guards the suite: the script is expected back in seconds
    res = subprocess.run([BASH, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return res, time.monotonic() - t0, log_dir


def _assert_stopped_at_once(res: subprocess.CompletedProcess, log_dir: Path) -> None:
    assert res.returncode == NO_CUDA, (res.returncode, res.stdout, res.stderr)
    assert "no usable CUDA device" in res.stderr and f"code {NO_CUDA}" in res.stderr, res.stderr
    assert "[setup]" not in res.stdout and "[tests]" not in res.stdout, res.stdout  # no stage started
    assert not log_dir.exists()


def test_script_is_executable_bash():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert f"{NO_CUDA}" in SCRIPT.read_text().split("set -euo pipefail")[0]  # the code is in the header


def test_hidden_gpus_exit_at_once(tmp_path):
    """CUDA_VISIBLE_DEVICES="" hides every GPU: decided by bash alone, before anything else runs."""
    res, elapsed, log_dir = _run(tmp_path, CUDA_VISIBLE_DEVICES="")
    _assert_stopped_at_once(res, log_dir)
    assert "CUDA_VISIBLE_DEVICES" in res.stderr
    assert elapsed < 10, elapsed


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script would go on to the whole check")
def test_no_nvidia_smi_falls_back_to_torch(tmp_path):
    """No nvidia-smi on PATH: torch in .venv (or, without one, the absent /dev/nvidia<N>) says there is no GPU."""
    res, elapsed, log_dir = _run(tmp_path)
    _assert_stopped_at_once(res, log_dir)
    assert elapsed < 60, elapsed  # one torch import, not the set-up
