"""CNN decoder block (ALGORITHM §2.2): decoder_block (grouped conv + the fused ln_gelu_residual tail), forward and every
gradient, its memory, autocast and custom-op plumbing. The tail itself is tested in tests/test_ln_gelu_residual.py.

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py). The C++ kernel
(csrc/ln_gelu_residual.cpp) runs on CPU tensors: the shared tests give it CPU tensors even when there is a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEV, OPCHECK_ALL, needs_cpp, needs_triton

from sslam_fast import _backend
from sslam_fast.ops.decoder_block import decoder_block
from sslam_fast.reference import decoder_block as ref

needs_cpp_tail = needs_cpp("ln_gelu_residual", "ln_gelu_residual_backward")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp_tail), pytest.param("triton", marks=needs_triton)]
FORMATS = {"cf": torch.contiguous_format, "cl": torch.channels_last}


def _dev(backend):
    return "cpu" if backend == "cpp" else DEV


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
    with pytest.raises(ValueError, match="backend"):
        decoder_block(z, w, b, 2, backend="Triton")
    with pytest.raises(RuntimeError, match="cuda"):  # no CUDA-C++ kernel for this op, on any device
        decoder_block(z, w, b, 2, backend="cuda")
    # the ops called directly check the shapes too
    with pytest.raises(ValueError, match="conv_weight"):
        torch.ops.sslam_fast.decoder_block(z, w, b, 4, "reference")
    with pytest.raises(ValueError, match="grad_out must"):
        torch.ops.sslam_fast.decoder_block_backward(z[:1], z, w, b, 2, [True, True, True], "reference")


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


def _opcheck_inputs(dev, fmt, bias=True):
    z, w, b = _block_inputs(2, 12, 3, 5, 3, fmt=FORMATS[fmt], seed=4, device=dev)
    return z, w, (b if bias else None)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, fmt, bias):
    z, w, b = _opcheck_inputs(_dev(backend), fmt, bias)
    torch.library.opcheck(torch.ops.sslam_fast.decoder_block.default, (z, w, b, 3, backend), test_utils=OPCHECK_ALL)
    go = torch.randn_like(z)
    for mask in ([True, True, bias], [True, False, False], [False, True, False]):
        torch.library.opcheck(
            torch.ops.sslam_fast.decoder_block_backward.default,
            (go, z.detach(), w.detach(), None if b is None else b.detach(), 3, mask, backend),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


def test_backward_op_returns_only_what_is_asked():
    z, w, b = (t.detach() for t in _block_inputs(1, 8, 4, 3, 2, device="cpu"))
    go = torch.randn_like(z)
    full = torch.ops.sslam_fast.decoder_block_backward(go, z, w, b, 2, [True, True, True], "reference")
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        part = torch.ops.sslam_fast.decoder_block_backward(go, z, w, b, 2, mask, "reference")
        for m, p, f in zip(mask, part, full):
            assert (p is None) if not m else torch.equal(p, f)


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


@needs_cpp_tail
def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.base_name(_backend.resolve("decoder_block", "auto", "cpu")) == "cpp"
    assert _backend.base_name(_backend.resolve("decoder_block_backward", "auto", "cpu")) == "cpp"
    calls = []
    for name in ("ln_gelu_residual", "ln_gelu_residual_backward"):
        fn = _backend.kernel(name, "cpp")
        counted = lambda *a, fn=fn, n=name: calls.append(n) or fn(*a)  # noqa: E731
        monkeypatch.setitem(_backend._REGISTRY[name].kernels, "cpp", counted)
    z, w, b = _block_inputs(2, 16, 4, 3, 4, device="cpu")
    decoder_block(z, w, b, 4).sum().backward()  # fp32 on CPU, backend auto
    assert calls == ["ln_gelu_residual", "ln_gelu_residual_backward"]


# --- CUDA -------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_cuda_sslam_shapes(dtype):
    # 192 student rows, 768 channels on the 64 x 8 patch grid, groups 16 (ALGORITHM §2.2); the input is the (R, 512,
    # 768) token tensor viewed channels-last, as the decoder holds it.
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


# --- memory and autocast ----------------------------------------------------------------------------------------------


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
