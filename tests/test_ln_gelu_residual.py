"""The fused tail of the CNN decoder block (ALGORITHM §2.2): ln_gelu_residual, forward and gradients, every backend.

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py). The C++ kernel
(csrc/ln_gelu_residual.cpp) runs on CPU tensors: the shared tests give it CPU tensors even when there is a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from conftest import DEV, HAS_CUDA, OPCHECK_ALL, needs_cpp, needs_triton
from sm90_compile import compiles_for_sm90

from sslam_fast import _backend
from sslam_fast.ops.ln_gelu_residual import ln_gelu_residual
from sslam_fast.reference import ln_gelu_residual as ref

needs_cpp_tail = needs_cpp("ln_gelu_residual", "ln_gelu_residual_backward")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp_tail), pytest.param("triton", marks=needs_triton)]
FORMATS = {"cf": torch.contiguous_format, "cl": torch.channels_last}


def _dev(backend):
    return "cpu" if backend == "cpp" else DEV


def _oracle(y, z):
    """fp64 GELU(LN_C(y)) + z, and its vjp function (autograd in fp64)."""
    y64 = y.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_()
    n = F.layer_norm(y64.transpose(1, 3), (y.shape[1],), eps=1e-5).transpose(1, 3)
    return y64, z64, F.gelu(n) + z64


OP_CASES = [(2, 32, 8, 4), (1, 1, 1, 1), (3, 7, 5, 3), (1, 130, 2, 3)]


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "R{}-C{}-H{}-W{}".format(*c))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ln_gelu_residual_against_fp64(backend, case, dtype, fmt):
    R, C, H, W = case
    g = torch.Generator().manual_seed(1)
    mf, dev = FORMATS[fmt], _dev(backend)
    y = (torch.randn(R, C, H, W, generator=g) * 3 + 1).to(dev, dtype).contiguous(memory_format=mf).requires_grad_()
    z = torch.randn(R, C, H, W, generator=g).to(dev, dtype).contiguous(memory_format=mf).requires_grad_()
    go = torch.randn(R, C, H, W, generator=g).to(dev, dtype)
    out = ln_gelu_residual(y, z, backend=backend)
    gy, gz = torch.autograd.grad(out, (y, z), go)
    assert out.dtype == dtype and gy.dtype == dtype
    assert out.is_contiguous(memory_format=mf) == y.is_contiguous(memory_format=mf)
    assert torch.equal(gz, go)  # the residual passes grad_out through
    y64, _, o64 = _oracle(y, z)
    (gy64,) = torch.autograd.grad(o64, (y64,), go.double())
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), o64, rtol=0, atol=2e-6)
        torch.testing.assert_close(gy.double(), gy64, rtol=0, atol=5e-6 * max(1.0, gy64.abs().max().item()))
    else:
        # fp16: the error against fp64 must be at most twice that of upstream's PyTorch run in fp16 (plus rounding)
        y16, z16 = y.detach().requires_grad_(), z.detach().requires_grad_()
        base = _upstream_tail(y16, z16)
        (gbase,) = torch.autograd.grad(base, (y16,), go)
        ulp = 2.0**-10
        assert (out.double() - o64).abs().max() <= 2 * (base.double() - o64).abs().max() + ulp * o64.abs().max() / 2
        assert (gy.double() - gy64).abs().max() <= 2 * (gbase.double() - gy64).abs().max() + ulp * gy64.abs().max()


def _upstream_tail(y, z):
    return F.gelu(F.layer_norm(y.transpose(-3, -1), (y.shape[1],)).transpose(-3, -1)) + z


def test_reference_backward_is_autograd_of_the_spec():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(2, 9, 3, 5, generator=g, dtype=torch.float64)
    go = torch.randn(2, 9, 3, 5, generator=g, dtype=torch.float64)
    y64, _, o64 = _oracle(y, torch.zeros_like(y))
    (want,) = torch.autograd.grad(o64, (y64,), go)
    torch.testing.assert_close(ref.ln_gelu_residual_backward(go.float(), y.float()).double(), want, rtol=0, atol=1e-5)


@needs_triton
def test_triton_matches_reference_exactly_enough_and_deterministic():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(3, 20, 4, 6, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    z = torch.randn(3, 20, 4, 6, generator=g).to(DEV)  # another memory format than y
    a = ln_gelu_residual(y, z, backend="triton")
    b = ln_gelu_residual(y, z, backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(a, ln_gelu_residual(y, z, backend="triton"))


def test_bad_input():
    z = torch.randn(2, 8, 4, 3)
    with pytest.raises(ValueError, match="z must"):
        ln_gelu_residual(z, z[:1])
    with pytest.raises(TypeError, match="z must"):
        ln_gelu_residual(z, z.half())
    with pytest.raises(ValueError, match="y must"):
        ln_gelu_residual(z[0], z[0])
    with pytest.raises(ValueError, match="backend"):
        ln_gelu_residual(z, z, backend="Triton")
    with pytest.raises(RuntimeError, match="cuda"):  # no CUDA-C++ kernel for this op, on any device
        ln_gelu_residual(z, z, backend="cuda")
    # the op called directly checks the shapes too (a kernel would read out of bounds)
    with pytest.raises(ValueError, match="z must"):
        torch.ops.sslam_fast.ln_gelu_residual(z, z[:1], "reference")
    with pytest.raises(ValueError, match="grad_out must"):
        torch.ops.sslam_fast.ln_gelu_residual_backward(z[:1], z, "reference")


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, fmt):
    g = torch.Generator().manual_seed(4)
    mf, dev = FORMATS[fmt], _dev(backend)
    y = torch.randn(2, 12, 3, 5, generator=g).to(dev).contiguous(memory_format=mf).requires_grad_()
    z = torch.randn(2, 12, 3, 5, generator=g).to(dev).requires_grad_()
    torch.library.opcheck(torch.ops.sslam_fast.ln_gelu_residual.default, (y, z, backend), test_utils=OPCHECK_ALL)
    go = torch.randn(2, 12, 3, 5, generator=g).to(dev)
    torch.library.opcheck(
        torch.ops.sslam_fast.ln_gelu_residual_backward.default,
        (go, y.detach(), backend),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


# --- the C++ CPU kernel ----------------------------------------------------------------------------------------------

# (R, C, H, W): the tiny model's decoder (C 64 on the 16 x 8 grid), C = 1, H*W = 1, C not a multiple of the SIMD width,
# H*W = 99 (one full NCHW tile of 64 positions and a partial one), and one large enough for two parallel chunks.
CPP_CASES = [(2, 64, 16, 8), (2, 1, 3, 5), (3, 37, 1, 1), (2, 13, 5, 7), (1, 200, 9, 11), (8, 72, 16, 8)]


def _cpp_inputs(case, fmt, seed=5, offset=0.0, dtype=torch.float32):
    R, C, H, W = case
    g = torch.Generator().manual_seed(seed)
    mf = FORMATS[fmt]
    y = (torch.randn(R, C, H, W, generator=g) + offset).to(dtype).contiguous(memory_format=mf)
    z = torch.randn(R, C, H, W, generator=g).to(dtype).contiguous(memory_format=mf)
    go = torch.randn(R, C, H, W, generator=g).to(dtype).contiguous(memory_format=mf)
    return y, z, go


def _fwd_bwd(y, z, go, backend):
    y, z = y.detach().requires_grad_(), z.detach().requires_grad_()
    out = ln_gelu_residual(y, z, backend=backend)
    gy, gz = torch.autograd.grad(out, (y, z), go)
    return out, gy, gz


@needs_cpp_tail
@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("case", CPP_CASES, ids=lambda c: "R{}-C{}-H{}-W{}".format(*c))
def test_cpp_matches_reference(case, fmt):
    y, z, go = _cpp_inputs(case, fmt)
    out, gy, gz = _fwd_bwd(y, z, go, "cpp")
    want, want_gy, _ = _fwd_bwd(y, z, go, "reference")
    mf = FORMATS[fmt]
    assert out.is_contiguous(memory_format=mf) and gy.is_contiguous(memory_format=mf)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(gy, want_gy, rtol=0, atol=1e-5)
    assert torch.equal(gz, go)


@needs_cpp_tail
@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
def test_cpp_large_mean(fmt):
    # y = 1e3 + N(0, 1): E[y^2] - E[y]^2 in float32 loses the variance entirely (ulp(1e6) = 0.06), and a mean rounded
    # to float32 near 1e3 is off by up to 3e-5; the kernel is compared with the fp64 oracle on the same fp32 inputs.
    y, z, go = _cpp_inputs((2, 96, 8, 4), fmt, offset=1e3)
    out, gy, _ = _fwd_bwd(y, z, go, "cpp")
    y64, _, o64 = _oracle(y, z)
    (gy64,) = torch.autograd.grad(o64, (y64,), go.double())
    torch.testing.assert_close(out.double(), o64, rtol=0, atol=2e-6)
    torch.testing.assert_close(gy.double(), gy64, rtol=0, atol=5e-6 * max(1.0, gy64.abs().max().item()))


@needs_cpp_tail
def test_cpp_bf16_rounds_the_fp32_result_once():
    y, z, go = _cpp_inputs((2, 40, 6, 5), "cl", dtype=torch.bfloat16)
    out, gy, _ = _fwd_bwd(y, z, go, "cpp")
    want, want_gy, _ = _fwd_bwd(y, z, go, "reference")  # fp32 math, one rounding to bf16
    assert out.dtype == gy.dtype == torch.bfloat16
    for got, ref_ in ((out, want), (gy, want_gy)):
        # both round nearly equal fp32 values: at most one bf16 step apart (a step is <= 2^-7 of the value)
        assert ((got.float() - ref_.float()).abs() <= 2.0**-7 * ref_.float().abs() + 1e-6).all()
        assert (got != ref_).float().mean() < 0.01  # and mostly identical


@needs_cpp_tail
def test_cpp_mixed_and_other_layouts():
    g = torch.Generator().manual_seed(6)
    R, C, H, W = 2, 24, 6, 5
    cl = torch.channels_last
    dense_other = torch.randn(R, H, C, W, generator=g).permute(0, 2, 1, 3)  # dense, neither NCHW nor channels-last
    strided = torch.randn(R, 2 * C, H, W, generator=g)[:, ::2]  # not dense
    ys = [torch.randn(R, C, H, W, generator=g).contiguous(memory_format=cl), dense_other, strided]
    others = [torch.randn(R, C, H, W, generator=g), torch.randn(R, C, H, W, generator=g).contiguous(memory_format=cl)]
    for y in ys:
        for z in others:
            out = torch.ops.sslam_fast_C.ln_gelu_residual(y, z)
            gy = torch.ops.sslam_fast_C.ln_gelu_residual_backward(z, y)  # z doubles as grad_out
            assert out.stride() == gy.stride() == torch.empty_like(y).stride()
            torch.testing.assert_close(out, ref.ln_gelu_residual(y, z), rtol=0, atol=1e-5)
            torch.testing.assert_close(gy, ref.ln_gelu_residual_backward(z, y), rtol=0, atol=1e-5)


@needs_cpp_tail
@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
def test_cpp_non_finite_stays_in_its_position(fmt):
    y, z, go = _cpp_inputs((2, 20, 4, 70), fmt)
    y[1, 3, 2, 65] = float("nan")
    out = torch.ops.sslam_fast_C.ln_gelu_residual(y, z)
    gy = torch.ops.sslam_fast_C.ln_gelu_residual_backward(go, y)
    for t in (out, gy):
        assert t[1, :, 2, 65].isnan().all()
        t[1, :, 2, 65] = 0.0
        assert t.isfinite().all()


@needs_cpp_tail
def test_cpp_same_bits_for_any_thread_count():
    y, z, go = _cpp_inputs((8, 72, 16, 8), "cl")  # 73728 elements: two parallel chunks
    f, b = torch.ops.sslam_fast_C.ln_gelu_residual, torch.ops.sslam_fast_C.ln_gelu_residual_backward
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (f(y, z), b(go, y))
        torch.set_num_threads(2)
        two = (f(y, z), b(go, y))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_cpp_tail
def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.base_name(_backend.resolve("ln_gelu_residual", "auto", "cpu")) == "cpp"
    assert _backend.base_name(_backend.resolve("ln_gelu_residual_backward", "auto", "cpu")) == "cpp"


@needs_cpp_tail
@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
def test_cpp_ops_opcheck(fmt):
    y, z, go = _cpp_inputs((2, 12, 3, 5), fmt, seed=7)
    torch.library.opcheck(torch.ops.sslam_fast_C.ln_gelu_residual.default, (y, z))
    torch.library.opcheck(torch.ops.sslam_fast_C.ln_gelu_residual_backward.default, (go, y))


@needs_cpp_tail
def test_cpp_ops_bad_input():
    y = torch.randn(2, 8, 3, 4)
    with pytest.raises(RuntimeError, match="z must have shape"):
        torch.ops.sslam_fast_C.ln_gelu_residual(y, y[:1])
    with pytest.raises(RuntimeError, match="z must have dtype"):
        torch.ops.sslam_fast_C.ln_gelu_residual(y, y.half())
    with pytest.raises(RuntimeError, match="y must be float32, float16 or bfloat16"):
        torch.ops.sslam_fast_C.ln_gelu_residual(y.double(), y.double())
    with pytest.raises(RuntimeError, match="grad_out must be 4-D"):
        torch.ops.sslam_fast_C.ln_gelu_residual_backward(y[0], y)


@needs_cpp_tail
def test_cpp_narrower_simd_paths():
    """The AVX2 and baseline kernels (SSLAM_FAST_CPU_ISA, read once per process) give the values of the default one."""
    code = (
        "import sys, torch\n"
        "torch.ops.load_library(sys.argv[3])\n"  # the extension alone: the package's imports cost seconds
        "y, z = torch.load(sys.argv[1])\n"
        "f, b = torch.ops.sslam_fast_C.ln_gelu_residual, torch.ops.sslam_fast_C.ln_gelu_residual_backward\n"
        "yc = y.contiguous(memory_format=torch.channels_last)\n"
        "torch.save([f(y, z), b(z, y), f(yc, z), b(z, yc)], sys.argv[2])\n"
    )
    y, z, _ = _cpp_inputs((2, 37, 9, 11), "cf")
    f, b = torch.ops.sslam_fast_C.ln_gelu_residual, torch.ops.sslam_fast_C.ln_gelu_residual_backward
    yc = y.contiguous(memory_format=torch.channels_last)
    want = [f(y, z), b(z, y), f(yc, z), b(z, yc)]
    from sslam_fast import _C

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "in.pt")
        torch.save([y, z], src)
        runs = {}
        for isa in ("avx2", "baseline"):  # both at once: each process pays torch's import
            env = dict(os.environ, SSLAM_FAST_CPU_ISA=isa)
            dst = os.path.join(d, f"{isa}.pt")
            runs[isa] = (subprocess.Popen([sys.executable, "-c", code, src, dst, _C.__file__], env=env), dst)
        for isa, (proc, dst) in runs.items():
            assert proc.wait(timeout=120) == 0, isa
            for got, w in zip(torch.load(dst), want):
                torch.testing.assert_close(got, w, rtol=0, atol=1e-6, msg=isa)


# --- compiled (non-interpreted) Triton -----------------------------------------------------------------------------
# The interpreter runs kernels as numpy code; it cannot catch what only the compiler sees (types of loop-carried
# values, ints specialised to constexpr 1, bf16 lowering). Without a GPU, compile the kernels for sm_90 (H100) to a
# cubin in a subprocess where TRITON_INTERPRET is unset.


@pytest.mark.skipif(HAS_CUDA or not _backend.triton_importable(), reason="the CUDA tests run the kernels themselves")
def test_kernels_compile_for_sm90():
    strides = {
        n: "i32" for n in ["M", "HW", "C", "y_sr", "y_sp", "y_sc", "z_sr", "z_sp", "z_sc", "o_sr", "o_sp", "o_sc"]
    }
    bwd_strides = {
        n: "i32" for n in ["M", "HW", "C", "g_sr", "g_sp", "g_sc", "y_sr", "y_sp", "y_sc", "o_sr", "o_sp", "o_sc"]
    }
    fwd = dict(y_ptr="*bf16", z_ptr="*bf16", out_ptr="*bf16", **strides, eps="fp32")
    bwd = dict(go_ptr="*bf16", y_ptr="*bf16", gy_ptr="*bf16", **bwd_strides, eps="fp32")
    c = {"INV_SQRT2": 0.7071067811865476, "BLOCK_M": 4, "BLOCK_C": 1024}
    specs = [
        ("_ln_gelu_residual_fwd_kernel", fwd, dict(c, o_sc=1), 8),  # channels-last: unit channel stride
        ("_ln_gelu_residual_bwd_kernel", bwd, dict(c, INV_SQRT_2PI=0.3989422804014327), 8),
    ]
    compiles_for_sm90("ln_gelu_residual", specs)
