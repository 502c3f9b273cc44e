"""SSLAM's partial max-mix and its window sampler: partial_max_mix, sample_mix_windows (ALGORITHM §5.1).

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEV, DTYPES, HAS_CUDA, OPCHECK_ALL, TRITON_OK, needs_triton

from sslam_fast import _backend
from sslam_fast.ops import partial_max_mix, sample_mix_windows

BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def _mix_by_definition(spec: torch.Tensor, s1: int, s2: int, W: int) -> torch.Tensor:
    """Row i, frame t: spec[i] inside [s1, s1+W) or [s2, s2+W), else max(spec[i], spec[i-1 mod B]); explicit loops."""
    B, _, T, F = spec.shape
    out = torch.empty_like(spec)
    for i in range(B):
        for t in range(T):
            inside = s1 <= t < s1 + W or s2 <= t < s2 + W
            for f in range(F):
                own, partner = spec[i, 0, t, f], spec[(i - 1) % B, 0, t, f]
                out[i, 0, t, f] = own if inside else max(own, partner)
    return out


# --- partial_max_mix --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_max_mix_hand_case(backend):
    # B=3, T=8, F=2, W=2, windows [1, 3) and [4, 6): frames 0, 3, 6, 7 are mixed.
    spec = (
        torch.tensor(
            [
                [[9, 0], [9, 0], [9, 0], [9, 0], [9, 0], [9, 0], [9, 0], [9, 0]],  # row 0: partner is row 2
                [[1, 5], [1, 5], [1, 5], [1, 5], [1, 5], [1, 5], [1, 5], [1, 5]],  # row 1: partner is row 0
                [[4, 7], [4, 7], [4, 7], [4, 7], [4, 7], [4, 7], [4, 7], [4, 7]],  # row 2: partner is row 1
            ],
            dtype=torch.float32,
        )
        .unsqueeze(1)
        .to(DEV)
    )
    out = partial_max_mix(spec, (1, 4), window_frames=2, backend=backend)
    mixed = torch.tensor([[9, 7], [9, 5], [4, 7]], dtype=torch.float32, device=DEV)  # max(row i, row i-1)
    for t in range(8):
        want = spec[:, 0, t] if t in (1, 2, 4, 5) else mixed
        assert torch.equal(out[:, 0, t], want), f"frame {t}"
    assert torch.equal(out, _mix_by_definition(spec, 1, 4, 2))
    both = partial_max_mix(spec, (1, 4), window_frames=2, concat=True, backend=backend)
    assert both.shape == (6, 1, 8, 2)
    assert torch.equal(both[:3], spec) and torch.equal(both[3:], out)


# (B, T, F, (s1, s2), W): B = 1, primes, touching windows, windows at the start / at the very end, W = 0.
CASES = [
    (1, 16, 4, (0, 4), 4),
    (3, 17, 5, (2, 7), 5),  # touching: s1 + W == s2
    (5, 31, 7, (0, 13), 9),  # first window at frame 0
    (2, 29, 3, (3, 22), 7),  # second window ends at T
    (7, 24, 8, (0, 12), 12),  # the windows cover everything: the mix is spec
    (3, 10, 3, (5, 5), 0),  # no windows: all mixed
    (12, 64, 16, (16, 40), 24),  # upstream geometry, scaled down
    (4, 1024, 8, (496, 768), 240),  # upstream T and W at the extremes of the draw
]


def _case_id(c):
    B, T, F, (s1, s2), W = c
    return f"B{B}-T{T}-F{F}-s{s1},{s2}-W{W}"


@needs_triton
@pytest.mark.parametrize("concat", [False, True], ids=["mix", "concat"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_partial_max_mix_triton_matches_reference(case, dtype, concat):
    B, T, F, (s1, s2), W = case
    spec = torch.randn(B, 1, T, F).to(dtype).to(DEV)
    want = partial_max_mix(spec, (s1, s2), window_frames=W, concat=concat, backend="reference")
    got = partial_max_mix(spec, (s1, s2), window_frames=W, concat=concat, backend="triton")
    assert got.dtype == dtype and got.shape == ((2 * B if concat else B), 1, T, F)
    assert torch.equal(got, want)  # max is exact: bit for bit
    mix = got[B:] if concat else got
    covered = 2 * W >= T  # the windows hide every frame (or B = 1): the mix must be spec
    assert torch.equal(mix, spec) == (covered or B == 1)


@needs_triton
def test_partial_max_mix_nan_propagates_like_torch_max():
    spec = torch.randn(3, 1, 12, 4, device=DEV)
    spec[0, 0, 0, 0] = float("nan")  # mixed frame: spreads to row 1 (its partner)
    spec[2, 0, 5, 1] = float("nan")  # window frame of row 2: stays there, does not reach row 0
    want = partial_max_mix(spec, (3, 7), window_frames=4, backend="reference")
    got = partial_max_mix(spec, (3, 7), window_frames=4, backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got[1, 0, 0, 0].isnan() and not got[0, 0, 5, 1].isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_max_mix_matches_upstream_form(backend):
    # [S] EAT_pretraining.py: roll1 = torch.roll(source, 1, 0); roll1[:, :, idx:idx+240, :] = -inf;
    # torch.max(source, roll1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 1, 1024, 16, generator=g).to(torch.float16).to(DEV)
    s1, s2 = sample_mix_windows(g)
    roll1 = torch.roll(x, shifts=1, dims=0)
    for idx in (s1, s2):
        roll1[:, :, idx : idx + 240, :] = float("-inf")
    upstream = torch.max(x, roll1)
    assert torch.equal(partial_max_mix(x, (s1, s2), backend=backend), upstream)
    assert torch.equal(
        partial_max_mix(x, torch.tensor([s1, s2]), concat=True, backend=backend), torch.cat([x, upstream])
    )


def test_partial_max_mix_empty_batch():
    spec = torch.randn(0, 1, 8, 2)
    assert partial_max_mix(spec, (0, 4), window_frames=2, backend="reference").shape == (0, 1, 8, 2)
    if TRITON_OK and not HAS_CUDA:
        assert partial_max_mix(spec, (0, 4), window_frames=2, concat=True, backend="triton").shape == (0, 1, 8, 2)


# --- sample_mix_windows -----------------------------------------------------------------------------------------------


def test_sample_mix_windows_distribution():
    g = torch.Generator().manual_seed(1234)
    n = 20000
    draws = [sample_mix_windows(g) for _ in range(n)]
    s1_all = torch.tensor([d[0] for d in draws])
    s2_all = torch.tensor([d[1] for d in draws])
    s1_values = list(range(0, 512, 16))
    assert len(s1_values) == 32
    assert sorted(set(s1_all.tolist())) == s1_values  # all 32 reachable, nothing else
    # s1 uniform: chi-square with 31 degrees of freedom (mean 31, sd 7.9); 75 is p ~ 1e-5.
    counts = torch.tensor([(s1_all == v).sum().item() for v in s1_values], dtype=torch.float64)
    chi2 = ((counts - n / 32) ** 2 / (n / 32)).sum().item()
    assert chi2 < 75, chi2
    # Geometry: ordered, never overlapping (may touch), inside 1024 frames, on the 16-frame grid.
    assert bool((s2_all >= s1_all + 240).all()) and int(s2_all.max()) == 768
    assert bool(((s2_all - s1_all) % 16 == 0).all()) and bool((s2_all + 240 <= 1024).all())
    assert bool((s1_all + 240 == s2_all).any())  # touching windows occur
    # s2 given s1: every value of range(s1 + 240, 783, 16) reachable, and uniform (a pooled chi-square).
    stat, dof = 0.0, 0
    for v in s1_values:
        s2_v = s2_all[s1_all == v]
        allowed = list(range(v + 240, 783, 16))
        assert sorted(set(s2_v.tolist())) == allowed, v
        c = torch.tensor([(s2_v == w).sum().item() for w in allowed], dtype=torch.float64)
        e = len(s2_v) / len(allowed)
        stat += ((c - e) ** 2 / e).sum().item()
        dof += len(allowed) - 1
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, dof)


def test_sample_mix_windows_reproducible_and_general():
    a = [sample_mix_windows(torch.Generator().manual_seed(5)) for _ in range(3)]
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (5, 5, 6))
    seq1 = [sample_mix_windows(g1) for _ in range(50)]
    seq2 = [sample_mix_windows(g2) for _ in range(50)]
    seq3 = [sample_mix_windows(g3) for _ in range(50)]
    assert seq1 == seq2 and seq1 != seq3 and a[0] == a[1] == a[2] == seq1[0]
    assert all(isinstance(s, int) and type(s) is int for pair in seq1 for s in pair)
    torch.manual_seed(3)
    x = sample_mix_windows()
    torch.manual_seed(3)
    assert sample_mix_windows() == x  # None uses the global generator
    # Other geometry: s1 in range(0, 32, 4), s2 in range(s1 + 8, 55, 4).
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        s1, s2 = sample_mix_windows(g, num_frames=64, window_frames=8, step=4)
        assert s1 in range(0, 32, 4) and s2 in range(s1 + 8, 55, 4)
        partial_max_mix(torch.zeros(1, 1, 64, 1), (s1, s2), window_frames=8)  # always valid windows


def test_sample_mix_windows_bad_arguments():
    with pytest.raises(ValueError, match="s2"):
        sample_mix_windows(num_frames=500)  # s1 = 240 leaves range(480, 259, 16) empty
    with pytest.raises(ValueError, match="s1"):
        sample_mix_windows(num_frames=1, window_frames=1)
    with pytest.raises(ValueError, match="step"):
        sample_mix_windows(step=0)
    with pytest.raises(TypeError, match="generator"):
        sample_mix_windows(1234)


# --- bad input --------------------------------------------------------------------------------------------------------


def test_partial_max_mix_bad_input():
    x = torch.randn(2, 1, 600, 4)
    ok = (0, 300)
    with pytest.raises(ValueError, match="spec"):
        partial_max_mix(x[0], ok)
    with pytest.raises(ValueError, match="spec"):
        partial_max_mix(torch.randn(2, 2, 600, 4), ok)
    with pytest.raises(TypeError, match="spec"):
        partial_max_mix(x.to(torch.int32), ok)
    with pytest.raises(TypeError, match="spec"):
        partial_max_mix(x.double(), ok)
    with pytest.raises(TypeError, match="spec"):
        partial_max_mix(x.numpy(), ok)
    for bad in [(0, 239), (-16, 300), (300, 0), (0, 361), (0, 600)]:  # overlap, s1 < 0, unordered, past T
        with pytest.raises(ValueError, match="windows"):
            partial_max_mix(x, bad)
    partial_max_mix(x, (0, 240))  # touching and ending at 480: fine
    partial_max_mix(x, (120, 360))  # second window ends exactly at T
    with pytest.raises(TypeError, match="windows"):
        partial_max_mix(x, (0, 240, 480))
    with pytest.raises(TypeError, match="windows"):
        partial_max_mix(x, (0.0, 240))
    with pytest.raises(TypeError, match="windows"):
        partial_max_mix(x, torch.tensor([0.0, 240.0]))
    with pytest.raises(ValueError, match="windows"):
        partial_max_mix(x, torch.tensor([0, 240, 480]))
    with pytest.raises(ValueError, match="window_frames"):
        partial_max_mix(x, ok, window_frames=-1)
    with pytest.raises(ValueError, match="backend"):
        partial_max_mix(x, ok, backend="fast")
    with pytest.raises(RuntimeError, match="cpp"):
        partial_max_mix(x, ok, backend="cpp")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="cuda"):
            partial_max_mix(x, ok, backend="cuda")


@pytest.mark.skipif(HAS_CUDA, reason="CPU resolution rules")
@pytest.mark.filterwarnings("ignore:.*SSLAM_FAST_BACKEND")
def test_backend_resolution_on_cpu(monkeypatch):
    monkeypatch.delenv("SSLAM_FAST_BACKEND", raising=False)
    # auto never picks the interpreter
    assert _backend.base_name(_backend.resolve("partial_max_mix", "auto", "cpu")) == "reference"
    monkeypatch.setenv("SSLAM_FAST_BACKEND", "cpp")  # the op has no cpp: the variable is ignored
    assert _backend.base_name(_backend.resolve("partial_max_mix", "auto", "cpu")) == "reference"
    if TRITON_OK:
        monkeypatch.setenv("SSLAM_FAST_BACKEND", "triton")
        assert _backend.base_name(_backend.resolve("partial_max_mix", "auto", "cpu")) == "triton"


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("concat", [False, True])
def test_opcheck_partial_max_mix(backend, concat):
    spec = torch.randn(3, 1, 16, 4, device=DEV)
    torch.library.opcheck(
        torch.ops.sslam_fast.partial_max_mix.default, (spec, torch.tensor([2, 8], device=DEV), 4, concat, backend),
        test_utils=OPCHECK_ALL
    )


def test_direct_op_call_checks_shapes():
    """``torch.ops.sslam_fast.partial_max_mix`` called directly checks what the kernels index by."""
    op = torch.ops.sslam_fast.partial_max_mix
    spec = torch.randn(2, 1, 16, 4)
    with pytest.raises(ValueError, match="windows"):
        op(spec, torch.tensor([2]), 4, False, "reference")
    with pytest.raises(TypeError, match="windows"):
        op(spec, torch.tensor([2.0, 8.0]), 4, False, "reference")
    with pytest.raises(ValueError, match="spec"):
        op(spec[0], torch.tensor([2, 8]), 4, False, "reference")


def test_compile_fullgraph_keeps_op_opaque():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, s1, s2):
        return partial_max_mix(x, (s1, s2), window_frames=4, concat=True, backend="reference") + 1.0

    torch._dynamo.reset()
    x = torch.randn(3, 1, 16, 4)
    compiled = torch.compile(f, fullgraph=True, backend=record)
    for s1, s2 in [(0, 8), (2, 12), (4, 9)]:  # new window draws: no graph break, no error
        torch.testing.assert_close(compiled(x, s1, s2), f(x, s1, s2), rtol=0, atol=0)
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.sslam_fast.partial_max_mix.default in targets
    assert torch.roll not in targets and torch.max not in targets  # the reference was not traced into
    compiled_aot = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled_aot(x, 0, 8), f(x, 0, 8), rtol=0, atol=0)


def test_compile_with_window_tensors_compiles_once():
    """Windows as a tensor are data, not constants: new draws reuse the one graph (no recompilation)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, windows):
        return partial_max_mix(x, windows, window_frames=4, concat=True, backend="reference") * 2.0

    torch._dynamo.reset()
    x = torch.randn(3, 1, 16, 4)
    compiled = torch.compile(f, fullgraph=True, backend=record)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s1, s2 in [(0, 8), (2, 12), (4, 9), (0, 4)]:
            w = torch.tensor([s1, s2])
            torch.testing.assert_close(compiled(x, w), f(x, (s1, s2)), rtol=0, atol=0)
    assert len(graphs) == 1
    torch._dynamo.reset()


# --- CUDA -------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_cuda_upstream_shapes(dtype):
    x = torch.randn(12, 1, 1024, 128, device="cuda").to(dtype)
    g = torch.Generator().manual_seed(11)
    for _ in range(4):
        w = sample_mix_windows(g)
        for concat in (False, True):
            want = partial_max_mix(x, w, concat=concat, backend="reference")
            assert torch.equal(partial_max_mix(x, w, concat=concat), want)  # auto -> triton on CUDA
    assert _backend.base_name(_backend.resolve("partial_max_mix", "auto", "cuda")) == "triton"
