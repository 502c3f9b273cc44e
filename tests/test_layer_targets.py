"""Teacher targets (ALGORITHM §4 make_targets, §5.3 token subsets): layer_targets, every backend against the reference.

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEV, DTYPES, HAS_CUDA, OPCHECK_ALL, needs_triton

from sslam_fast import _backend
from sslam_fast.ops import layer_targets

targets_mod = importlib.import_module("sslam_fast.ops.layer_targets")
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def _layers(L, B, T, D, dtype=torch.float32, seed=0, device=DEV):
    """FFN-output-like layers: per-channel offsets much larger than the spread (the hard case for variances)."""
    g = torch.Generator().manual_seed(seed)
    ys = [torch.randn(B, T, D, generator=g) * 2.0 + torch.randn(D, generator=g) * 8.0 for _ in range(L)]
    return [y.to(dtype).to(device) for y in ys]


def _oracle(layers, top_k, token_index=None):
    """ALGORITHM §4 in float64, written out independently of the reference: IN over tokens, mean of top-k, LN over D."""
    ys = [y.double() for y in layers[len(layers) - top_k :]]
    if token_index is not None:
        ys = [y[:, token_index.cpu()] for y in ys]
    acc = 0
    for y in ys:
        mu = y.mean(dim=1, keepdim=True)
        var = ((y - mu) ** 2).mean(dim=1, keepdim=True)
        acc = acc + (y - mu) / torch.sqrt(var + 1e-5)
    acc = acc / top_k
    mu = acc.mean(dim=-1, keepdim=True)
    var = ((acc - mu) ** 2).mean(dim=-1, keepdim=True)
    return (acc - mu) / torch.sqrt(var + 1e-5)


def _upstream_make_targets(y, num_layers):
    """``make_targets`` as EAT writes it (instance_norm_target_layer, layer_norm_targets), transcribed."""
    target_layer_results = y[-num_layers:]
    target_layer_results = [tl.transpose(1, 2) for tl in target_layer_results]  # BTC -> BCT
    target_layer_results = [F.instance_norm(tl.float()) for tl in target_layer_results]
    target_layer_results = [tl.transpose(1, 2) for tl in target_layer_results]  # BCT -> BTC
    out = target_layer_results[0].float()
    for tl in target_layer_results[1:]:
        out.add_(tl.float())
    out = out.div_(len(target_layer_results))
    return F.layer_norm(out, out.shape[-1:])


# (L, B, T, D): B = 1, primes, non-powers of two, T = 1, D smaller and larger than one channel block.
CASES = [(4, 2, 17, 48), (1, 1, 1, 1), (3, 1, 5, 7), (2, 3, 31, 130), (5, 2, 40, 96), (12, 1, 13, 24)]


def _case_id(c):
    return "L{}-B{}-T{}-D{}".format(*c)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle_all_top_k(backend, case, dtype):
    L, B, T, D = case
    ys = _layers(L, B, T, D, DTYPES[dtype])
    for top_k in sorted({1, (L + 1) // 2, L}):
        got = layer_targets(ys, top_k, backend=backend)
        assert got.dtype == torch.float32 and got.shape == (B, T, D)
        want = _oracle(ys, top_k)  # the inputs are exact in fp32 whatever their dtype: the same tolerance holds
        torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-5, msg=f"top_k={top_k}")
        if backend == "triton":
            ref = layer_targets(ys, top_k, backend="reference")
            torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    if T == 1:
        assert torch.equal(got, torch.zeros_like(got))  # one token normalises to 0


def test_reference_is_upstream_make_targets():
    ys = _layers(12, 2, 24, 40, torch.float16, device="cpu")
    for k in (1, 12):
        torch.testing.assert_close(
            layer_targets(ys, k, backend="reference"), _upstream_make_targets(ys, k), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_index(backend):
    # SSLAM teacher B: an 8x8 token grid with time rows [1, 3) and [5, 7) dropped, i.e. 32 of 64 tokens kept,
    # plus an unsorted subset with a duplicate.
    L, B, T, D = 4, 3, 64, 40
    ys = _layers(L, B, T, D, torch.float16)
    keep_rows = [0, 3, 4, 7]
    kept = torch.tensor([8 * t + f for t in keep_rows for f in range(8)], device=DEV)
    odd = torch.tensor([5, 60, 0, 33, 5, 17, 63], device=DEV)
    for idx in (kept, odd):
        for k in (1, L):
            got = layer_targets(ys, k, idx, backend=backend)
            assert got.shape == (B, idx.numel(), D)
            torch.testing.assert_close(got.double(), _oracle(ys, k, idx), rtol=0, atol=3e-5)
            # statistics over the subset only: the same as the op on the gathered tokens
            gathered = [y[:, idx] for y in ys]
            torch.testing.assert_close(got, layer_targets(gathered, k, backend=backend), rtol=0, atol=1e-6)
            assert not torch.allclose(got, layer_targets(ys, k, backend=backend)[:, idx], atol=1e-3)
    single = layer_targets(ys, L, torch.tensor([9], device=DEV), backend=backend)
    assert torch.equal(single, torch.zeros(B, 1, D, device=DEV))
    empty = layer_targets(ys, L, torch.zeros(0, dtype=torch.int64, device=DEV), backend=backend)
    assert empty.shape == (B, 0, D)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_and_strided_inputs(backend):
    L, B, T, D = 5, 2, 19, 33
    ys = _layers(L, B, T, D)
    want = layer_targets(ys, 3, backend=backend)
    stacked = torch.stack(ys)
    assert torch.equal(layer_targets(stacked, 3, backend=backend), want)
    # (B, L, T, D) storage seen as (L, B, T, D): strided over L and B, unit stride over D
    strided = stacked.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    assert torch.equal(layer_targets(strided, 3, backend=backend), want)
    # a non-unit D stride is still right (copied first)
    odd = stacked.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(layer_targets(odd, 3, backend=backend), want, rtol=0, atol=1e-6)


def test_stacked_input_is_not_copied():
    stacked = torch.randn(6, 2, 5, 8)
    top = targets_mod._stack_top_k(stacked, 4)
    assert top.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    assert torch.equal(top, stacked[2:])
    listed = targets_mod._stack_top_k(list(stacked.unbind(0)), 4)  # a list: only the top 4 are stacked
    assert listed.shape == (4, 2, 5, 8) and torch.equal(listed, stacked[2:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient(backend):
    ys = [y.requires_grad_() for y in _layers(2, 1, 6, 8)]
    out = layer_targets(ys, 2, backend=backend)
    assert not out.requires_grad


def test_bad_input():
    ys = _layers(3, 2, 5, 8, device="cpu")
    with pytest.raises(ValueError, match="top_k"):
        layer_targets(ys, 0)
    with pytest.raises(ValueError, match="top_k"):
        layer_targets(ys, 4)
    with pytest.raises(ValueError, match="top_k"):
        layer_targets(torch.stack(ys), 4)
    with pytest.raises(TypeError, match="top_k"):
        layer_targets(ys, 2.0)
    with pytest.raises(TypeError, match="top_k"):
        layer_targets(ys, True)
    with pytest.raises(ValueError, match="layer_outputs"):
        layer_targets([], 1)
    with pytest.raises(ValueError, match=r"layer_outputs\[2\]"):
        layer_targets([ys[0], ys[1], ys[2][:, :4]], 2)
    with pytest.raises(ValueError, match=r"layer_outputs\[1\]"):
        layer_targets([ys[0], ys[1].half(), ys[2]], 2)
    with pytest.raises(ValueError, match=r"layer_outputs\[0\]"):
        layer_targets([ys[0][0], ys[1]], 1)
    with pytest.raises(TypeError, match=r"layer_outputs\[1\]"):
        layer_targets([ys[0], ys[1].long(), ys[2]], 2)
    with pytest.raises(ValueError, match="layer_outputs"):
        layer_targets(torch.stack(ys)[0], 1)
    with pytest.raises(TypeError, match="layer_outputs"):
        layer_targets(torch.stack(ys).double(), 1)
    with pytest.raises(TypeError, match="layer_outputs"):
        layer_targets("layers", 1)
    with pytest.raises(TypeError, match="token_index"):
        layer_targets(ys, 1, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="token_index"):
        layer_targets(ys, 1, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="token_index"):
        layer_targets(ys, 1, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="token_index"):
        layer_targets(ys, 1, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="token_index"):
        layer_targets(ys, 1, torch.tensor([0, 1], device="meta"))
    with pytest.raises(ValueError, match="backend"):
        layer_targets(ys, 1, backend="fast")
    with pytest.raises(RuntimeError, match="cpp"):
        layer_targets(ys, 1, backend="cpp")


# --- custom-op plumbing -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    layers = torch.stack(_layers(3, 2, 11, 12, torch.float16))
    op = torch.ops.sslam_fast.layer_targets.default
    torch.library.opcheck(op, (layers, None, backend), test_utils=OPCHECK_ALL)
    torch.library.opcheck(op, (layers, torch.tensor([3, 0, 10], device=DEV), backend), test_utils=OPCHECK_ALL)


def test_direct_op_call_checks_shapes():
    """``torch.ops.sslam_fast.layer_targets`` called directly checks what the kernels index by."""
    op = torch.ops.sslam_fast.layer_targets
    layers = torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match="layers"):
        op(layers[0], None, "reference")
    with pytest.raises(TypeError, match="token_index"):
        op(layers, torch.tensor([0, 1], dtype=torch.int32), "reference")
    with pytest.raises(ValueError, match="token_index"):
        op(layers, torch.tensor([[0, 1]]), "reference")


# --- compiled (non-interpreted) Triton -----------------------------------------------------------------------------
# The interpreter runs kernels as numpy code; it cannot catch what only the compiler sees (types of loop-carried
# values, ints specialised to constexpr 1, bf16 lowering). Without a GPU, compile the kernels for sm_90 (H100) to a
# cubin in a subprocess where TRITON_INTERPRET is unset.

from sm90_compile import compiles_for_sm90 as _compiles_for_sm90  # noqa: E402


@pytest.mark.skipif(HAS_CUDA or not _backend.triton_importable(), reason="the CUDA tests run the kernels themselves")
def test_kernels_compile_for_sm90():
    common = {"B": "i32", "T": "i32", "D": "i32", "stride_l": "i64", "stride_b": "i32", "stride_t": "i32"}
    stats = dict(x_ptr="*bf16", idx_ptr="*i64", mean_ptr="*fp32", rstd_ptr="*fp32", **common, n_dblk="i32", eps="fp32")
    fwd = dict(x_ptr="*bf16", idx_ptr="*i64", mean_ptr="*fp32", rstd_ptr="*fp32", out_ptr="*fp32", K="i32", **common)
    fwd.update(n_tblk="i32", eps="fp32")
    specs = [
        ("_layer_targets_stats_kernel", stats, {"HAS_INDEX": True, "BLOCK_T": 32, "BLOCK_D": 128}, 4),
        ("_layer_targets_stats_kernel", stats, {"HAS_INDEX": False, "BLOCK_T": 32, "BLOCK_D": 128}, 4),
        ("_layer_targets_fwd_kernel", fwd, {"HAS_INDEX": True, "BLOCK_T": 4, "BLOCK_D": 1024}, 8),
        ("_layer_targets_fwd_kernel", fwd, {"HAS_INDEX": False, "K": 1, "BLOCK_T": 4, "BLOCK_D": 1024}, 8),  # top_k = 1
    ]
    _compiles_for_sm90("layer_targets", specs)


# --- CUDA -------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_cuda_sslam_shapes(dtype):
    # Teacher A: 12 layers x 24 rows x 512 tokens x 768; teacher B: 272 kept tokens of 12 rows (ALGORITHM §5.2, §5.3).
    ys = _layers(12, 24, 512, 768, DTYPES[dtype], device="cuda")
    for k in (12, 1):
        got = layer_targets(ys, k)  # auto -> triton on CUDA
        ref = layer_targets(ys, k, backend="reference")
        torch.testing.assert_close(got, ref, rtol=0, atol=3e-5)
    assert _backend.base_name(_backend.resolve("layer_targets", "auto", "cuda")) == "triton"
    rows = [t for t in range(64) if not (5 <= t < 20 or 30 <= t < 45)]
    kept = torch.tensor([8 * t + f for t in rows for f in range(8)], device="cuda")
    assert kept.numel() == 272
    zb = [y[:12] for y in ys]
    got = layer_targets(zb, 12, kept)
    torch.testing.assert_close(got, layer_targets(zb, 12, kept, backend="reference"), rtol=0, atol=3e-5)
    torch.testing.assert_close(got.double(), _oracle([y.cpu() for y in zb], 12, kept.cpu()).cuda(), rtol=0, atol=5e-5)
