"""The backend dispatcher: auto picks the fastest available, falls back with one warning; explicit names raise."""

import warnings

import pytest

from sslam_fast import _backend


@pytest.fixture
def toy_op():
    ops = _backend.register_op(
        _backend.OpBackends(
            "toy_op_for_tests",
            kernels={"reference": lambda: "ref", "cpp": lambda: "cpp", "triton": lambda: "tri"},
            checks={"cpp": lambda d: False},  # as if the extension were not built
        )
    )
    yield ops
    _backend._REGISTRY.pop("toy_op_for_tests")
    _backend._WARNED.difference_update({w for w in _backend._WARNED if w[0] == "toy_op_for_tests"})


def test_auto_falls_back_with_a_single_warning(toy_op, monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    with pytest.warns(RuntimeWarning, match="'cpp' unavailable"):
        assert _backend.base_name(_backend.resolve("toy_op_for_tests", "auto", "cpu")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.base_name(_backend.resolve("toy_op_for_tests", "auto", "cpu")) == "reference"


def test_auto_takes_the_preferred_backend_when_available(toy_op, monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    toy_op.checks["cpp"] = lambda d: True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.base_name(_backend.resolve("toy_op_for_tests", "auto", "cpu")) == "cpp"


def test_explicit_unavailable_backend_raises(toy_op):
    with pytest.raises(RuntimeError, match="'cpp' is not available"):
        _backend.resolve("toy_op_for_tests", "cpp", "cpu")
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        _backend.resolve("toy_op_for_tests", "cuda", "cpu")


def test_triton_on_cpu_only_under_the_interpreter(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="'triton' is not available"):
        _backend.resolve("toy_op_for_tests", "triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("toy_op_for_tests", "triton", "cpu") == "triton"


def test_env_var_replaces_auto(toy_op, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.base_name(_backend.resolve("toy_op_for_tests", "auto", "cpu")) == "triton"
    assert _backend.resolve("toy_op_for_tests", "reference", "cpu") == "reference"  # an explicit argument wins
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")  # not implemented by this op: ignored with a warning
    with pytest.warns(RuntimeWarning, match="does not have"):
        assert _backend.base_name(_backend.resolve("toy_op_for_tests", "auto", "cpu")) == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")  # implemented but unavailable: raises
    with pytest.raises(RuntimeError, match="'cpp' is not available"):
        _backend.resolve("toy_op_for_tests", "auto", "cpu")


@pytest.mark.parametrize("bad", ["fastest", "", None, 3])
def test_bad_backend_names(toy_op, bad):
    with pytest.raises(ValueError, match="backend"):
        _backend.resolve("toy_op_for_tests", bad, "cpu")


def test_unsupported_device(toy_op):
    with pytest.raises(ValueError, match="device"):
        _backend.resolve("toy_op_for_tests", "auto", "meta")


# --- a kernel that fails on its first call falls back under auto ------------------------------------------------------


@pytest.fixture
def failing_op():
    calls = {"cpp": 0, "reference": 0}

    def broken(x):
        calls["cpp"] += 1
        raise RuntimeError("PTX .version 9.9 does not support .target sm_90 (made to fail)")

    def reference(x):
        calls["reference"] += 1
        return x * 2

    _backend.register_op(
        _backend.OpBackends("failing_op_for_tests", kernels={"reference": reference, "cpp": broken},
                            checks={"cpp": lambda d: True})
    )
    _backend.reset_fallbacks()
    yield calls
    _backend._REGISTRY.pop("failing_op_for_tests")
    _backend._WARNED.difference_update({w for w in _backend._WARNED if w[0] == "failing_op_for_tests"})
    _backend.reset_fallbacks()


def test_auto_drops_a_kernel_whose_first_call_raises(failing_op, monkeypatch):
    import torch

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x = torch.arange(3.0)
    chosen = _backend.resolve("failing_op_for_tests", "auto", "cpu")
    assert chosen == "auto:cpp" and _backend.base_name(chosen) == "cpp"
    with pytest.warns(RuntimeWarning, match=r"failing_op_for_tests: backend 'cpp' failed .*made to fail.* using 'ref"):
        out = _backend.kernel("failing_op_for_tests", chosen)(x)
    torch.testing.assert_close(out, x * 2)  # the next backend's result, not a silent different one
    assert failing_op == {"cpp": 1, "reference": 1}
    # dropped for this op and device: auto now resolves to the next backend, and a stale choice is redirected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only
        assert _backend.resolve("failing_op_for_tests", "auto", "cpu") == "reference"
        torch.testing.assert_close(_backend.kernel("failing_op_for_tests", chosen)(x), x * 2)
    assert failing_op == {"cpp": 1, "reference": 2}


def test_an_explicit_backend_that_fails_still_raises(failing_op, monkeypatch):
    import torch

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    chosen = _backend.resolve("failing_op_for_tests", "cpp", "cpu")
    with pytest.raises(RuntimeError, match="made to fail"):
        _backend.kernel("failing_op_for_tests", chosen)(torch.ones(2))
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")  # the environment variable names it explicitly too
    with pytest.raises(RuntimeError, match="made to fail"):
        _backend.kernel("failing_op_for_tests", _backend.resolve("failing_op_for_tests", "auto", "cpu"))(torch.ones(2))


def test_a_kernel_that_ran_once_is_trusted(failing_op, monkeypatch):
    """Only a first call falls back: a later failure of a kernel that worked (out of memory, say) propagates."""
    import torch

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    ops = _backend._REGISTRY["failing_op_for_tests"]
    broken = ops.kernels["cpp"]
    ops.kernels["cpp"] = lambda x: x * 2
    chosen = _backend.resolve("failing_op_for_tests", "auto", "cpu")
    _backend.kernel("failing_op_for_tests", chosen)(torch.ones(2))
    ops.kernels["cpp"] = broken
    with pytest.raises(RuntimeError, match="made to fail"):
        _backend.kernel("failing_op_for_tests", chosen)(torch.ones(2))


def test_a_real_op_falls_back_inside_its_custom_op(monkeypatch):
    """masked_mse with its C++ kernel made to fail: auto returns the reference's loss and gradient, with a warning."""
    import torch

    from sslam_fast.ops import masked_mse
    from sslam_fast.reference.masked_mse import masked_mse as ref_loss

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    if _backend.base_name(_backend.resolve("masked_mse", "auto", "cpu")) != "cpp":
        pytest.skip("the C++ extension is not built")
    _backend.reset_fallbacks()

    def broken(*args):
        raise RuntimeError("illegal instruction (made to fail)")

    for name in ("masked_mse", "masked_mse_backward"):
        monkeypatch.setitem(_backend._REGISTRY[name].kernels, "cpp", broken)
    try:
        g = torch.Generator().manual_seed(0)
        pred = torch.randn(6, 10, 8, generator=g, requires_grad=True)
        target = torch.randn(3, 10, 8, generator=g)
        mask = torch.rand(6, 10, generator=g) < 0.5
        with pytest.warns(RuntimeWarning, match="masked_mse: backend 'cpp' failed"):
            loss = masked_mse(pred, target, mask, clones=2)
            loss.backward()
        p2 = pred.detach().clone().requires_grad_(True)
        want = ref_loss(p2, target, mask, 2)
        want.backward()
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(pred.grad, p2.grad)
        with pytest.raises(RuntimeError, match="made to fail"):
            masked_mse(pred, target, mask, clones=2, backend="cpp")
    finally:
        _backend.reset_fallbacks()
