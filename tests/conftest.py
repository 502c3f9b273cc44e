"""Test set-up: without a GPU, Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before anything imports triton, hence here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def make_run_base(tmp_path_factory):
    """A factory of folders for trainer runs (``base / <name>``): the built-in synthetic set is generated once per
    session and linked into each as ``default_data``, where the trainer looks for it (``<run_dir>/../default_data``)."""
    from sslam_fast.data import make_default_dataset

    shared = tmp_path_factory.mktemp("synthetic") / "default_data"
    make_default_dataset(shared)

    def make(name: str):
        b = tmp_path_factory.mktemp(name)
        (b / "default_data").symlink_to(shared, target_is_directory=True)
        return b

    return make
