"""CNN decoder block (ALGORITHM §2.2): decoder_block and the fused ln_gelu_residual op, forward and every gradient.

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py). The C++ kernel
(csrc/decoder.cpp) runs on CPU tensors: the shared tests give it CPU tensors even when there is a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

from sslam_fast import _backend
from sslam_fast.ops.decoder import decoder_block, ln_gelu_residual
from sslam_fast.reference import training as ref

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
TRITON_OK = _backend.triton_importable() and (HAS_CUDA or _backend.triton_interpreter())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here (no CUDA and no TRITON_INTERPRET=1)")
CPP_OK = _backend.extension_has("ln_gelu_residual_cpu") and _backend.extension_has("ln_gelu_residual_backward_cpu")
needs_cpp = pytest.mark.skipif(not CPP_OK, reason="sslam_fast._C was built without the ln_gelu_residual C++ kernels")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]


def _dev(backend):
    return "cpu" if backend == "cpp" else DEV
FORMATS = {"cf": torch.contiguous_format, "cl": torch.channels_last}


@pytest.fixture(autouse=True)
def _fp32_convs(monkeypatch):
    # cuDNN may run fp32 convs in TF32 (10-bit mantissa) and picks different algorithms per memory format; the
    # comparisons here are of the fused tail, so every conv runs in true fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _block_inputs(R, C, H, W, G, dtype=torch.float32, fmt=torch.contiguous_format, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, C, H, W, generator=g)
    w = torch.randn(C, C // G, 3, 3, generator=g) * (1.0 / (3 * (C // G) ** 0.5))
    b = torch.randn(C, generator=g) * 0.5
    z = z.to(device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    return z, w.to(device, dtype).requires_grad_(), b.to(device, dtype).requires_grad_()


def _upstream_block(z, w, b, groups):
    """``Decoder2d`` block + ``add_residual``, written with the upstream modules (the conv takes w and b as given)."""
    block = torch.nn.Sequential(
        _Conv(w, b, groups),
        _TransposeLast(-3),
        torch.nn.LayerNorm(w.shape[0], elementwise_affine=False),
        _TransposeLast(-3),
        torch.nn.GELU(),
    ).to(z.device, z.dtype)
    return block(z) + z


class _Conv(torch.nn.Module):  # nn.Conv2d(C, C, 3, padding=1, groups) with the test's weight and bias tensors
    def __init__(self, w, b, groups):
        super().__init__()
        self.w, self.b, self.groups = w, b, groups

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=1, groups=self.groups)


class _TransposeLast(torch.nn.Module):  # fairseq TransposeLast(tranpose_dim=-3)
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.transpose(self.dim, -1)


# (R, C, H, W, groups): R = 1, primes, 1x1 maps, the SSLAM aspect scaled down.
CASES = [(2, 32, 8, 4, 4), (1, 16, 1, 1, 1), (3, 24, 5, 3, 8), (1, 48, 7, 5, 16), (2, 12, 3, 8, 3)]


def _case_id(c):
    return "R{}-C{}-H{}-W{}-G{}".format(*c)


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_forward_and_grads_fp32(backend, case, fmt):
    R, C, H, W, G = case
    dev = _dev(backend)
    z, w, b = _block_inputs(R, C, H, W, G, fmt=FORMATS[fmt], device=dev)
    go = torch.randn(R, C, H, W, device=dev)
    out = decoder_block(z, w, b, G, backend=backend)
    grads = torch.autograd.grad(out, (z, w, b), go)
    want = _upstream_block(z, w, b, G)
    want_grads = torch.autograd.grad(want, (z, w, b), go)
    assert out.shape == (R, C, H, W) and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for name, g, wg in zip(("z", "conv_weight", "conv_bias"), grads, want_grads):
        torch.testing.assert_close(g, wg, rtol=1e-5, atol=2e-5, msg=name)
    assert not torch.allclose(out, z, atol=1e-3)  # the block really did something


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_grad_input_at_a_time(backend):
    z, w, _ = _block_inputs(1, 8, 4, 3, 2, device=_dev(backend))
    out = decoder_block(z, w.detach(), None, 2, backend=backend)  # no bias, weight frozen
    (gz,) = torch.autograd.grad(out.sum(), (z,))
    want = _upstream_block(z, w.detach(), torch.zeros(8, device=z.device), 2)
    torch.testing.assert_close(gz, torch.autograd.grad(want.sum(), (z,))[0], rtol=1e-5, atol=1e-5)


def test_bad_input():
    z, w, b = _block_inputs(2, 8, 4, 3, 2, device="cpu")
    with pytest.raises(ValueError, match="z must"):
        decoder_block(z[0], w, b, 2)
    with pytest.raises(TypeError, match="z must"):
        decoder_block(z.double(), w, b, 2)
    with pytest.raises(ValueError, match="conv_weight"):
        decoder_block(z, w[:, :, :2, :2], b, 2)
    with pytest.raises(ValueError, match="conv_weight"):
        decoder_block(z, w, b, 4)  # (8, 4, 3, 3) does not fit groups 4
    with pytest.raises(TypeError, match="conv_weight"):
        decoder_block(z, w.half(), b, 2)
    with pytest.raises(ValueError, match="conv_bias"):
        decoder_block(z, w, b[:4], 2)
    with pytest.raises(TypeError, match="conv_bias"):
        decoder_block(z, w, b.half(), 2)
    with pytest.raises(ValueError, match="groups"):
        decoder_block(z, w, b, 3)
    with pytest.raises(ValueError, match="groups"):
        decoder_block(z, w, b, 0)
    with pytest.raises(ValueError, match="z must"):
        ln_gelu_residual(z, z[:1])
    with pytest.raises(TypeError, match="z must"):
        ln_gelu_residual(z, z.half())
    with pytest.raises(ValueError, match="y must"):
        ln_gelu_residual(z[0], z[0])
    with pytest.raises(ValueError, match="backend"):
        decoder_block(z, w, b, 2, backend="Triton")
    with pytest.raises(RuntimeError, match="cuda"):  # no CUDA-C++ kernel for this op, on any device
        decoder_block(z, w, b, 2, backend="cuda")


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, fmt):
    g = torch.Generator().manual_seed(4)
    mf, dev = FORMATS[fmt], _dev(backend)
    y = torch.randn(2, 12, 3, 5, generator=g).to(dev).contiguous(memory_format=mf).requires_grad_()
    z = torch.randn(2, 12, 3, 5, generator=g).to(dev).requires_grad_()
    torch.library.opcheck(torch.ops.sslam_fast.ln_gelu_residual.default, (y, z, backend))
    go = torch.randn(2, 12, 3, 5, generator=g).to(dev)
    torch.library.opcheck(
        torch.ops.sslam_fast.ln_gelu_residual_backward.default,
        (go, y.detach(), backend),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_compile_fullgraph_with_backward():
    z, w, b = _block_inputs(2, 8, 4, 3, 2, device="cpu")

    def f(z, w, b):
        return decoder_block(z, w, b, 2, backend="reference").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(z, w, b)
    grads = torch.autograd.grad(got, (z, w, b))
    want = f(z, w, b)
    torch.testing.assert_close(got, want)
    for g, wg in zip(grads, torch.autograd.grad(want, (z, w, b))):
        torch.testing.assert_close(g, wg)


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


@needs_cpp
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


@needs_cpp
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


@needs_cpp
def test_cpp_bf16_rounds_the_fp32_result_once():
    y, z, go = _cpp_inputs((2, 40, 6, 5), "cl", dtype=torch.bfloat16)
    out, gy, _ = _fwd_bwd(y, z, go, "cpp")
    want, want_gy, _ = _fwd_bwd(y, z, go, "reference")  # fp32 math, one rounding to bf16
    assert out.dtype == gy.dtype == torch.bfloat16
    for got, ref_ in ((out, want), (gy, want_gy)):
        # both round nearly equal fp32 values: at most one bf16 step apart (a step is <= 2^-7 of the value)
        assert ((got.float() - ref_.float()).abs() <= 2.0**-7 * ref_.float().abs() + 1e-6).all()
        assert (got != ref_).float().mean() < 0.01  # and mostly identical


@needs_cpp
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
            out = torch.ops.sslam_fast.ln_gelu_residual_cpu(y, z)
            gy = torch.ops.sslam_fast.ln_gelu_residual_backward_cpu(z, y)  # z doubles as grad_out
            assert out.stride() == gy.stride() == torch.empty_like(y).stride()
            torch.testing.assert_close(out, ref.ln_gelu_residual(y, z), rtol=0, atol=1e-5)
            torch.testing.assert_close(gy, ref.ln_gelu_residual_backward(z, y), rtol=0, atol=1e-5)


@needs_cpp
@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
def test_cpp_non_finite_stays_in_its_position(fmt):
    y, z, go = _cpp_inputs((2, 20, 4, 70), fmt)
    y[1, 3, 2, 65] = float("nan")
    out = torch.ops.sslam_fast.ln_gelu_residual_cpu(y, z)
    gy = torch.ops.sslam_fast.ln_gelu_residual_backward_cpu(go, y)
    for t in (out, gy):
        assert t[1, :, 2, 65].isnan().all()
        t[1, :, 2, 65] = 0.0
        assert t.isfinite().all()


@needs_cpp
def test_cpp_same_bits_for_any_thread_count():
    y, z, go = _cpp_inputs((8, 72, 16, 8), "cl")  # 73728 elements: two parallel chunks
    f, b = torch.ops.sslam_fast.ln_gelu_residual_cpu, torch.ops.sslam_fast.ln_gelu_residual_backward_cpu
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (f(y, z), b(go, y))
        torch.set_num_threads(2)
        two = (f(y, z), b(go, y))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_cpp
def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.base_name(_backend.resolve("ln_gelu_residual", "auto", "cpu")) == "cpp"
    assert _backend.base_name(_backend.resolve("ln_gelu_residual_backward", "auto", "cpu")) == "cpp"
    calls = []
    for name in ("ln_gelu_residual", "ln_gelu_residual_backward"):
        fn = _backend.kernel(name, "cpp")
        counted = lambda *a, fn=fn, n=name: calls.append(n) or fn(*a)  # noqa: E731
        monkeypatch.setitem(_backend._REGISTRY[name].kernels, "cpp", counted)
    z, w, b = _block_inputs(2, 16, 4, 3, 4, device="cpu")
    decoder_block(z, w, b, 4).sum().backward()  # fp32 on CPU, backend auto
    assert calls == ["ln_gelu_residual", "ln_gelu_residual_backward"]


@needs_cpp
@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
def test_cpp_ops_opcheck(fmt):
    y, z, go = _cpp_inputs((2, 12, 3, 5), fmt, seed=7)
    torch.library.opcheck(torch.ops.sslam_fast.ln_gelu_residual_cpu.default, (y, z))
    torch.library.opcheck(torch.ops.sslam_fast.ln_gelu_residual_backward_cpu.default, (go, y))


@needs_cpp
def test_cpp_ops_bad_input():
    y = torch.randn(2, 8, 3, 4)
    with pytest.raises(RuntimeError, match="z must have shape"):
        torch.ops.sslam_fast.ln_gelu_residual_cpu(y, y[:1])
    with pytest.raises(RuntimeError, match="z must have dtype"):
        torch.ops.sslam_fast.ln_gelu_residual_cpu(y, y.half())
    with pytest.raises(RuntimeError, match="y must be float32, float16 or bfloat16"):
        torch.ops.sslam_fast.ln_gelu_residual_cpu(y.double(), y.double())
    with pytest.raises(RuntimeError, match="grad_out must be 4-D"):
        torch.ops.sslam_fast.ln_gelu_residual_backward_cpu(y[0], y)


@needs_cpp
def test_cpp_narrower_simd_paths():
    """The AVX2 and baseline kernels (SSLAM_FAST_CPU_ISA, read once per process) give the values of the default one."""
    code = (
        "import sys, torch\n"
        "torch.ops.load_library(sys.argv[3])\n"  # the extension alone: the package's imports cost seconds
        "y, z = torch.load(sys.argv[1])\n"
        "f, b = torch.ops.sslam_fast.ln_gelu_residual_cpu, torch.ops.sslam_fast.ln_gelu_residual_backward_cpu\n"
        "yc = y.contiguous(memory_format=torch.channels_last)\n"
        "torch.save([f(y, z), b(z, y), f(yc, z), b(z, yc)], sys.argv[2])\n"
    )
    y, z, _ = _cpp_inputs((2, 37, 9, 11), "cf")
    f, b = torch.ops.sslam_fast.ln_gelu_residual_cpu, torch.ops.sslam_fast.ln_gelu_residual_backward_cpu
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

from sm90_compile import compiles_for_sm90 as _compiles_for_sm90  # noqa: E402


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
    _compiles_for_sm90("decoder", specs)


# --- CUDA -------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_cuda_sslam_shapes(dtype):
    # 192 student rows, 768 channels on the 64 x 8 patch grid, groups 16 (ALGORITHM §2.2); the input is the (R, 512,
    # 768)
    # token tensor viewed channels-last, as the decoder holds it.
    R, C, H, W, G = 192, 768, 64, 8, 16
    tokens = torch.randn(R, H * W, C, device="cuda", dtype=dtype)
    z = tokens.view(R, H, W, C).permute(0, 3, 1, 2).requires_grad_()
    assert z.is_contiguous(memory_format=torch.channels_last)
    _, w, b = _block_inputs(1, C, 1, 1, G, dtype=dtype, device="cuda")
    go = torch.randn(R, C, H, W, device="cuda", dtype=dtype)
    out = decoder_block(z, w, b, G)  # auto -> triton
    grads = torch.autograd.grad(out, (z, w, b), go)
    z32, w32, b32 = (t.detach().float().requires_grad_() for t in (z, w, b))
    want = ref.decoder_block(z32, w32, b32, G)
    want_grads = torch.autograd.grad(want, (z32, w32, b32), go.float())
    base = _upstream_block(z, w, b, G)  # upstream PyTorch in the same dtype
    base_grads = torch.autograd.grad(base, (z, w, b), go)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        for g, wg in zip(grads, want_grads):
            torch.testing.assert_close(g, wg, rtol=1e-3, atol=1e-3)
    else:
        assert (out.float() - want).abs().max() <= 2 * (base.float() - want).abs().max() + 1e-3
        for g, bg, wg in zip(grads, base_grads, want_grads):
            assert (g.float() - wg).abs().max() <= 2 * (bg.float() - wg).abs().max() + 1e-3 * wg.abs().max()
    assert out.is_contiguous(memory_format=torch.channels_last)


def _stored_feature_maps(fn, args, numel):
    """How many (R, C, H, W)-sized tensors autograd keeps for the backward of ``fn(*args)``."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(1 for n in seen.values() if n == numel)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_block_stores_only_its_input(backend):
    """The conv output is recomputed in the backward: one feature map kept per block (upstream keeps three: the conv
    input, the LayerNorm input and the GELU input)."""
    R, C, H, W, G = 2, 32, 8, 4, 4
    z, w, b = _block_inputs(R, C, H, W, G, fmt=torch.contiguous_format, device="cpu")
    assert _stored_feature_maps(lambda *a: decoder_block(*a, G, backend=backend), (z, w, b), R * C * H * W) == 1
    assert _stored_feature_maps(lambda *a: _upstream_block(*a, G), (z, w, b), R * C * H * W) >= 2


def test_block_under_autocast_matches_the_unfused_block():
    """bf16 autocast: the conv runs in bf16 (forward and its recomputation alike), the tail in fp32 as upstream's
    block does under CUDA autocast (conv in bf16, LayerNorm in fp32); values and gradients as autograd of that."""
    R, C, H, W, G = 2, 32, 8, 4, 4
    z, w, b = _block_inputs(R, C, H, W, G, fmt=torch.channels_last, device="cpu")
    go = torch.randn(R, C, H, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder_block(z, w, b, G, backend="reference")
    bf = torch.bfloat16
    y = F.conv2d(z.to(bf), w.to(bf), b.to(bf), padding=1, groups=G).float()
    want = F.gelu(F.layer_norm(y.transpose(1, 3), (C,), eps=1e-5).transpose(1, 3)) + z
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out, (z, w, b), go)
    exp = torch.autograd.grad(want, (z, w, b), go)
    for name, g, e in zip(("z", "conv_weight", "conv_bias"), got, exp):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)
