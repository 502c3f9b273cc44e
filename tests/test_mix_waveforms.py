"""Additive mixing of waveform pairs at a given SNR: mix_waveforms, every backend against the reference.

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEV, DTYPES, HAS_CUDA, OPCHECK_ALL, TRITON_OK, needs_triton

from sslam_fast import _backend
from sslam_fast.ops import mix_waveforms

BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def _pair(B, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, N, generator=g) * torch.rand(B, 1, generator=g).add(0.1)
    b = torch.randn(B, N, generator=g) * 7.0
    return a.to(dtype).to(DEV), b.to(dtype).to(DEV)


@needs_triton
@pytest.mark.parametrize("B,N", [(1, 1), (3, 17), (5, 1000), (2, 8193), (4, 20000)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_mix_waveforms_triton_matches_reference(B, N, dtype):
    a, b = _pair(B, N, dtype)
    snr = torch.linspace(-10.0, 20.0, B, device=DEV)
    want = mix_waveforms(a, b, snr, backend="reference")
    got = mix_waveforms(a, b, snr, backend="triton")
    assert got.dtype == dtype and got.shape == (B, N)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:  # both round the same fp32 value; they may differ by one ulp at a rounding boundary
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-3)
    assert not torch.allclose(got.float(), a.float(), rtol=1e-3, atol=1e-3)  # b was really added
    assert torch.equal(mix_waveforms(a, b, snr, backend="triton"), got)  # deterministic (no atomics)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mix_waveforms_measured_snr(backend):
    a, b = _pair(4, 16000, seed=1)
    snr = torch.tensor([-5.0, 0.0, 12.5, 30.0], device=DEV)
    out = mix_waveforms(a, b, snr, backend=backend)
    added = out.double() - a.double()  # g b
    measured = 10 * torch.log10(a.double().square().mean(1) / added.square().mean(1))
    torch.testing.assert_close(measured, snr.double(), rtol=0, atol=1e-3)
    # The scalar form gives the same rows as a constant tensor.
    assert torch.equal(
        mix_waveforms(a, b, 6.0, backend=backend),
        mix_waveforms(a, b, torch.full((4,), 6.0, device=DEV), backend=backend),
    )
    assert torch.equal(
        mix_waveforms(a, b, torch.tensor(6.0, device=DEV), backend=backend), mix_waveforms(a, b, 6.0, backend=backend)
    )


def test_mix_waveforms_matches_torchaudio_add_noise():
    AF = pytest.importorskip("torchaudio.functional")
    a, b = _pair(3, 4000, seed=2)
    snr = torch.tensor([3.0, -7.0, 20.0], device=DEV)
    want = AF.add_noise(a.cpu(), b.cpu(), snr.cpu())
    torch.testing.assert_close(mix_waveforms(a, b, snr, backend="reference").cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mix_waveforms_silent_rows(backend):
    a, b = _pair(4, 3000, seed=3)
    b[1] = 0.0  # silent partner: result is a exactly
    a[2] = 0.0  # silent a: g = 0, result is a (zeros)
    a[3] = 0.0
    b[3] = 0.0  # both silent
    out = mix_waveforms(a, b, 10.0, backend=backend)
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[1:], a[1:])
    assert not torch.allclose(out[0], a[0])


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("snr", [-1000.0, 1000.0, -200.5, 1e30])
def test_mix_waveforms_refuses_snr_out_of_range(snr, backend):
    """snr_db=-1000 gave a gain of 1e50: an all inf / NaN mix; +1000 a gain of 0: the mix was a, silently."""
    a, b = _pair(2, 100)
    with pytest.raises(ValueError, match="snr_db must lie in"):
        mix_waveforms(a, b, snr, backend=backend)
    with pytest.raises(ValueError, match="snr_db must lie in"):  # a tensor's range is a value check
        mix_waveforms(a, b, torch.tensor([0.0, snr], device=DEV), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mix_waveforms_snr_range_bounds_are_finite(backend):
    a, b = _pair(3, 100)
    for snr in (-200.0, 200.0):
        assert torch.isfinite(mix_waveforms(a, b, snr, backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mix_waveforms_overflowing_mix_raises(backend):
    """Within the SNR range the gain is finite, but in float16 (max 65504) the scaled partner can overflow: a value
    check raises. With value checks off (the trainer's steady state) neither the range of a tensor snr_db nor the
    mix is read back."""
    from sslam_fast._checks import value_checks

    a, b = _pair(2, 100, torch.float16)
    with pytest.raises(ValueError, match="mix is not finite"):
        mix_waveforms(a, b, -150.0, backend=backend)
    with value_checks(False):
        out = mix_waveforms(a, b, torch.tensor([-150.0, -1000.0], device=DEV), backend=backend)
    assert not torch.isfinite(out).all()


def test_mix_waveforms_bad_input():
    a, b = torch.randn(2, 100), torch.randn(2, 100)
    with pytest.raises(ValueError, match="a must"):
        mix_waveforms(a[0], b[0], 0.0)
    with pytest.raises(ValueError, match="b must"):
        mix_waveforms(a, b.unsqueeze(0), 0.0)
    with pytest.raises(TypeError, match="a must"):
        mix_waveforms(a.to(torch.int16), b, 0.0)
    with pytest.raises(TypeError, match="b must"):
        mix_waveforms(a, b.half(), 0.0)
    with pytest.raises(ValueError, match="b must"):
        mix_waveforms(a, b[:, :99], 0.0)
    bad_a, bad_b = a.clone(), b.clone()
    bad_a[1, 5], bad_b[0, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="a contains"):
        mix_waveforms(bad_a, b, 0.0)
    with pytest.raises(ValueError, match="b contains"):
        mix_waveforms(a, bad_b, 0.0)
    with pytest.raises(ValueError, match="snr_db"):
        mix_waveforms(a, b, float("nan"))
    with pytest.raises(ValueError, match="snr_db"):
        mix_waveforms(a, b, torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="snr_db"):
        mix_waveforms(a, b, torch.zeros(3))
    with pytest.raises(TypeError, match="snr_db"):
        mix_waveforms(a, b, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="snr_db"):
        mix_waveforms(a, b, "10")
    with pytest.raises(ValueError, match="backend"):
        mix_waveforms(a, b, 0.0, backend="Triton")
    with pytest.raises(RuntimeError, match="cpp"):
        mix_waveforms(a, b, 0.0, backend="cpp")


@pytest.mark.skipif(HAS_CUDA, reason="CPU resolution rules")
@pytest.mark.filterwarnings("ignore:.*SSLAM_FAST_BACKEND")
def test_backend_resolution_on_cpu(monkeypatch):
    monkeypatch.delenv("SSLAM_FAST_BACKEND", raising=False)
    # auto never picks the interpreter
    assert _backend.base_name(_backend.resolve("mix_waveforms", "auto", "cpu")) == "reference"
    monkeypatch.setenv("SSLAM_FAST_BACKEND", "cpp")  # the op has no cpp: the variable is ignored
    assert _backend.base_name(_backend.resolve("mix_waveforms", "auto", "cpu")) == "reference"
    if TRITON_OK:
        monkeypatch.setenv("SSLAM_FAST_BACKEND", "triton")
        assert _backend.base_name(_backend.resolve("mix_waveforms", "auto", "cpu")) == "triton"


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_mix_waveforms(backend):
    a, b = _pair(3, 300)
    op = torch.ops.sslam_fast.mix_waveforms.default
    torch.library.opcheck(op, (a, b, torch.tensor([1.0, 2.0, 3.0], device=DEV), 0.0, backend), test_utils=OPCHECK_ALL)
    torch.library.opcheck(op, (a, b, None, 5.0, backend), test_utils=OPCHECK_ALL)


def test_direct_op_call_checks_shapes():
    """``torch.ops.sslam_fast.mix_waveforms`` called directly checks what the kernels index by."""
    op = torch.ops.sslam_fast.mix_waveforms
    a, b = torch.randn(3, 50), torch.randn(3, 50)
    with pytest.raises(ValueError, match="snr_db"):
        op(a, b, torch.zeros(2), 0.0, "reference")
    with pytest.raises(ValueError, match="b must"):
        op(a, b[:, :49], None, 0.0, "reference")
    with pytest.raises(ValueError, match="a must"):
        op(a[0], b[0], None, 0.0, "reference")



# --- CUDA -------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_cuda_upstream_shapes(dtype):
    a = torch.randn(12, 160000, device="cuda").to(dtype)
    b = torch.randn(12, 160000, device="cuda").to(dtype) * 3
    snr = torch.linspace(-5, 25, 12, device="cuda")
    got, want = mix_waveforms(a, b, snr), mix_waveforms(a, b, snr, backend="reference")
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol[0], atol=tol[1])
    assert _backend.base_name(_backend.resolve("mix_waveforms", "auto", "cuda")) == "triton"
