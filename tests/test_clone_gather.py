"""The student's multi-clone input: clone_gather (ALGORITHM §2.1), every backend against the reference.

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py); the cpp backend
(ATen row copies) runs on CPU. The route tests feed clone_gather's output to decoder_scatter (ALGORITHM §3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEV, OPCHECK_ALL, needs_triton, on_cpu_only

from sslam_fast import _backend
from sslam_fast.ops.clone_gather import clone_gather
from sslam_fast.ops.decoder_scatter import decoder_scatter
from sslam_fast.reference import clone_gather as ref

BACKENDS = ["reference", pytest.param("triton", marks=needs_triton), pytest.param("cpp", marks=on_cpu_only)]

# (B, clones, N, k, D): B = 1, clones 1 and 3, N prime / 512-like small variants, D a power of two and 48.
# R = 18 > 16 rows splits the CLS gradient over two backward programs; k = N keeps every token.
SHAPES = [
    (1, 1, 17, 5, 64),
    (2, 3, 17, 9, 48),
    (1, 3, 40, 9, 64),
    (3, 1, 40, 9, 48),
    (2, 3, 13, 13, 48),
    (3, 6, 19, 4, 48),
]
SHAPE_IDS = [f"B{b}-K{c}-N{n}-k{k}-D{d}" for b, c, n, k, d in SHAPES]


def _masks(R: int, N: int, k: int, seed: int = 0, device=DEV):
    """Upstream's routing indices for rows with k visible tokens: (mask, ids_keep ascending, ids_restore)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(R, N)
    for r in range(R):
        mask[r, torch.randperm(N, generator=g)[:k]] = 0.0  # 0 = visible
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible first, ascending
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return mask.to(device), ids_shuffle[:, :k].contiguous().to(device), ids_restore.to(device)


def _gather_inputs(B, K, N, k, D, dtype, param_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    x = (torch.randn(B, N, D, generator=g) * 2 + 0.5).to(DEV, dtype)
    cls = torch.randn(1, 1, D, generator=g).to(DEV, param_dtype)
    w = (1 + 0.5 * torch.randn(D, generator=g)).to(DEV, param_dtype)
    b = (0.3 * torch.randn(D, generator=g)).to(DEV, param_dtype)
    _, ids_keep, _ = _masks(B * K, N, k, seed)
    grad = torch.randn(B * K, 1 + k, D, generator=g).to(DEV, dtype)
    return x, ids_keep, cls, w, b, grad


@pytest.fixture
def nan_empty(monkeypatch):
    """Fresh float buffers start as NaN, so a kernel that leaves part of its output unwritten fails loudly."""

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(new_empty(self, *a, **k)))


def _run(fn, tensors, grad):
    """Output and gradients wrt every tensor of ``tensors`` (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --- clone_gather -----------------------------------------------------------------------------------------------------


def test_reference_by_definition():
    """The reference equals upstream's recipe written as loops: row r = b*K + c, LN of x[b, ids_keep[r, j]]."""
    B, K, N, k, D = 2, 3, 11, 4, 8
    x, ids_keep, cls, w, b, _ = _gather_inputs(B, K, N, k, D, torch.float32)
    out = ref.clone_gather(x, ids_keep, K, cls, w, b, 1e-6)
    assert out.shape == (B * K, 1 + k, D)
    for r in range(B * K):
        torch.testing.assert_close(out[r, 0], F.layer_norm(cls.reshape(D), (D,), w, b, 1e-6))
        for j in range(k):
            want = F.layer_norm(x[r // K, ids_keep[r, j]], (D,), w, b, 1e-6)
            torch.testing.assert_close(out[r, 1 + j], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clone_gather_fp32_matches_autograd_of_reference(shape, backend, nan_empty):
    B, K, N, k, D = shape
    x, ids_keep, cls, w, b, grad = _gather_inputs(B, K, N, k, D, torch.float32)
    want = _run(lambda *t: ref.clone_gather(t[0], ids_keep, K, *t[1:]), (x, cls, w, b), grad)
    got = _run(lambda *t: clone_gather(t[0], ids_keep, K, *t[1:], backend=backend), (x, cls, w, b), grad)
    for name, g, r in zip(("out", "dx", "dcls", "dw", "db"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        scale = r.abs().max().item() or 1.0
        assert _err(g, r) <= 2e-6 * scale + 1e-6, (name, _err(g, r), scale)
    # Every clone's gradient reached x: dx differs from the single-clone contribution where clones share tokens.
    assert got[1].abs().sum() > 0


@needs_triton
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=[SHAPE_IDS[1], SHAPE_IDS[2]])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["params-fp16", "params-fp32"])
def test_clone_gather_fp16_error_bound(shape, param_dtype):
    """fp16 kernel error vs the fp32 reference <= 2x (fp16 reference error vs fp32 reference) + a small atol."""
    B, K, N, k, D = shape
    x, ids_keep, cls, w, b, grad = _gather_inputs(B, K, N, k, D, torch.float16, param_dtype)
    gold = _run(
        lambda *t: ref.clone_gather(t[0], ids_keep, K, *t[1:]), [t.float() for t in (x, cls, w, b)], grad.float()
    )
    ref16 = _run(lambda *t: ref.clone_gather(t[0], ids_keep, K, *t[1:]), (x, cls, w, b), grad)
    tri16 = _run(lambda *t: clone_gather(t[0], ids_keep, K, *t[1:], backend="triton"), (x, cls, w, b), grad)
    for name, t16, r16, g32 in zip(("out", "dx", "dcls", "dw", "db"), tri16, ref16, gold):
        assert t16.dtype == r16.dtype, name
        bound = 2 * _err(r16, g32) + 1e-3 * (g32.abs().max().item() or 1.0)
        assert _err(t16, g32) <= bound, (name, _err(t16, g32), bound)


@needs_triton
def test_clone_gather_triton_backward_deterministic_and_sparse(nan_empty):
    B, K, N, k, D = 2, 3, 17, 5, 48
    x, ids_keep, cls, w, b, grad = _gather_inputs(B, K, N, k, D, torch.float32)
    a = _run(lambda *t: clone_gather(t[0], ids_keep, K, *t[1:], backend="triton"), (x, cls, w, b), grad)
    c = _run(lambda *t: clone_gather(t[0], ids_keep, K, *t[1:], backend="triton"), (x, cls, w, b), grad)
    assert all(torch.equal(u, v) for u, v in zip(a, c))
    dx = a[1]
    for bb in range(B):
        kept = set(ids_keep[bb * K : (bb + 1) * K].flatten().tolist())
        for n in range(N):
            assert (dx[bb, n].abs().sum() > 0) == (n in kept), (bb, n)  # exact zeros where no clone kept n


@pytest.mark.parametrize("backend", BACKENDS)
def test_clone_gather_cls_shapes_and_noncontiguous_x(backend):
    B, K, N, k, D = 2, 3, 17, 5, 48
    x, ids_keep, cls, w, b, grad = _gather_inputs(B, K, N, k, D, torch.float32)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not xt.is_contiguous()
    want = clone_gather(x, ids_keep, K, cls, w, b, backend=backend)
    torch.testing.assert_close(clone_gather(xt, ids_keep, K, cls.reshape(D), w, b, backend=backend), want)
    leaf = cls.reshape(D).clone().requires_grad_()
    clone_gather(x, ids_keep, K, leaf, w, b, backend=backend).backward(grad)
    assert leaf.grad.shape == (D,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_roundtrip(backend):
    """decoder_scatter(clone_gather(...)) at std 0: every row's normalised visible tokens sit at their own positions."""
    B, K, N, k, D = 2, 3, 17, 5, 48
    x, _, cls, w, b, _ = _gather_inputs(B, K, N, k, D, torch.float32)
    mask, ids_keep, ids_restore = _masks(B * K, N, k, seed=8)
    enc = clone_gather(x, ids_keep, K, cls, w, b, backend=backend)
    dec = decoder_scatter(enc, ids_restore, 0.0, backend=backend)
    full = F.layer_norm(x, (D,), w, b, 1e-6).repeat_interleave(K, 0)
    vis = (mask == 0).unsqueeze(-1)
    torch.testing.assert_close(dec, torch.where(vis, full, torch.zeros_like(full)), rtol=1e-5, atol=1e-5)


# --- bad input --------------------------------------------------------------------------------------------------------


def test_clone_gather_bad_input():
    B, K, N, k, D = 2, 3, 17, 5, 48
    x, ids, cls, w, b, _ = _gather_inputs(B, K, N, k, D, torch.float32, seed=9)
    x, ids, cls, w, b = x.cpu(), ids.cpu(), cls.cpu(), w.cpu(), b.cpu()
    clone_gather(x, ids, K, cls, w, b)  # valid
    cases = [
        (ValueError, "ids_keep must lie", {"ids_keep": torch.where(ids == ids.max(), N, ids)}),
        (ValueError, "ids_keep must lie", {"ids_keep": torch.where(ids == ids.min(), -1, ids)}),
        (ValueError, "ascending", {"ids_keep": ids.flip(1)}),
        (ValueError, "ascending", {"ids_keep": torch.cat([ids[:, :1], ids[:, :-1]], 1)}),  # a duplicate
        (ValueError, "x must have 3", {"x": x[0]}),
        (ValueError, "ids_keep must have 2", {"ids_keep": ids[0]}),
        (ValueError, "B \\* clones", {"ids_keep": ids[:-1]}),
        (ValueError, "B \\* clones", {"clones": 2}),
        (ValueError, "clones", {"clones": 0}),
        (TypeError, "clones", {"clones": 3.0}),
        (TypeError, "ids_keep must have dtype", {"ids_keep": ids.int()}),
        (TypeError, "x must have dtype", {"x": x.double()}),
        (TypeError, "x must be a torch.Tensor", {"x": x.numpy()}),
        (TypeError, "cls_token must have x's dtype", {"cls_token": cls.half()}),
        (TypeError, "norm_weight must have x's dtype", {"norm_weight": w.double()}),
        (TypeError, "norm_bias must have x's dtype", {"norm_bias": b.bfloat16()}),
        (ValueError, "cls_token must have shape", {"cls_token": cls.reshape(1, D)}),
        (ValueError, "norm_weight must have shape", {"norm_weight": w[:-1]}),
        (ValueError, "norm_bias must have shape", {"norm_bias": b[None]}),
        (ValueError, "ids_keep is on meta", {"ids_keep": ids.to("meta")}),
        (ValueError, "norm_bias is on meta", {"norm_bias": b.to("meta")}),
        (ValueError, "eps", {"eps": 0.0}),
        (TypeError, "eps", {"eps": "1e-6"}),
        (ValueError, "backend", {"backend": "fast"}),
        (RuntimeError, "cuda", {"backend": "cuda"}),
    ]
    base = {"x": x, "ids_keep": ids, "clones": K, "cls_token": cls, "norm_weight": w, "norm_bias": b}
    for exc, match, change in cases:
        kw = {**base, **change}
        with pytest.raises(exc, match=match):
            clone_gather(**kw)
    x16 = x.half()
    clone_gather(x16, ids, K, cls, w, b)  # fp32 parameters with an fp16 x: accepted (autocast-style training)
    clone_gather(x, ids.flip(1), K, cls, w, b, check_ids=False, backend="reference")  # unchecked on request


@on_cpu_only
def test_auto_on_cpu(monkeypatch):
    monkeypatch.delenv("SSLAM_FAST_BACKEND", raising=False)
    assert _backend.base_name(_backend.resolve("clone_gather", "auto", "cpu")) == "cpp"


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    B, K, N, k, D = 2, 3, 13, 4, 16
    x, ids_keep, cls, w, b, grad = _gather_inputs(B, K, N, k, D, torch.float32)
    cls = cls.reshape(D)
    x, cls, w, b = (t.requires_grad_() for t in (x, cls, w, b))
    ops = torch.ops.sslam_fast
    torch.library.opcheck(ops.clone_gather.default, (x, ids_keep, K, cls, w, b, 1e-6, backend), test_utils=OPCHECK_ALL)
    # x as the encoder hands it over (patchify's output is a transposed view): gradients come back contiguous
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2)
    for xb in (x.detach(), x_t):
        bwd_args = (grad, xb, ids_keep, K, cls.detach(), w.detach(), b.detach(), 1e-6, backend)
        torch.library.opcheck(ops.clone_gather_backward.default, bwd_args, test_utils=OPCHECK_ALL)


def test_compile_fullgraph_reference():
    B, K, N, k, D = 2, 3, 17, 5, 48
    x, ids_keep, cls, w, b, _ = _gather_inputs(B, K, N, k, D, torch.float32)
    _, _, ids_restore = _masks(B * K, N, k, seed=0)

    def f(x, cls, w, b):
        enc = clone_gather(x, ids_keep, K, cls, w, b, backend="reference")
        return decoder_scatter(enc * 2.0, ids_restore, 0.0, backend="reference") + 1.0

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    gdec = torch.randn(B * K, N, D, device=DEV)
    want = _run(f, (x, cls, w, b), gdec)
    for backend in ("aot_eager", record):
        torch._dynamo.reset()
        got = _run(torch.compile(f, fullgraph=True, backend=backend), (x, cls, w, b), gdec)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.sslam_fast.clone_gather.default in targets  # the op stays opaque: no trace into the reference
    assert torch.ops.sslam_fast.decoder_scatter.default in targets


# --- sm_90 code generation without a GPU ----------------------------------------------------------------------------

_SM90_SCRIPT = textwrap.dedent(
    """
    import os, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sslam_fast.kernels import clone_gather as kr

    D = 768
    bd, bt = kr._blocks(D)
    bd2, bt2 = kr._blocks(D, kr._BWD_TILE)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    def i(*names):
        return {n: "i32" for n in names}
    def c(**kw):
        return {n: "constexpr" for n in kw}
    cases = [
        (kr._clone_gather_fwd_kernel, dict(x_ptr="*fp16", ids_ptr="*i64", cls_ptr="*fp32", w_ptr="*fp32", b_ptr="*fp32",
         out_ptr="*fp16", **i("N", "KEEP", "D", "CLONES"), eps="fp32"), dict(BLOCK_T=bt, BLOCK_D=bd)),
        (kr._clone_gather_bwd_kernel, dict(grad_ptr="*fp16", x_ptr="*fp16", inv_ptr="*i32", cls_ptr="*fp32",
         w_ptr="*fp32", dx_ptr="*fp16", part_ptr="*fp32", **i("N", "KEEP", "D", "CLONES", "R", "N_CHUNKS",
         "N_TOK_PROGS"), eps="fp32"), dict(CHUNK=kr._BWD_CHUNK, BLOCK_T=min(bt2, kr._BWD_CHUNK), BLOCK_D=bd2)),
    ]
    for fn, sig, consts in cases:
        k = triton.compile(ASTSource(fn=fn, signature={**sig, **c(**consts)}, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": kr._NUM_WARPS})
        assert k.asm["cubin"], fn
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
        assert info.returncode == 0 and "0 bytes spill stores" in info.stderr, info.stderr
        print(fn.__name__, [ln.split(":")[-1].strip() for ln in info.stderr.splitlines() if "registers" in ln])
    """
)


@on_cpu_only
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The interpreter does not run Triton's GPU code generation: compile every kernel for sm_90 (ptxas, no GPU)."""
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton ships no ptxas here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run(
        [sys.executable, "-c", _SM90_SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("_kernel") == 2, res.stdout


# --- CUDA, at SSLAM's shapes ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_cuda_sslam_shapes(dtype):
    B, K, N, k, D = 12, 8, 512, 102, 768
    x, ids_keep, cls, w, b, grad = _gather_inputs(B, K, N, k, D, dtype, torch.float32)
    gold = _run(
        lambda *t: ref.clone_gather(t[0], ids_keep, K, *t[1:]), [t.float() for t in (x, cls, w, b)], grad.float()
    )
    ref_lp = _run(lambda *t: ref.clone_gather(t[0], ids_keep, K, *t[1:]), (x, cls, w, b), grad)
    tri = _run(lambda *t: clone_gather(t[0], ids_keep, K, *t[1:]), (x, cls, w, b), grad)  # auto -> triton
    for name, t, r, g32 in zip(("out", "dx", "dcls", "dw", "db"), tri, ref_lp, gold):
        bound = 2 * _err(r, g32) + 1e-5 * (g32.abs().max().item() or 1.0)
        assert _err(t, g32) <= bound, (name, _err(t, g32), bound)
    again = _run(lambda *t: clone_gather(t[0], ids_keep, K, *t[1:]), (x, cls, w, b), grad)
    assert all(torch.equal(u, v) for u, v in zip(tri, again))  # deterministic backward
    assert _backend.base_name(_backend.resolve("clone_gather", "auto", "cuda")) == "triton"
