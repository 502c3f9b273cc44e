"""Every op of ``bench_ops.py`` against its peer under pytest-benchmark: the same cases (``bench_ops.build_cases``,
the same shapes and inputs), the same paths (``reference``; ``torch.compile(reference)`` with ``--bench-compile``; the
public op with ``backend="auto"`` on the CPU, every available non-reference backend by name on CUDA), forward under
``no_grad`` and, for ops with gradients, forward + backward of a fixed upstream gradient (``bench_ops._grad_closure``).

Each op-shape-mode is one pytest-benchmark group, so ``--benchmark-compare`` lines up a path with its peer and with the
same path of a saved run. Options: ``benchmarks/conftest.py``. Collected only when ``benchmarks/`` is named on the
command line (``pytest benchmarks/ --benchmark-only``).
"""

from __future__ import annotations

import bench_ops
import pytest
import torch

from sslam_fast import _backend

MODES = ("fwd", "fwd+bwd")


def _names(config) -> list[str]:
    raw = config.getoption("--bench-ops")
    names = [n.strip() for n in raw.split(",") if n.strip()] or list(bench_ops.ALL_OPS)
    unknown = sorted(set(names) - set(bench_ops.ALL_OPS))
    if unknown:
        raise pytest.UsageError(f"--bench-ops: unknown op(s) {unknown}; choose from {list(bench_ops.ALL_OPS)}")
    return names


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32  # as bench_ops.main


def _paths(case: bench_ops.Case, device: str, with_compile: bool) -> list[str]:
    """The paths timed for ``case``: "reference", "compile(reference)", then "auto" (CPU) or each backend (CUDA)."""
    out = ["reference"] + (["compile(reference)"] if with_compile else [])
    if case.registry is None or device == "cpu":
        return out + ["auto"]
    return out + [b for b in _backend.available_backends(case.registry, device) if b != "reference"]


def _case_id(case: bench_ops.Case) -> str:
    return f"{case.op}:{case.shape.replace(' ', '_')}"


def pytest_generate_tests(metafunc):
    """One test per (case, mode, path), named from the cases built on the meta device (no tensor is allocated at
    collection; the real inputs are built once per session by the ``cases`` fixture, in the same order)."""
    if "item" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = config.getoption("--bench-device")
    cases = bench_ops.build_cases("meta-cuda" if device == "cuda" else "meta", False, _dtype(device), _names(config))
    params, ids = [], []
    for i, case in enumerate(cases):
        for mode in MODES if case.grad_args else MODES[:1]:
            for path in _paths(case, device, config.getoption("--bench-compile")):
                params.append((i, mode, path))
                ids.append(f"{_case_id(case)}-{mode}-{path}")
    metafunc.parametrize("item", params, ids=ids)


@pytest.fixture(scope="session")
def cases(pytestconfig) -> list[bench_ops.Case]:
    device = pytestconfig.getoption("--bench-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device here")
    return bench_ops.build_cases(device, False, _dtype(device), _names(pytestconfig))


def _function(case: bench_ops.Case, path: str):
    if path == "reference":
        return case.ref
    if path == "compile(reference)":
        torch._dynamo.reset()  # a fresh cache per op, as bench_ops._compiled
        return torch.compile(case.ref)
    return lambda *a: case.run(path, *a)


def _shapes(out) -> list:
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(out, (tuple, list)):
        return [s for o in out for s in _shapes(o)]
    return []


def test_op(item, cases, benchmark, pytestconfig):
    i, mode, path = item
    case = cases[i]
    device = pytestconfig.getoption("--bench-device")
    fn = _function(case, path)
    with torch.no_grad():
        want, got = case.ref(*case.args), fn(*case.args)  # also the warm-up (and the compile) of the path
    assert _shapes(got) == _shapes(want), f"{case.op} {path}: output shapes {_shapes(got)} vs {_shapes(want)}"

    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(*case.args)
    else:
        call = bench_ops._grad_closure(fn, case)
        call()  # warm-up of the backward
    timed = call
    if device == "cuda":
        def timed():
            call()
            torch.cuda.synchronize()

    chosen = path if path != "auto" or case.registry is None else _backend.base_name(
        _backend.resolve(case.registry, "auto", device))
    benchmark.group = f"{case.op} {case.shape} {mode}"
    benchmark.extra_info.update(op=case.op, shape=case.shape, mode=mode, path=path, backend=chosen, device=device)
    benchmark(timed)
