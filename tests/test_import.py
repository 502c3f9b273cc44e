"""Importing the package (ops, models, the upstream-structured reference model, metrics, trainer) never initialises
CUDA and works without triton installed."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import sys
    {block}
    import torch
    import sslam_fast, sslam_fast.ops
    import sslam_fast.metrics, sslam_fast.models, sslam_fast.reference.model, sslam_fast.train
    from sslam_fast.ops import kaldi_fbank, eat_features
    assert not torch.cuda.is_initialized(), "importing sslam_fast initialised CUDA"
    assert sys.modules.get("triton") is None, "importing sslam_fast imported triton"
    out = eat_features(torch.randn(2, 4000), target_length=32)
    assert out.shape == (2, 1, 32, 128)
    assert not torch.cuda.is_initialized(), "running an op on CPU tensors initialised CUDA"
    print("ok")
    """
)

# A module set to None in sys.modules is what Python reports for a package that is not installed: import raises
# ImportError and importlib.util.find_spec returns None.
BLOCK_TRITON = "sys.modules['triton'] = None"


@pytest.mark.parametrize("block", ["", BLOCK_TRITON], ids=["with-triton", "without-triton"])
def test_import_is_lazy(block):
    code = PROBE.format(block=block)
    env_code = "import os; os.environ.pop('TRITON_INTERPRET', None)\n" + code
    res = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
