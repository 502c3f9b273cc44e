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
        assert _backend.resolve("toy_op_for_tests", "auto", "cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("toy_op_for_tests", "auto", "cpu") == "reference"


def test_auto_takes_the_preferred_backend_when_available(toy_op, monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    toy_op.checks["cpp"] = lambda d: True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("toy_op_for_tests", "auto", "cpu") == "cpp"


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
    assert _backend.resolve("toy_op_for_tests", "auto", "cpu") == "triton"
    assert _backend.resolve("toy_op_for_tests", "reference", "cpu") == "reference"  # an explicit argument wins
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")  # not implemented by this op: ignored with a warning
    with pytest.warns(RuntimeWarning, match="does not have"):
        assert _backend.resolve("toy_op_for_tests", "auto", "cpu") == "reference"
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
