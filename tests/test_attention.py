"""Encoder attention (ALGORITHM §2.1): every backend, output and dq / dk / dv, against upstream's materialised
attention.

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py), fp32 / fp16 only
there. Low-precision criterion (flash-attention's): the error of a backend against the fp32 reference on the same
(rounded) inputs is at most twice the error of the reference computed in that dtype, plus 1e-4.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

from sslam_fast import _backend
from sslam_fast.ops.attention import attention
from sslam_fast.reference import attention as ref

# The module itself: once sslam_fast.ops exports the function, ``sslam_fast.ops.attention`` names the function.
attention_mod = importlib.import_module("sslam_fast.ops.attention")

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
TRITON_OK = _backend.triton_importable() and (HAS_CUDA or _backend.triton_interpreter())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here (no CUDA and no TRITON_INTERPRET=1)")
DTYPE_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
OPCHECK_ALL = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _id(B, H, L, D, dtype):
    return f"B{B}-H{H}-L{L}-D{D}-{DTYPE_ID[dtype]}"


def _case(B, H, L, D, dtype=torch.float32, marks=()):
    return pytest.param(B, H, L, D, dtype, id=_id(B, H, L, D, dtype), marks=marks)


def _inputs(B, H, L, D, dtype, device=DEV, seed=0):
    """q, k, v, dO rounded to ``dtype``, held in fp32 (the fp32 reference sees exactly the low-precision inputs)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g).to(dtype).float().to(device) for _ in range(4))
    return q, k, v, do


def _run(fn, q, k, v, do, dtype):
    """Output and (dq, dk, dv) of ``fn`` on the inputs cast to ``dtype``, all returned in fp32."""
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = fn(qd, kd, vd)
    assert out.dtype == dtype and out.shape == q.shape
    out.backward(do.to(dtype))
    return [out.detach().float()] + [t.grad.float() for t in (qd, kd, vd)]


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _check_fp32(got, want, atol=1e-4):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _check_low_precision(got, low_ref, fp32_ref, atol=1e-4):
    for name, g, r, w in zip(("out", "dq", "dk", "dv"), got, low_ref, fp32_ref):
        err, ref_err = _max_err(g, w), _max_err(r, w)
        assert err <= 2 * ref_err + atol, f"{name}: error {err:.3g} vs fp32, reference in low precision {ref_err:.3g}"


def _compare(fn, B, H, L, D, dtype, device=DEV, seed=0):
    q, k, v, do = _inputs(B, H, L, D, dtype, device, seed)
    want = _run(ref.attention, q, k, v, do, torch.float32)
    got = _run(fn, q, k, v, do, dtype)
    if dtype == torch.float32:
        _check_fp32(got, want)
    else:
        _check_low_precision(got, _run(ref.attention, q, k, v, do, dtype), want)
    return got


@pytest.fixture
def nan_buffers(monkeypatch):
    """Fresh kernel outputs start as NaN, so an element the kernels never write fails loudly."""
    from sslam_fast.kernels import attention as kern

    empty = kern.empty_blhd
    monkeypatch.setattr(kern, "empty_blhd", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))


# --- reference --------------------------------------------------------------------------------------------------------


def _upstream_alt_attention(x, w_qkv, b_qkv, num_heads):
    """``[E] models/modules.py : AltAttention.forward`` up to ``attn @ v`` (no ALiBi, mask or dropout), same ops."""
    B, N, C = x.shape
    qkv = (x @ w_qkv.T + b_qkv).reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    dtype = q.dtype
    q = q * (C // num_heads) ** -0.5
    attn = q @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1, dtype=torch.float32).to(dtype=dtype)
    return attn @ v, (qkv[0], qkv[1], qkv[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_ID.get)
def test_reference_is_upstream(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 13, 768, generator=g).to(dtype)
    w, b = (torch.randn(2304, 768, generator=g) * 0.03).to(dtype), torch.randn(2304, generator=g).to(dtype)
    want, (q, k, v) = _upstream_alt_attention(x, w, b, 12)
    got = ref.attention(q, k, v)  # the permuted views, as the model passes them
    assert got.dtype == dtype and torch.equal(got, want)
    # D = 64: scale 1/8 is a power of two, so upstream's q * scale and the brief's (q @ k^T) * scale agree bit for bit.
    alt = ((q @ k.transpose(-2, -1)) * 0.125).softmax(-1, dtype=torch.float32).to(dtype) @ v
    assert torch.equal(got, alt)


@pytest.mark.parametrize("D", ref.HEAD_DIMS)
def test_reference_matches_float64_definition(D):
    q, k, v, _ = _inputs(2, 3, 11, D, torch.float32, "cpu")
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / D**0.5
    p = torch.exp(s - s.amax(-1, keepdim=True))
    want = torch.einsum("bhij,bhjd->bhid", p / p.sum(-1, keepdim=True), v.double())
    torch.testing.assert_close(ref.attention(q, k, v).double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(ref.attention_lse(q, k).double(), torch.logsumexp(s, -1), rtol=0, atol=2e-6)


# --- triton -----------------------------------------------------------------------------------------------------------

TRITON_FP32 = [
    _case(1, 1, 1, 64),
    _case(1, 3, 7, 64),
    _case(2, 1, 17, 32),
    _case(1, 2, 103, 64),
    _case(1, 1, 103, 32),
    _case(1, 1, 273, 64),
    _case(1, 1, 33, 16),
    _case(1, 1, 40, 128),
]
TRITON_FP16 = [
    _case(1, 3, 7, 64, torch.float16),
    _case(2, 1, 17, 32, torch.float16),
    _case(1, 2, 103, 64, torch.float16),
]
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="bf16 arithmetic is wrong in the Triton interpreter")
TRITON_BF16 = [_case(1, 3, 7, 64, torch.bfloat16, CUDA_ONLY), _case(1, 2, 103, 64, torch.bfloat16, CUDA_ONLY)]


@needs_triton
@pytest.mark.parametrize("B,H,L,D,dtype", TRITON_FP32 + TRITON_FP16 + TRITON_BF16)
def test_triton_matches_reference(B, H, L, D, dtype, nan_buffers):
    got = _compare(lambda q, k, v: attention(q, k, v, backend="triton"), B, H, L, D, dtype)
    assert all(bool(torch.isfinite(t).all()) for t in got)


@needs_triton
def test_triton_lse_and_layout(nan_buffers):
    q, k, v, _ = _inputs(2, 3, 19, 32, torch.float32)
    out, lse = torch.ops.sslam_fast.flash_attention(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 19)
    torch.testing.assert_close(lse, ref.attention_lse(q, k), rtol=0, atol=1e-5)
    # (B, H, L, D) view of (B, L, H, D) memory: upstream's out.transpose(1, 2).reshape(B, L, H * D) is free.
    assert out.transpose(1, 2).is_contiguous()
    assert torch.equal(attention(q, k, v, backend="triton"), out)  # deterministic: no atomics


@needs_triton
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 32), (32, 16)], ids=["M16-N16", "M16-N32", "M32-N16"])
@pytest.mark.parametrize("L", [16, 33, 50])
def test_triton_other_tiles(L, block_m, block_n, nan_buffers):
    """Several query and key blocks with ragged tails, and BLOCK_M != BLOCK_N, through the launchers."""
    from sslam_fast.kernels.attention import flash_attention_bwd, flash_attention_fwd

    q, k, v, do = _inputs(1, 2, L, 32, torch.float32)
    want = _run(ref.attention, q, k, v, do, torch.float32)
    out, lse = flash_attention_fwd(q, k, v, block_m=block_m, block_n=block_n)
    grads = flash_attention_bwd(do, q, k, v, out, lse, block_m=block_m, block_n=block_n)
    _check_fp32([out, *grads], want)


@needs_triton
def test_triton_upstream_qkv_views_and_strided_grad(nan_buffers):
    """q, k, v as upstream's permuted qkv views (not contiguous) and a non-contiguous dO: no copies, same result."""
    B, L, H, D = 2, 23, 3, 64
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, L, 3 * H * D, generator=g).to(DEV).reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = (qkv[i].detach().requires_grad_() for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    do = torch.randn(B, L, H, D, generator=g).to(DEV).transpose(1, 2)  # as the model's reshape backward hands it
    want = _run(ref.attention, q, k, v, do, torch.float32)
    out = attention(q, k, v, backend="triton")
    out.backward(do)
    _check_fp32([out.detach(), q.grad, k.grad, v.grad], want)


@needs_triton
def test_triton_empty_batch():
    q = torch.randn(0, 2, 9, 16, device=DEV, requires_grad=True)
    out = attention(q, q, q, backend="triton")
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


# --- cpp (ATen's SDPA CPU kernel) -------------------------------------------------------------------------------------

CPP_CASES = [
    _case(1, 1, 1, 64),
    _case(3, 5, 17, 64),
    _case(2, 3, 103, 64),
    _case(1, 2, 273, 64),
    _case(2, 3, 17, 32),
    _case(1, 2, 13, 128, torch.float32),
    _case(2, 3, 103, 64, torch.float16),
    _case(2, 3, 103, 64, torch.bfloat16),
    _case(1, 7, 17, 32, torch.bfloat16),
]


@pytest.mark.parametrize("B,H,L,D,dtype", CPP_CASES)
def test_cpp_matches_reference(B, H, L, D, dtype):
    q = torch.zeros(B, H, L, D, dtype=dtype)
    # "cpp" is ATen's fused flash-attention CPU kernel, not the math fallback.
    assert torch._fused_sdp_choice(q, q, q) == SDPBackend.FLASH_ATTENTION.value
    _compare(lambda q, k, v: attention(q, k, v, backend="cpp"), B, H, L, D, dtype, device="cpu")


def test_auto_on_cpu_is_cpp(monkeypatch):
    monkeypatch.delenv("SSLAM_FAST_BACKEND", raising=False)
    assert _backend.base_name(_backend.resolve("attention", "auto", "cpu")) == "cpp"
    q, k, v, _ = _inputs(2, 2, 9, 16, torch.float32, "cpu")
    assert torch.equal(attention(q, k, v), attention(q, k, v, backend="cpp"))
    if TRITON_OK and not HAS_CUDA:
        monkeypatch.setenv("SSLAM_FAST_BACKEND", "triton")
        assert _backend.base_name(_backend.resolve("attention", "auto", "cpu")) == "triton"


@pytest.mark.parametrize("L", [1, 2, 9, 15, 16, 17, 31, 32, 103])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
@pytest.mark.parametrize("where,value", [("q", float("nan")), ("k", float("nan")), ("v", float("nan")),
                                         ("q", float("inf")), ("q", float("-inf"))])
def test_cpp_propagates_nan_like_the_reference(where, value, dtype, L):
    """ATen's CPU flash kernel gave zeros for a query row with NaN (L <= 9) and for a head with NaN in k (L = 1) where
    the reference (and the docstring) give NaN. The cpp backend must put NaN exactly where the reference does (a row
    for q, the head for k, a channel for v), and agree elsewhere."""
    q, k, v, _ = (t.to(dtype) for t in _inputs(2, 3, L, 64, torch.float32, "cpu"))
    {"q": q, "k": k, "v": v}[where][1, 2, L // 2, 7] = value
    want = ref.attention(q, k, v).float()
    got = attention(q, k, v, backend="cpp").float()
    assert want.isnan().any()
    assert torch.equal(got.isnan(), want.isnan()), f"NaN at {got.isnan().sum()} places, reference {want.isnan().sum()}"
    ok = ~want.isnan()
    if dtype == torch.float32:
        torch.testing.assert_close(got[ok], want[ok], rtol=0, atol=1e-4)
    else:  # the low-precision criterion of _check_low_precision, against the fp32 reference on the same inputs
        fp32 = ref.attention(q.float(), k.float(), v.float())
        assert _max_err(got[ok], fp32[ok]) <= 2 * _max_err(want[ok], fp32[ok]) + 1e-4


def test_cpp_nan_guard_keeps_finite_results_and_gradients_bit_equal():
    """The guard adds exact zeros for finite rows: the output and SDPA's own gradients are unchanged, bit for bit."""
    q, k, v, do = _inputs(2, 3, 17, 64, torch.float32, "cpu")
    got = _run(lambda q, k, v: attention(q, k, v, backend="cpp"), q, k, v, do, torch.float32)
    scale = ref.softmax_scale(64)
    want = _run(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), q, k, v, do,
                torch.float32)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(g, w), name


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


@needs_triton
def test_opcheck_flash_attention():
    q, k, v, do = _inputs(1, 2, 17, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.sslam_fast.flash_attention.default, (q, k, v), test_utils=OPCHECK_ALL)
    out, lse = torch.ops.sslam_fast.flash_attention(q.detach(), k.detach(), v.detach())
    torch.library.opcheck(
        torch.ops.sslam_fast.flash_attention_backward.default,
        (do, q.detach(), k.detach(), v.detach(), out, lse),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    assert not lse.requires_grad or lse.grad_fn is None


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_compile_fullgraph(backend):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v):
        return attention(q, k, v, backend=backend) * 2.0

    q, k, v, do = _inputs(2, 3, 17, 16, torch.float32)
    want = _run(f, q, k, v, do, torch.float32)
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=record)(q, k, v)
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    if backend == "triton":  # opaque: the custom op is in the graph, the kernels are not traced into
        assert torch.ops.sslam_fast.flash_attention.default in targets
    else:
        assert torch.ops.sslam_fast.flash_attention.default not in targets
    torch._dynamo.reset()
    got = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), q, k, v, do, torch.float32)
    _check_fp32(got, want, atol=1e-5)


# --- bad input --------------------------------------------------------------------------------------------------------


def test_bad_input():
    q = torch.randn(2, 3, 5, 16)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.numpy(), q, q)
    with pytest.raises(ValueError, match="q must have 4"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k must have 4"):
        attention(q, q[0], q)
    with pytest.raises(ValueError, match="k must have q's shape"):
        attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="v must have q's shape"):
        attention(q, q, torch.randn(2, 2, 5, 16))
    with pytest.raises(TypeError, match="q must have dtype"):
        attention(q.to(torch.int32), q.to(torch.int32), q.to(torch.int32))
    with pytest.raises(TypeError, match="q must have dtype"):
        attention(q.double(), q.double(), q.double())
    with pytest.raises(TypeError, match="v must have dtype"):
        attention(q, q, q.to(torch.int64))
    with pytest.raises(TypeError, match="k must have q's dtype"):
        attention(q, q.half(), q)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        attention(q.half(), q.half(), q.bfloat16())
    with pytest.raises(ValueError, match="k is on meta"):
        attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="v is on meta"):
        attention(q, q, q.to("meta"))
    bad_d = torch.randn(2, 3, 5, 48)
    with pytest.raises(ValueError, match="head dim"):
        attention(bad_d, bad_d, bad_d)
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="flash")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="cuda"):
            attention(q, q, q, backend="cuda")


# --- sm_90 code generation without a GPU ------------------------------------------------------------------------------

_SM90_SCRIPT = textwrap.dedent(
    """
    import inspect, os, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sslam_fast.kernels import attention as ka

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    kernels = [ka._flash_attention_fwd_kernel, ka._flash_attention_bwd_preprocess_kernel,
               ka._flash_attention_bwd_dkdv_kernel, ka._flash_attention_bwd_dq_kernel]
    for dtype, D in [(torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 64)]:  # the model's head dim
        bm, bn, warps = ka.tile_config("cuda", dtype, D)
        tname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        for fn in kernels if dtype == torch.bfloat16 else kernels[:1] + kernels[2:]:  # preprocess: no dtype logic
            names = list(inspect.signature(fn.fn).parameters)
            consts = {k: v for k, v in dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
                      PRECISION=ka.dot_precision(dtype)).items() if k in names}
            sig = {n: "constexpr" if n in consts else "*fp32" if n in ("lse_ptr", "delta_ptr") else
                   "*" + tname if n.endswith("_ptr") else "fp32" if n.endswith("scale") else "i32" for n in names}
            nw = 4 if fn is ka._flash_attention_bwd_preprocess_kernel else warps
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": nw, "num_stages": ka.GPU_NUM_STAGES})
            ptx = k.asm["ptx"]
            assert k.asm["cubin"]
            assert dtype == torch.float32 or "preprocess" in fn.__name__ or "wgmma" in ptx, fn  # tensor cores
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                  text=True)
            regs = [ln.split(":")[-1].strip() for ln in info.stderr.splitlines() if "registers" in ln]
            print(fn.__name__, tname, D, k.metadata.shared, regs)
            spill_ok = "0 bytes spill stores" in info.stderr or "preprocess" in fn.__name__  # a few bytes there
            assert info.returncode == 0 and spill_ok, (fn.__name__, tname, D, info.stderr)
    """
)


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA tests run the kernels for real")
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The interpreter does not run Triton's GPU code generation: compile every kernel for sm_90 (ptxas, no GPU), at
    the tile configuration the launchers use, and check for tensor-core (wgmma) dots and no register spills."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton ships no ptxas here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    cmd = [sys.executable, "-c", _SM90_SCRIPT]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("_kernel") == 10, res.stdout


# --- CUDA -------------------------------------------------------------------------------------------------------------

# SSLAM stage 2, per GPU: student 192 rows x 103 tokens, teacher 24 x 513, dropped teacher 12 x 273; 12 heads of 64.
REAL_SHAPES = [(192, 12, 103, 64), (24, 12, 513, 64), (12, 12, 273, 64)]


@pytest.mark.cuda
@pytest.mark.parametrize("B,H,L,D", REAL_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_ID.get)
def test_cuda_real_shapes(B, H, L, D, dtype, monkeypatch):
    assert _backend.base_name(_backend.resolve("attention", "auto", "cuda")) == "cuda"
    q, k, v, do = _inputs(B, H, L, D, dtype, "cuda", seed=B)
    want = _run(ref.attention, q, k, v, do, torch.float32)
    low = _run(ref.attention, q, k, v, do, dtype)
    _check_low_precision(_run(lambda q, k, v: attention(q, k, v, backend="triton"), q, k, v, do, dtype), low, want)
    _check_low_precision(_run(lambda q, k, v: attention(q, k, v, backend="cuda"), q, k, v, do, dtype), low, want)
    if attention_mod.HAS_FLASH_ATTN:  # the cuda backend's other path: SDPA
        monkeypatch.setattr(attention_mod, "HAS_FLASH_ATTN", False)
        _check_low_precision(_run(lambda q, k, v: attention(q, k, v, backend="cuda"), q, k, v, do, dtype), low, want)


@pytest.mark.cuda
def test_cuda_fp32_ieee():
    """fp32 on the GPU: tl.dot with input_precision="ieee" (no TF32) matches the fp32 reference tightly."""
    _compare(lambda q, k, v: attention(q, k, v, backend="triton"), 24, 12, 513, 64, torch.float32, device="cuda")
    _compare(lambda q, k, v: attention(q, k, v, backend="cuda"), 24, 12, 513, 64, torch.float32, device="cuda")
