"""Test set-up: without a GPU, Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before anything imports triton, hence here, at collection time.
"""

import contextlib
import functools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sslam_fast import _backend  # noqa: E402  (after TRITON_INTERPRET is set)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"  # where the shared tests put their tensors
TRITON_OK = _backend.triton_importable() and (HAS_CUDA or _backend.triton_interpreter())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here (no CUDA and no TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
on_cpu_only = pytest.mark.skipif(HAS_CUDA, reason="checks CPU behaviour (the CUDA tests run the kernels for real)")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ID = {v: k for k, v in DTYPES.items()}
# torch.library.opcheck's checks, all of them
OPCHECK_ALL = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def needs_cpp(*compiled_ops: str):
    """Skip unless sslam_fast._C was built with every ``torch.ops.sslam_fast_C.<op>`` named."""
    missing = [op for op in compiled_ops if not _backend.extension_has(op)]
    return pytest.mark.skipif(bool(missing), reason=f"sslam_fast._C was built without {', '.join(missing)}")


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


class SyncCounter(TorchDispatchMode):
    """Counts the ATen calls that read a tensor's value back to the host (``.item()``, ``bool(t)``, ``nonzero``, ...):
    on a GPU each is a device sync. A steady-state training step must make none."""

    OPS = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.masked_select.default,
    }

    def __init__(self):
        super().__init__()
        self.n = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.n += 1
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def compiles_once(monkeypatch, stepper_cls):
    """For a trainer's ``torch.compile`` test: ``torch.compile`` uses the ``aot_eager`` backend (dynamo's guards are
    what decide a recompile; no inductor code generation, minutes less on a small CPU), and ``stepper_cls.run`` is
    wrapped so that after each update the count of dynamo's unique graphs is appended to the list this yields, and
    after the first update (step 0) a recompilation is an error. Dynamo's state is reset on the way in and out."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    orig = stepper_cls.run

    def run(self, step, *args, **kwargs):
        out = orig(self, step, *args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        if step == 0:  # compiled by now: from here on a recompilation is an error
            torch._dynamo.config.error_on_recompile = True
        return out

    monkeypatch.setattr(stepper_cls, "run", run)
    try:
        yield graphs
    finally:  # set back directly: monkeypatch's undo of a dynamo config key removes the key
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
