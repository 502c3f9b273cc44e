"""Inverse block masks (ALGORITHM §3): exact counts, the block structure, the distribution of every backend against the
reference (bounds from standard errors), determinism, layout and validation.

Statistical comparisons: every check compares a mean of per-row values (rows are independent), and allows
``Z = 5`` standard errors of the difference. All draws are seeded, so the suite is deterministic; the bounds say
how far an implementation of the same distribution can plausibly land, not how far this one happened to land.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEV, HAS_CUDA, TRITON_OK, needs_cpp, needs_triton

from sslam_fast import _backend
from sslam_fast.ops.inverse_block_mask import inverse_block_mask
from sslam_fast.ops.mask_indices import mask_indices
from sslam_fast.reference import inverse_block_mask as ref

CPP_OK = _backend.extension_has("inverse_block_mask")
needs_kernel = needs_cpp("inverse_block_mask")
FAST = [pytest.param("cpp", marks=needs_kernel), pytest.param("triton", marks=needs_triton)]
ALL = ["reference", *FAST]
DEVICE = {"reference": "cpu", "cpp": "cpu", "triton": DEV}
Z = 5.0
OP = torch.ops.sslam_fast.inverse_block_mask.default


def raw_and_final(backend, batch, clones, grid=(64, 8), ml=5, nc=5, keep=102, seed=1234):
    """(union of blocks before the fix-up, final mask) from the same seed, as KEPT (True = visible) (R, L) tensors;
    final is None when keep is None. keep = -1 asks the custom op for the raw union (a diagnostic mode)."""
    dev = torch.device(DEVICE[backend])
    raw = ~OP(batch, clones, grid[0], grid[1], nc, ml, -1, seed, dev, backend).cpu()
    if keep is None:
        return raw, None
    return raw, ~OP(batch, clones, grid[0], grid[1], nc, ml, keep, seed, dev, backend).cpu()


def spec_blocks(H, W, ml) -> torch.Tensor:
    """(L, L) bool: row c = the clamped ml x ml block of centre c, by the ALGORITHM §3 pseudocode's loops."""
    L, o = H * W, ml // 2
    blocks = torch.zeros(L, L, dtype=torch.bool)
    for c in range(L):
        r, f = divmod(c, W)
        for i in range(ml):
            for j in range(ml):
                blocks[c, min(max(r + i - o, 0), H - 1) * W + min(max(f + j - o, 0), W - 1)] = True
    return blocks


def spec_simulation(K, H, W, nc, ml, keep, g) -> torch.Tensor:
    """ALGORITHM §3 pseudocode, literally (explicit loops); (K, L) float, 1 = masked. Same RNG calls in the same
    order."""
    L, o = H * W, ml // 2
    M = torch.zeros(K, H, W)
    idx = torch.randint(0, L, (K, nc), generator=g)
    M.view(K, L).scatter_(1, idx, 1)
    for k, r, c in M.nonzero().tolist():
        for i in range(ml):
            for j in range(ml):
                M[k, min(max(r + i - o, 0), H - 1), min(max(c + j - o, 0), W - 1)] = 1
    M = M.view(K, L)
    for k in range(K):
        n = M[k].sum()
        if n > keep:
            M[k, torch.multinomial(M[k], int(n - keep), replacement=False, generator=g)] = 0
        elif n < keep:
            M[k, torch.multinomial(1 - M[k], int(keep - n), replacement=False, generator=g)] = 1
    return 1 - M


# --- statistics -------------------------------------------------------------------------------------------------------


def components(kept: torch.Tensor) -> torch.Tensor:
    """(R,) number of 4-connected components of the kept tokens of (R, H, W) masks: min-label propagation over
    neighbours with pointer jumping (a label is a token of the same component; each component ends at its minimum)."""
    R, H, W = kept.shape
    L = H * W
    ids = torch.arange(L).expand(R, L)
    k = kept.reshape(R, L)
    lab = torch.where(k, ids, L)  # L: "no token", a sentinel column that maps to itself
    while True:
        p = torch.nn.functional.pad(lab.view(R, H, W), (1, 1, 1, 1), value=L)
        nb = torch.minimum(p[:, :-2, 1:-1], p[:, 2:, 1:-1]).minimum(torch.minimum(p[:, 1:-1, :-2], p[:, 1:-1, 2:]))
        new = torch.where(k, torch.minimum(lab, nb.reshape(R, L)), L)
        ext = torch.cat([new, torch.full((R, 1), L)], 1)
        for _ in range(2):  # pointer jumping: label <- label of label
            new = ext.gather(1, new)
            ext[:, :L] = new
        if torch.equal(new, lab):
            return (k & (lab == ids)).sum(1)
        lab = new


def row_stats(kept: torch.Tensor, H: int, W: int) -> dict[str, torch.Tensor]:
    """Per-row float64 statistics of a (R, L) kept mask."""
    k3 = kept.view(-1, H, W)
    n = kept.sum(1).double()
    starts = k3 & ~torch.nn.functional.pad(k3, (0, 0, 1, 0))[:, :-1]  # a run along time starts here
    t, f = torch.arange(H).view(H, 1), torch.arange(W).view(1, W)
    t_edge, f_edge = ((t == 0) | (t == H - 1)).expand(H, W).flatten(), ((f == 0) | (f == W - 1)).expand(H, W).flatten()
    ring = ((t == 1) | (t == H - 2) | (f == 1) | (f == W - 2)).flatten() & ~t_edge & ~f_edge
    return {
        "components": components(k3).double(),
        "time_run_length": n / starts.sum((1, 2)).double(),
        "border_share": kept[:, t_edge | f_edge].sum(1).double() / n,
        "keep_freq_corner": kept[:, t_edge & f_edge].double().mean(1),
        "keep_freq_time_edge": kept[:, t_edge & ~f_edge].double().mean(1),
        "keep_freq_freq_edge": kept[:, f_edge & ~t_edge].double().mean(1),
        "keep_freq_ring": kept[:, ring].double().mean(1),
        "keep_freq_interior": kept[:, ~t_edge & ~f_edge & ~ring].double().mean(1),
    }


def z_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    se = math.sqrt(x.var().item() / len(x) + y.var().item() / len(y))
    d = (x.mean() - y.mean()).item()
    return 0.0 if d == 0 else d / se if se > 0 else math.inf


def fixup_rank_z(raw: torch.Tensor, final: torch.Tensor) -> tuple[float, float]:
    """z-scores of the mean relative rank (0..1, by token index) of the dropped tokens among a row's block tokens,
    and of the added tokens among its other tokens (None with < 30 such rows). A uniform subset has mean 0.5."""
    out = []
    for pool, picked in ((raw, raw & ~final), (~raw, final & ~raw)):
        size, count = pool.sum(1), picked.sum(1)
        rows = (count > 0) & (size > 1)
        rank = (pool.cumsum(1) - 1).double() / (size - 1).clamp(min=1).double().unsqueeze(1)
        per_row = (rank * picked).sum(1)[rows] / count[rows]
        enough = len(per_row) >= 30  # too few rows of this kind for a standard error: no verdict (None)
        out.append(((per_row.mean() - 0.5) / (per_row.std() / math.sqrt(len(per_row)))).item() if enough else None)
    return out[0], out[1]


@pytest.fixture(scope="module")
def samples():
    """KEPT masks at the EAT defaults and their row statistics: the reference (4096 rows), cpp (4096), triton
    (2048: ~3 s under the interpreter; the standard error of the difference grows by 22 %, to ~0.05 components)
    and the batched torch formulation (2048)."""
    def draw(backend, batch, seed):
        return ~inverse_block_mask(batch, 16, generator=torch.Generator().manual_seed(seed), backend=backend).cpu()

    kept = {"reference": draw("reference", 256, 1)}
    if CPP_OK:
        kept["cpp"] = draw("cpp", 256, 2)
    if TRITON_OK:
        kept["triton"] = draw("triton", 128, 3)
    kept["batched"] = ~ref.inverse_block_mask_batched(2048, (64, 8), 5, 5, 102, torch.Generator().manual_seed(4))
    return {name: (m, row_stats(m, 64, 8)) for name, m in kept.items()}


@pytest.mark.parametrize("backend", ["cpp", "triton", "batched"])
def test_distribution_matches_reference(samples, backend):
    if backend not in samples:
        pytest.skip(f"{backend} unavailable")
    (m_ref, want), (m_got, got) = samples["reference"], samples[backend]
    for name in want:
        z = z_diff(got[name], want[name])
        assert abs(z) < Z, f"{backend} {name}: {got[name].mean():.4f} vs reference {want[name].mean():.4f} (z={z:.1f})"
    # per-token keep frequency, each token a binomial proportion
    p_ref, p_got = m_ref.double().mean(0), m_got.double().mean(0)
    pooled = (p_ref * len(m_ref) + p_got * len(m_got)) / (len(m_ref) + len(m_got))
    se = (pooled * (1 - pooled) * (1 / len(m_ref) + 1 / len(m_got))).sqrt()
    assert ((p_got - p_ref).abs() <= Z * se).all(), f"worst token z={((p_got - p_ref).abs() / se).max():.1f}"


def test_statistics_detect_wrong_masks(samples):
    """The checks above can fail: uniform random tokens, and blocks wrapped around the time axis, are caught."""
    m_ref, want = samples["reference"]
    g = torch.Generator().manual_seed(5)
    top = torch.rand(2048, 512, generator=g).topk(102).indices
    uniform = torch.zeros(2048, 512, dtype=torch.bool).scatter_(1, top, True)
    z = z_diff(components(uniform.view(-1, 64, 8)).double(), want["components"])
    assert z > 10 * Z, z
    # cyclic instead of clamped in time: roll each reference row by a random number of time patches
    shifts = torch.randint(0, 64, (len(m_ref),), generator=g)
    wrapped = torch.stack([m.view(64, 8).roll(int(s), 0) for m, s in zip(m_ref, shifts, strict=True)])
    time_edge = wrapped[:, [0, -1], 1:-1].flatten(1).double().mean(1)
    z = z_diff(time_edge, want["keep_freq_time_edge"])
    assert z > 2 * Z, z


# --- exact counts and block structure ---------------------------------------------------------------------------------

# (B, K, grid, mask_prob, mask_length, mask_prob_adjust, n_centers, keep): keep = int(L * (1 - mask_prob)) by hand
CONFIGS = [
    (2, 3, (64, 8), 0.8, 5, 0.07, 5, 102),
    (1, 1, (64, 8), 0.8, 5, 0.07, 5, 102),
    (3, 5, (16, 8), 0.8, 5, 0.07, 1, 25),
    (2, 7, (10, 6), 0.75, 3, 0.07, 2, 15),
    (2, 2, (64, 8), 0.8, 3, 0.07, 15, 102),
    (1, 13, (17, 5), 0.6, 4, 0.07, 2, 34),  # even mask_length: the block is [r-2, r+1] x [c-2, c+1]
    (1, 3, (1, 31), 0.5, 5, 0.5, 1, 15),
    (2, 2, (7, 1), 0.3, 1, 0.07, 5, 4),
    (2, 5, (9, 7), 0.2, 3, 0.07, 6, 50),  # most rows add to a pool smaller than half the grid
    (2, 5, (12, 12), 0.95, 5, 0.5, 3, 7),  # most rows drop more than half of their block tokens
]


def _cfg_id(c):
    return f"B{c[0]}-K{c[1]}-H{c[2][0]}-W{c[2][1]}-p{c[3]}-ml{c[4]}"


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_exact_kept_count_and_block_structure(cfg, backend):
    B, K, (H, W), p, ml, adj, nc, keep = cfg
    assert ref.mask_counts((H, W), p, ml, adj) == (nc, keep)
    m = inverse_block_mask(B, K, grid=(H, W), mask_prob=p, mask_length=ml, mask_prob_adjust=adj, backend=backend,
                           generator=torch.Generator().manual_seed(9), device=DEVICE[backend])
    assert m.shape == (B * K, H * W) and m.dtype == torch.bool and m.device.type == torch.device(DEVICE[backend]).type
    assert ((~m).sum(1) == keep).all()
    raw, final = raw_and_final(backend, 1, B * K, (H, W), ml, nc, keep, seed=77)  # one clip: same centres
    assert ((final.sum(1)) == keep).all()
    blocks = spec_blocks(H, W, ml)
    # the raw kept set is exactly a union of spec blocks: the blocks inside it cover it, and no more than nc of them
    inside = (blocks.double() @ (~raw).double().T == 0).T  # (R, L): block of centre c lies inside the raw set
    assert torch.equal((inside.double() @ blocks.double()) > 0, raw)
    assert (raw.sum(1) <= nc * blocks.sum(1).max()).all()
    n = raw.sum(1, keepdim=True)
    assert ((final & ~raw).sum(1)[n[:, 0] >= keep] == 0).all()  # too many: only drops
    assert ((raw & ~final).sum(1)[n[:, 0] <= keep] == 0).all()  # too few: only adds


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("grid,ml,nc", [((64, 8), 5, 5), ((17, 5), 4, 2)], ids=["H64-W8-ml5", "H17-W5-ml4"])
def test_raw_blocks_match_the_exact_token_probabilities(backend, grid, ml, nc):
    """Before the fix-up, P(token n kept) = 1 - (1 - a_n / L)^nc exactly, a_n = #centres whose block covers n."""
    H, W = grid
    rows = 2048 if backend != "reference" else 1024
    raw, _ = raw_and_final(backend, 1, rows, grid, ml, nc, keep=None, seed=31)
    p = 1 - (1 - spec_blocks(H, W, ml).double().sum(0) / (H * W)) ** nc
    se = (p * (1 - p) / rows).sqrt()
    assert ((raw.double().mean(0) - p).abs() <= Z * se).all()
    counts = raw.sum(1).double()
    assert abs(counts.mean() - p.sum()) <= Z * counts.std() / math.sqrt(rows)


FIXUP_CASES = [((64, 8), 5, 5, 102), ((9, 7), 3, 6, 50), ((12, 12), 5, 3, 7)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", FIXUP_CASES, ids=lambda c: f"H{c[0][0]}-W{c[0][1]}-keep{c[3]}")
def test_fix_up_picks_uniform_subsets(backend, case):
    grid, ml, nc, keep = case
    rows = 1024 if backend == "triton" and not HAS_CUDA else 2048  # the interpreter: ~3 s per 1024 rows
    raw, final = raw_and_final(backend, 1, rows, grid, ml, nc, keep, seed=55)
    z = fixup_rank_z(raw, final)
    assert z != (None, None)
    assert all(abs(v) < Z for v in z if v is not None), z
    # and the check can fail: dropping the last block tokens / adding the first free ones is caught
    biased = raw.clone()
    for r in range(len(raw)):
        idx_in, idx_out = raw[r].nonzero().flatten(), (~raw[r]).nonzero().flatten()
        if len(idx_in) > keep:
            biased[r, idx_in[keep:]] = False  # drop the last block tokens
        else:
            biased[r, idx_out[: keep - len(idx_in)]] = True  # add the first free tokens
    zb = fixup_rank_z(raw, biased)
    assert (z[0] is None or zb[0] > Z) and (z[1] is None or zb[1] < -Z), zb


def test_reference_is_the_spec_pseudocode_bit_for_bit():
    for (H, W), p, ml, adj in [((64, 8), 0.8, 5, 0.07), ((17, 5), 0.6, 4, 0.07), ((10, 6), 0.75, 3, 0.07)]:
        nc, keep = ref.mask_counts((H, W), p, ml, adj)
        want = spec_simulation(16, H, W, nc, ml, keep, torch.Generator().manual_seed(21))
        got = ref.clip_block_mask(16, (H, W), p, ml, adj, generator=torch.Generator().manual_seed(21))
        assert torch.equal(got, want)
    torch.manual_seed(8)  # generator=None is the default CPU generator, as upstream
    want = spec_simulation(4, 64, 8, 5, 5, 102, None)
    torch.manual_seed(8)
    assert torch.equal(ref.clip_block_mask(4), want)


def test_reference_pre_fixup_statistics_match_spec():
    """ALGORITHM §3 Monte-Carlo (20k draws): pre-fix-up kept count 95.7 on average, ~68% of rows below 102, ~29%
    above."""
    raw, _ = raw_and_final("reference", 1, 4096, keep=None, seed=3)
    n = raw.sum(1).double()
    exact = (1 - (1 - spec_blocks(64, 8, 5).double().sum(0) / 512) ** 5).sum().item()  # 95.770
    se_spec = n.std().item() / math.sqrt(20000)
    assert abs(exact - 95.7) <= 0.05 + Z * se_spec  # ALGORITHM §3 rounds to 0.1
    assert abs(n.mean().item() - exact) <= Z * n.std().item() / math.sqrt(len(n))
    for share, spec in (((n < 102).double(), 0.68), ((n > 102).double(), 0.29)):
        se = math.sqrt(spec * (1 - spec) / 20000 + spec * (1 - spec) / len(n))
        assert abs(share.mean().item() - spec) <= 0.005 + Z * se


# --- determinism and layout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_same_seed_same_masks(backend):
    def draw(seed):
        return inverse_block_mask(2, 8, generator=torch.Generator().manual_seed(seed), backend=backend,
                                  device=DEVICE[backend])

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
    torch.manual_seed(5)  # generator=None: the default CPU generator
    a = inverse_block_mask(2, 8, backend=backend, device=DEVICE[backend])
    torch.manual_seed(5)
    assert torch.equal(a, inverse_block_mask(2, 8, backend=backend, device=DEVICE[backend]))


def test_reference_rows_are_clip_major():
    B, K = 3, 5
    g = torch.Generator().manual_seed(12)
    got = inverse_block_mask(B, K, generator=g, backend="reference")
    seed = int(torch.randint(2**63 - 1, (1,), dtype=torch.int64, generator=torch.Generator().manual_seed(12)))
    g2 = torch.Generator().manual_seed(seed)
    want = torch.cat([ref.clip_block_mask(K, generator=g2) for _ in range(B)]).bool()  # one upstream call per clip
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", FAST)
def test_fast_rows_depend_only_on_seed_and_row(backend):
    def draw(b, k):
        return inverse_block_mask(b, k, generator=torch.Generator().manual_seed(4), backend=backend,
                                  device=DEVICE[backend])

    m = draw(3, 7)
    assert torch.equal(m, draw(21, 1)) and torch.equal(m, draw(1, 21))
    assert torch.equal(m, draw(4, 7)[:21])


@needs_kernel
def test_cpp_is_independent_of_thread_count():
    threads = torch.get_num_threads()
    try:  # 2560 rows: above the kernel's 1024-row grain (kGrainRows), so two threads really split the rows
        torch.set_num_threads(1)
        one = inverse_block_mask(160, 16, generator=torch.Generator().manual_seed(2), backend="cpp")
        torch.set_num_threads(2)
        two = inverse_block_mask(160, 16, generator=torch.Generator().manual_seed(2), backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def digest(m: torch.Tensor) -> tuple[int, int]:
    """Sum and sum of squares of the 1-based flat positions of the masked entries (order-sensitive)."""
    pos = torch.arange(1, m.numel() + 1, dtype=torch.int64)[m.flatten().cpu()]
    return int(pos.sum()), int((pos * pos).sum())


# Bits of the triton kernel (Philox keyed by the seed), recorded under the interpreter. On CPU this pins the kernel's
# output; on CUDA it checks that the compiled kernel draws the same bits as the interpreted one.
TRITON_GOLDEN = [
    ((5, 64, 8, 5, 5, 102, 2**40 + 7), (2636099, 4481299527)),
    ((5, 64, 8, 5, 5, -1, 2**40 + 7), (2668652, 4522689700)),
    ((7, 17, 5, 2, 4, 34, 12345), (106845, 42264285)),
]


@needs_triton
def test_triton_is_independent_of_rows_per_program_and_reproduces_golden_bits():
    from sslam_fast.kernels.inverse_block_mask import inverse_block_mask_triton

    for args, golden in TRITON_GOLDEN:
        want = inverse_block_mask_triton(*args, DEV, rows_per_program=1)
        assert digest(want) == golden
        for rpp in (2, 8):
            assert torch.equal(inverse_block_mask_triton(*args, DEV, rows_per_program=rpp), want)


def test_auto_backend_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    chosen = _backend.base_name(_backend.resolve("inverse_block_mask", "auto", "cpu"))
    assert chosen == ("cpp" if CPP_OK else "reference")


# --- validation -------------------------------------------------------------------------------------------------------

BAD = [
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": 1.5}, TypeError, "batch_size"),
    ({"clones": -1}, ValueError, "clones"),
    ({"grid": (64,)}, TypeError, "grid"),
    ({"grid": (64.0, 8)}, TypeError, "grid"),
    ({"grid": (0, 8)}, ValueError, "grid"),
    ({"mask_prob": 1.0}, ValueError, "mask_prob"),
    ({"mask_prob": 0.0}, ValueError, "mask_prob"),
    ({"mask_prob": float("nan")}, ValueError, "mask_prob"),
    ({"mask_prob": "0.8"}, TypeError, "mask_prob"),
    ({"grid": (2, 2), "mask_prob": 0.9}, ValueError, "mask_prob"),  # keeps int(0.4) = 0 tokens
    ({"mask_prob": 1e-20}, ValueError, "mask_prob"),  # keeps all 512
    ({"mask_length": 0}, ValueError, "mask_length"),
    ({"mask_length": 2.5}, TypeError, "mask_length"),
    ({"mask_prob_adjust": -0.5}, ValueError, "mask_prob_adjust"),
    ({"mask_prob_adjust": float("inf")}, ValueError, "mask_prob_adjust"),
    ({"generator": 3}, TypeError, "generator"),
    ({"device": "meta"}, ValueError, "device"),
    ({"device": 3}, TypeError, "device"),
    ({"backend": "fastest"}, ValueError, "backend"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise_naming_the_argument(kwargs, exc, name):
    args = {"batch_size": 2, "clones": 3}
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        inverse_block_mask(args.pop("batch_size"), args.pop("clones"), **args)


def _run_isolated(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a segfault or a runaway loop fails the test instead of the test run."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s:\n{textwrap.dedent(code)}")


@needs_kernel
def test_wrapping_grid_sizes_raise_instead_of_crashing():
    """H * W that overflows int64 wrapped to a small size that passed the grid check, and the block fill wrote past
    the buffers (a segfault, exit 139). Both the raw C++ op and the public op must raise, naming the grid."""
    res = _run_isolated("""
        import torch
        import sslam_fast.ops
        from sslam_fast.ops import inverse_block_mask
        calls = [
            lambda: torch.ops.sslam_fast_C.inverse_block_mask(1, 2**32, 2**32, 1, 5, -1, 0),
            lambda: torch.ops.sslam_fast_C.inverse_block_mask(1, 2**63 - 1, 2**63 - 1, 1, 5, -1, 0),
            lambda: inverse_block_mask(1, 1, grid=(2**40 + 1, 2**24), mask_prob=0.9999999999999, mask_prob_adjust=0.0),
            lambda: inverse_block_mask(1, 1, grid=(2**32, 2**32)),
        ]
        for call in calls:
            try:
                call()
                print("returned")
            except (ValueError, RuntimeError) as exc:
                print(type(exc).__name__, "|", str(exc).splitlines()[0])
    """)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    lines = res.stdout.splitlines()
    assert len(lines) == 4, res.stdout
    assert all(line.startswith("RuntimeError |") and " H " in line for line in lines[:2]), lines
    assert all(line.startswith("ValueError |") and "grid" in line for line in lines[2:]), lines


@pytest.mark.parametrize("backend", ALL)
def test_mask_prob_adjust_out_of_range_is_refused_at_once(backend):
    """mask_prob_adjust=1e12 asked for 2e13 block centres a row: the call ran for hours. Refused, in a subprocess with
    a timeout so that a regression fails instead of hanging the suite."""
    res = _run_isolated(f"""
        from sslam_fast.ops import inverse_block_mask
        for kw in [dict(mask_prob_adjust=1e12), dict(mask_prob_adjust=1.5), dict(mask_prob_adjust=-0.01),
                   dict(mask_prob_adjust=-1e12), dict(mask_prob=0.5, mask_length=1, mask_prob_adjust=0.6)]:
            try:
                inverse_block_mask(2, 3, backend={backend!r}, device={DEVICE[backend]!r}, **kw)
                print("returned")
            except ValueError as exc:
                print("ValueError |", exc)
    """)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    lines = res.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("ValueError |") for line in lines), res.stdout
    assert all("mask_prob_adjust" in line for line in lines), lines
    assert "cells" in lines[-1]  # 1 - 0.5 + 0.6 = 1.1 centres per cell: more centres than cells


@pytest.mark.parametrize("backend", ALL)
def test_mask_prob_adjust_bounds_are_accepted(backend):
    for adjust in (0.0, 1.0):
        m = inverse_block_mask(2, 3, mask_prob_adjust=adjust, backend=backend, device=DEVICE[backend],
                               generator=torch.Generator().manual_seed(1))
        assert ((~m).sum(1) == 102).all()


@needs_kernel
def test_cpp_op_refuses_more_centres_than_cells_and_bad_keep():
    f = torch.ops.sslam_fast_C.inverse_block_mask
    with pytest.raises(RuntimeError, match="n_centers must lie in \\[0, 512\\]"):
        f(2, 64, 8, 513, 5, 102, 0)
    with pytest.raises(RuntimeError, match="keep must lie in \\[-1, 512\\]"):
        f(2, 64, 8, 5, 5, -2, 0)
    with pytest.raises(RuntimeError, match="rows \\* \\(H \\* W\\)"):
        f(2**22, 64, 8, 5, 5, 102, 0)  # 2**31 cells: refused before allocating 2 GiB
    assert f(2, 64, 8, 512, 5, -1, 0).shape == (2, 512)  # the bounds themselves are valid


def test_custom_op_checks_its_sizes():
    """The custom op is callable directly (torch.ops.sslam_fast.inverse_block_mask): its ints are checked there too,
    before a backend loops over n_centers or allocates from them."""
    with pytest.raises(ValueError, match="n_centers"):
        OP(2, 3, 64, 8, 10**12, 5, 102, 7, torch.device("cpu"), "reference")
    with pytest.raises(ValueError, match="grid"):
        OP(1, 1, 2**20, 2**20, 1, 5, -1, 7, torch.device("cpu"), "reference")  # each side fine, 2**40 cells
    with pytest.raises(ValueError, match="batch_size"):
        OP(2**31, 16, 64, 8, 5, 5, 102, 7, torch.device("cpu"), "reference")


# --- custom-op plumbing -----------------------------------------------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    torch.library.opcheck(OP, (2, 3, 64, 8, 5, 5, 102, 2**62 + 5, torch.device(DEVICE[backend]), backend),
                          test_utils=OPCHECK_UTILS)


@needs_kernel
def test_opcheck_cpp_op():
    torch.library.opcheck(torch.ops.sslam_fast_C.inverse_block_mask.default, (6, 64, 8, 5, 5, 102, 99),
                          test_utils=OPCHECK_UTILS)


# --- CUDA -------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("clones", [16, 8])
def test_cuda_real_shapes(clones):
    g = torch.Generator().manual_seed(0)
    m = inverse_block_mask(12, clones, generator=g, device="cuda")  # auto -> triton
    assert m.is_cuda and m.shape == (12 * clones, 512) and ((~m).sum(1) == 102).all()
    big = ~inverse_block_mask(512, 16, generator=g, device="cuda").cpu()
    want = ~inverse_block_mask(256, 16, generator=g, backend="reference")
    s_got, s_want = row_stats(big, 64, 8), row_stats(want, 64, 8)
    for name in s_want:
        assert abs(z_diff(s_got[name], s_want[name])) < Z, name
    ids_keep, ids_restore = mask_indices(m)
    assert ids_keep.is_cuda and ids_keep.shape == (12 * clones, 102) and ids_restore.shape == (12 * clones, 512)
