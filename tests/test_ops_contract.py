"""The op contract, over every op: each custom op of ``sslam_fast.ops`` is made by ``_backend.define_op``, passes
``torch.library.opcheck`` with every backend that runs here, and refuses a backend it does not have by name.

A new op added through ``define_op`` without an entry in ``SAMPLES`` fails ``test_every_op_has_a_sample``.
"""

import pytest
import torch
from conftest import OPCHECK_ALL, TRITON_OK

import sslam_fast.ops  # noqa: F401  (defines every op)
from sslam_fast import _backend

CPU = torch.device("cpu")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, grad=False, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=dtype).requires_grad_(grad)


def _perms(rows, n, seed=0):
    g = _g(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(rows)])


def _mask(rows, n, seed=0):
    return torch.rand(rows, n, generator=_g(seed)) < 0.5


# op name -> (backend -> the op's arguments with the backend last, the backends to check)
SAMPLES = {
    "masked_mse": (
        lambda be: (_randn(6, 5, 8, grad=True), _randn(3, 5, 8, grad=True, seed=1), _mask(6, 5), 2, be),
        ["reference", "cpp", "triton"],
    ),
    "masked_mse_backward": (
        lambda be: (torch.tensor(1.5), _randn(6, 5, 8), _randn(3, 5, 8, seed=1), _mask(6, 5), 2, be),
        ["reference", "cpp", "triton"],
    ),
    "clone_gather": (
        lambda be: (_randn(2, 7, 8, grad=True), torch.tensor([[0, 2, 5]] * 6), 3, _randn(8, grad=True, seed=1),
                    _randn(8, grad=True, seed=2), _randn(8, grad=True, seed=3), 1e-6, be),
        ["reference", "cpp", "triton"],
    ),
    "clone_gather_backward": (
        lambda be: (_randn(6, 4, 8), _randn(2, 7, 8, seed=1), torch.tensor([[0, 2, 5]] * 6), 3, _randn(8, seed=2),
                    _randn(8, seed=3), _randn(8, seed=4), 1e-6, be),
        ["reference", "cpp", "triton"],
    ),
    "decoder_scatter": (
        lambda be: (_randn(6, 5, 8, grad=True), _perms(6, 10),
                    None if be == "triton" else 0.01 * _randn(6, 6, 8, seed=1),
                    torch.tensor([12345]) if be == "triton" else None, 0.01, be),
        ["reference", "cpp", "triton"],
    ),
    "decoder_scatter_backward": (
        lambda be: (_randn(6, 10, 8), _perms(6, 10), 4, be),
        ["reference", "cpp", "triton"],
    ),
    "partial_max_mix": (
        lambda be: (_randn(3, 1, 16, 4), torch.tensor([2, 8]), 4, True, be),
        ["reference", "triton"],
    ),
    "mix_waveforms": (
        lambda be: (_randn(3, 300), _randn(3, 300, seed=1), torch.tensor([1.0, -2.0, 3.0]), 0.0, be),
        ["reference", "triton"],
    ),
    "layer_targets": (
        lambda be: (_randn(3, 2, 11, 12, dtype=torch.float16), torch.tensor([3, 0, 10]), be),
        ["reference", "triton"],
    ),
    "ln_gelu_residual": (
        lambda be: (_randn(2, 4, 3, 3, grad=True), _randn(2, 4, 3, 3, grad=True, seed=1), be),
        ["reference", "cpp", "triton"],
    ),
    "ln_gelu_residual_backward": (
        lambda be: (_randn(2, 4, 3, 3), _randn(2, 4, 3, 3, seed=1), be),
        ["reference", "cpp", "triton"],
    ),
    "decoder_block": (
        lambda be: (_randn(2, 4, 3, 3, grad=True), _randn(4, 2, 3, 3, grad=True, seed=1), _randn(4, grad=True, seed=2),
                    2, be),
        ["reference", "cpp", "triton"],
    ),
    "decoder_block_backward": (
        lambda be: (_randn(2, 4, 3, 3), _randn(2, 4, 3, 3, seed=1), _randn(4, 2, 3, 3, seed=2), _randn(4, seed=3), 2,
                    [True, True, True], be),
        ["reference", "cpp", "triton"],
    ),
    "inverse_block_mask": (
        lambda be: (2, 3, 8, 4, 2, 3, 6, 12345, CPU, be),
        ["reference", "cpp", "triton"],
    ),
    "kaldi_fbank": (
        lambda be: (0.1 * _randn(2, 2000), torch.tensor([2000, 1500]), 11, 16000, 128, be),
        ["reference", "cpp", "triton"],
    ),
    "eat_features": (
        lambda be: (0.1 * _randn(2, 2000), torch.tensor([2000, 1500]), 16, -4.268, 4.569, torch.float32, be),
        ["reference", "cpp", "triton"],
    ),
    "attention": (
        lambda be: (_randn(1, 2, 17, 16, grad=True), _randn(1, 2, 17, 16, grad=True, seed=1),
                    _randn(1, 2, 17, 16, grad=True, seed=2), be),
        ["reference", "cpp", "triton"],
    ),
    "attention_backward": (
        lambda be: _attention_backward_sample(be),
        ["reference", "cpp", "triton"],
    ),
    "gelu_mlp": (
        lambda be: (_randn(2, 3, 8, grad=True), _randn(16, 8, grad=True, seed=1), _randn(16, grad=True, seed=2),
                    _randn(8, 16, grad=True, seed=3), _randn(8, grad=True, seed=4), be),
        ["reference"],
    ),
    "gelu_mlp_backward": (
        lambda be: (_randn(2, 3, 8), _randn(2, 3, 8, seed=1), _randn(16, 8, seed=2), _randn(8, 16, seed=3),
                    _randn(2, 3, 16, seed=4), [True] * 5, be),
        ["reference"],
    ),
}


def _attention_backward_sample(be):
    q, k, v = (_randn(1, 2, 17, 16, seed=s) for s in range(3))
    with torch.no_grad():
        out, lse = torch.ops.sslam_fast.attention(q, k, v, be)
    return (_randn(1, 2, 17, 16, seed=3), q, k, v, out, lse, be)


def _cases():
    for name, (_, backends) in sorted(SAMPLES.items()):
        for be in backends:
            marks = [pytest.mark.skipif(not TRITON_OK, reason="no CUDA and no TRITON_INTERPRET=1")] if be == "triton" \
                else []
            yield pytest.param(name, be, id=f"{name}-{be}", marks=marks)


def test_every_op_has_a_sample():
    assert set(_backend.defined_ops()) == set(SAMPLES)


def test_every_custom_op_with_a_backend_argument_is_made_by_define_op():
    with_backend = set()
    for qualname in torch._C._dispatch_get_all_op_names():
        if qualname.startswith("sslam_fast::"):
            name = qualname.split("::", 1)[1].split(".")[0]
            if any(a.name == "backend" for a in getattr(torch.ops.sslam_fast, name).default._schema.arguments):
                with_backend.add(name)
    assert with_backend == set(_backend.defined_ops())


def test_compiled_ops_are_named_after_the_op_not_the_device():
    names = {q.split("::", 1)[1].split(".")[0] for q in torch._C._dispatch_get_all_op_names()
             if q.startswith(f"{_backend.COMPILED_NAMESPACE}::")}
    if not _backend.extension_has("masked_mse"):
        pytest.skip("sslam_fast._C not built")
    assert names and not [n for n in names if n.endswith(("_cpu", "_cuda"))]
    assert {"masked_mse", "masked_mse_backward", "inverse_block_mask", "fbank"} <= names


@pytest.mark.parametrize("name,backend", list(_cases()))
def test_opcheck(name, backend):
    make, _ = SAMPLES[name]
    if backend != "triton" and not _backend.OpBackends.available(_backend._REGISTRY[name], backend, "cpu"):
        pytest.skip(f"{name}: backend {backend} not available here")
    op = getattr(torch.ops.sslam_fast, name).default
    torch.library.opcheck(op, make(backend), test_utils=OPCHECK_ALL)


@pytest.mark.parametrize("bogus", ["bogus", "auto:bogus", "auto", "AUTO:cpp", ""])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_unknown_backend_raises_value_error(name, bogus):
    """A raw op call with a backend name the op does not have raises ValueError naming the op, the bad name and the
    valid ones (not a KeyError from the registry, nor one deferred to the first call under ``auto:``)."""
    args = SAMPLES[name][0]("reference")[:-1]
    with pytest.raises(ValueError, match="backend") as info:
        getattr(torch.ops.sslam_fast, name)(*args, bogus)
    assert repr(bogus) in str(info.value) and "'reference'" in str(info.value)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_reference_runs_named_and_as_an_auto_choice(name):
    make, _ = SAMPLES[name]
    op = getattr(torch.ops.sslam_fast, name)
    a, b = op(*make("reference")), op(*make("auto:reference"))
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        if name == "decoder_scatter" or x is None:
            continue
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_define_op_refuses_an_op_without_a_reference():
    with pytest.raises(ValueError, match="reference"):
        _backend.define_op("contract_test_op", "(Tensor x) -> Tensor", fake=lambda x, b: x, kernels={"cpp": abs})
    with pytest.raises(ValueError, match="unknown backends"):
        _backend.define_op("contract_test_op", "(Tensor x) -> Tensor", fake=lambda x, b: x,
                           kernels={"reference": abs, "gpu": abs})
