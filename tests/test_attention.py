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
import torch.nn.functional as F
from conftest import DEV, DTYPE_ID, HAS_CUDA, OPCHECK_ALL, TRITON_OK, needs_cuda, needs_triton, on_cpu_only
from torch.nn.attention import SDPBackend

from sslam_fast import _backend
from sslam_fast.ops.attention import attention
from sslam_fast.reference import attention as ref

# The module itself: once sslam_fast.ops exports the function, ``sslam_fast.ops.attention`` names the function.
attention_mod = importlib.import_module("sslam_fast.ops.attention")


def _id(B, H, L, D, dtype):
    return f"B{B}-H{H}-L{L}-D{D}-{DTYPE_ID[dtype]}"


def _case(B, H, L, D, dtype=torch.float32, marks=()):
    return pytest.param(B, H, L, D, dtype, id=_id(B, H, L, D, dtype), marks=marks)


def _inputs(B, H, L, D, dtype, device=DEV, seed=0):
    """q, k, v, dO rounded to ``dtype``, held in fp32 (the fp32 reference sees exactly the low-precision inputs)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g).to(dtype).float().to(device) for _ in range(4))
    return q, k, v, do


def _layout(layout, B, H, L, D, dtype, device="cpu", seed=0):
    """q, k, v in one of three memory layouts: (B, H, L, D) contiguous, views of (B, L, H, D) memory, or upstream's
    permuted qkv views (three interleaved slices of one (B, L, 3, H, D) tensor: not dense)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "bhld":
        return [torch.randn(B, H, L, D, generator=g).to(device, dtype) for _ in range(3)]
    if layout == "blhd":
        return [torch.randn(B, L, H, D, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3)]
    qkv = torch.randn(B, L, 3, H, D, generator=g).to(device, dtype).permute(2, 0, 3, 1, 4)
    return [qkv[i] for i in range(3)]


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
    # D = 64: scale 1/8 is a power of two, so upstream's q * scale and (q @ k^T) * scale agree bit for bit.
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("layout", ["bhld", "blhd", "qkv"])
def test_reference_backend_is_autograd_of_the_reference(layout, dtype):
    """The reference backend's backward op gives torch's autograd of the materialised reference, bit for bit."""
    q, k, v = _layout(layout, 2, 3, 11, 32, dtype)
    do = torch.randn(2, 3, 11, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = _run(ref.attention, q, k, v, do, dtype)
    got = _run(lambda q, k, v: attention(q, k, v, backend="reference"), q, k, v, do, dtype)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=needs_triton)])
def test_op_lse(backend):
    """The op's second result: the natural log-sum-exp of each query row's scaled scores, (B, H, L) fp32."""
    device = "cpu" if backend == "cpp" else DEV
    q, k, v, _ = _inputs(2, 3, 19, 32, torch.float32, device)
    out, lse = torch.ops.sslam_fast.attention(q, k, v, backend)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 19)
    torch.testing.assert_close(lse, ref.attention_lse(q, k), rtol=0, atol=1e-5)
    assert torch.equal(out, attention(q, k, v, backend=backend))


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
# bf16 on CUDA only: bf16 arithmetic is wrong in the Triton interpreter.
TRITON_BF16 = [_case(1, 3, 7, 64, torch.bfloat16, needs_cuda), _case(1, 2, 103, 64, torch.bfloat16, needs_cuda)]


@needs_triton
@pytest.mark.parametrize("B,H,L,D,dtype", TRITON_FP32 + TRITON_FP16 + TRITON_BF16)
def test_triton_matches_reference(B, H, L, D, dtype, nan_buffers):
    got = _compare(lambda q, k, v: attention(q, k, v, backend="triton"), B, H, L, D, dtype)
    assert all(bool(torch.isfinite(t).all()) for t in got)


@needs_triton
def test_triton_lse_and_layout(nan_buffers):
    q, k, v, _ = _inputs(2, 3, 19, 32, torch.float32)
    out, lse = torch.ops.sslam_fast.attention(q, k, v, "triton")
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


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=needs_triton)])
def test_empty_batch(backend):
    q = torch.randn(0, 2, 9, 16, device="cpu" if backend == "cpp" else DEV, requires_grad=True)
    out = attention(q, q, q, backend=backend)
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


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=ref.softmax_scale(q.shape[-1]))


@pytest.mark.parametrize("L", [5, 17, 103])
@pytest.mark.parametrize("layout", ["bhld", "blhd", "qkv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
def test_cpp_is_sdpa_bit_for_bit(dtype, layout, L):
    """The cpp backend runs the kernels F.scaled_dot_product_attention runs on CPU: output, gradients and their
    strides are SDPA's, bit for bit (the NaN guard adds exact zeros to finite rows)."""
    q, k, v = _layout(layout, 2, 3, L, 64, dtype)
    do = torch.randn(2, 3, L, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    results = []
    for fn in (lambda q, k, v: attention(q, k, v, backend="cpp"), _sdpa):
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qd, kd, vd)
        out.backward(do)
        results.append([out.detach(), qd.grad, kd.grad, vd.grad])
    for name, g, w in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(g, w) and g.stride() == w.stride(), name


@pytest.mark.parametrize("L", [5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_cpp_nan_guard_does_not_reach_the_gradient(where, dtype, L):
    """With a NaN input the forward's guard puts NaN where the kernel wrote zeros; the gradients stay the kernel's
    own (SDPA's), NaN for NaN."""
    q, k, v = _layout("bhld", 2, 3, L, 64, dtype)
    {"q": q, "k": k, "v": v}[where][1, 2, L // 2, 7] = float("nan")
    do = torch.randn(2, 3, L, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    results = []
    for fn in (lambda q, k, v: attention(q, k, v, backend="cpp"), _sdpa):
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
        fn(qd, kd, vd).backward(do)
        results.append([qd.grad, kd.grad, vd.grad])
    for name, g, w in zip(("dq", "dk", "dv"), *results):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


OP_BACKENDS = ["reference", "cpp", pytest.param("triton", marks=needs_triton), pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_opcheck(backend, dtype):
    if dtype == torch.bfloat16 and backend == "triton" and not HAS_CUDA:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter")
    device = {"cpp": "cpu", "cuda": "cuda"}.get(backend, DEV)
    q, k, v = _layout("qkv", 1, 2, 17, 16, dtype, device)
    do = torch.randn(1, 2, 17, 16, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.sslam_fast.attention.default, (q, k, v, backend), test_utils=OPCHECK_ALL)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.sslam_fast.attention(q, k, v, backend)
    assert not lse.requires_grad
    torch.library.opcheck(
        torch.ops.sslam_fast.attention_backward.default,
        (do, q, k, v, out, lse, backend),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("layout", ["bhld", "blhd", "qkv"])
def test_cuda_backend_on_meta_tensors(layout, dtype):
    """The cuda backend's forward and backward (ATen's CUDA flash / memory-efficient kernels) run on meta tensors
    without a GPU: the argument lists of the ATen calls are right, and their results have the shapes, dtypes and
    strides of the op's fake for backend "cuda"."""
    B, H, L, D = 2, 3, 17, 64
    if layout == "bhld":
        q, k, v = (torch.empty(B, H, L, D, dtype=dtype, device="meta") for _ in range(3))
    elif layout == "blhd":
        q, k, v = (torch.empty(B, L, H, D, dtype=dtype, device="meta").transpose(1, 2) for _ in range(3))
    else:
        qkv = torch.empty(B, L, 3, H, D, dtype=dtype, device="meta").permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

    def desc(ts):
        return [(tuple(t.shape), t.dtype, t.stride()) for t in ts]

    got = attention_mod._attention_cuda(q, k, v)
    fake = torch.ops.sslam_fast.attention(q, k, v, "cuda")  # meta tensors run the op's fake
    assert desc(got) == desc(fake)
    lse_len = -(-L // 32) * 32 if dtype == torch.float32 else L  # the memory-efficient kernel pads lse
    assert desc(got)[0][:2] == ((B, H, L, D), dtype) and desc(got)[1][:2] == ((B, H, lse_len), torch.float32)
    do = torch.empty(B, H, L, D, dtype=dtype, device="meta")
    grads = attention_mod._attention_backward_cuda(do, q, k, v, *got)
    fake_grads = torch.ops.sslam_fast.attention_backward(do, q, k, v, *fake, "cuda")
    assert desc(grads) == desc(fake_grads)
    assert all(g[:2] == ((B, H, L, D), dtype) for g in desc(grads))


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=needs_triton)])
def test_compile_fullgraph(backend):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v):
        return attention(q, k, v, backend=backend) * 2.0

    device = "cpu" if backend == "cpp" else DEV
    q, k, v, do = _inputs(2, 3, 17, 16, torch.float32, device)
    want = _run(f, q, k, v, do, torch.float32)
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=record)(q, k, v)
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    # opaque with every backend: the custom op is in the graph, its kernels are not traced into
    assert torch.ops.sslam_fast.attention.default in targets
    torch._dynamo.reset()
    got = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), q, k, v, do, torch.float32)
    _check_fp32(got, want, atol=1e-5)


def test_op_rejects_bad_arguments_when_called_directly():
    q = torch.randn(2, 3, 5, 16)
    with pytest.raises(ValueError, match="k must have q's shape"):
        torch.ops.sslam_fast.attention(q, q[:, :, :4], q, "reference")
    with pytest.raises(ValueError, match="head dim"):
        torch.ops.sslam_fast.attention(q[..., :8], q[..., :8], q[..., :8], "cpp")
    with pytest.raises(ValueError, match="not one of this op's backends"):
        torch.ops.sslam_fast.attention(q, q, q, "flash")
    out, lse = torch.ops.sslam_fast.attention(q, q, q, "reference")
    with pytest.raises(ValueError, match="grad_out must have q's shape"):
        torch.ops.sslam_fast.attention_backward(q[:1], q, q, q, out, lse, "reference")


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


@on_cpu_only
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
@needs_cuda
@pytest.mark.parametrize("B,H,L,D", REAL_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_ID.get)
def test_cuda_real_shapes(B, H, L, D, dtype):
    assert _backend.base_name(_backend.resolve("attention", "auto", "cuda")) == "cuda"
    q, k, v, do = _inputs(B, H, L, D, dtype, "cuda", seed=B)
    want = _run(ref.attention, q, k, v, do, torch.float32)
    low = _run(ref.attention, q, k, v, do, dtype)
    _check_low_precision(_run(lambda q, k, v: attention(q, k, v, backend="triton"), q, k, v, do, dtype), low, want)
    _check_low_precision(_run(lambda q, k, v: attention(q, k, v, backend="cuda"), q, k, v, do, dtype), low, want)


@pytest.mark.cuda
@needs_cuda
def test_cuda_fp32_ieee():
    """fp32 on the GPU: tl.dot with input_precision="ieee" (no TF32) matches the fp32 reference tightly."""
    _compare(lambda q, k, v: attention(q, k, v, backend="triton"), 24, 12, 513, 64, torch.float32, device="cuda")
    _compare(lambda q, k, v: attention(q, k, v, backend="cuda"), 24, 12, 513, 64, torch.float32, device="cuda")
