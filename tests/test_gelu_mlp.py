"""``gelu_mlp``: the transformer MLP with its GELU recomputed in the backward (same numbers, less stored)."""

from __future__ import annotations

import pytest
import torch
from conftest import OPCHECK_ALL

from sslam_fast.ops.gelu_mlp import gelu_mlp
from sslam_fast.reference import gelu_mlp as ref


def _inputs(shape=(3, 7, 24), hidden=96, out=24, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    w1 = (0.2 * torch.randn(hidden, shape[-1], generator=g)).requires_grad_()
    w2 = (0.2 * torch.randn(out, hidden, generator=g)).requires_grad_()
    b1 = (0.1 * torch.randn(hidden, generator=g)).requires_grad_() if bias else None
    b2 = (0.1 * torch.randn(out, generator=g)).requires_grad_() if bias else None
    return x, w1, b1, w2, b2


def _grads(fn, args, grad_out):
    leaves = [a for a in args if a is not None]
    for a in leaves:
        a.grad = None
    out = fn(*args)
    out.backward(grad_out)
    return out.detach(), [a.grad.clone() for a in leaves]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 24), (5, 24), (1, 1, 1, 24)])
def test_matches_reference_forward_and_backward(shape, bias):
    args = _inputs(shape, bias=bias)
    grad_out = torch.randn(*shape[:-1], 24, generator=torch.Generator().manual_seed(9))
    want, g_want = _grads(ref.gelu_mlp, args, grad_out)
    got, g_got = _grads(gelu_mlp, args, grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same ATen kernels in the same order
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert a.dtype == b.dtype and a.shape == b.shape


def test_stores_one_hidden_tensor_not_two():
    """What autograd keeps for the backward: the reference keeps fc1's output and GELU's output, the op fc1's only."""
    args = _inputs((4, 16, 32), hidden=128, out=32)

    def stored_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args)
        params = {a.untyped_storage().data_ptr() for a in args[1:]}
        return sum(v for k, v in seen.items() if k not in params)

    hidden_bytes = 4 * 16 * 128 * 4
    assert stored_bytes(ref.gelu_mlp) - stored_bytes(gelu_mlp) == hidden_bytes


def test_backward_makes_no_zero_gradient_for_h():
    """h is the backward's input, not a result: autograd must not fill a (rows, H) tensor of zeros as its gradient
    (that would be a second hidden-sized buffer alive in the backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Zeros(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.zero_, torch.ops.aten.zeros_like,
                                       torch.ops.aten.new_zeros, torch.ops.aten.fill_):
                self.shapes.append(tuple(out.shape))
            return out

    args = _inputs((3, 7, 24), hidden=96)
    out = gelu_mlp(*args)
    with Zeros() as mode:
        out.backward(torch.ones_like(out))
    assert (3, 7, 96) not in mode.shapes and (21, 96) not in mode.shapes, mode.shapes
    want = torch.autograd.grad(ref.gelu_mlp(*args).sum(), args[0])[0]
    torch.testing.assert_close(args[0].grad, want, rtol=1e-6, atol=1e-6)


def test_partial_requires_grad_and_no_grad():
    x, w1, b1, w2, b2 = _inputs()
    x.requires_grad_(False)
    for w in (w1, b1):
        w.requires_grad_(False)
    out = gelu_mlp(x, w1, b1, w2, b2)
    out.sum().backward()
    torch.testing.assert_close(w2.grad, torch.autograd.grad(ref.gelu_mlp(x, w1, b1, w2, b2).sum(), w2)[0])
    assert w1.grad is None and x.grad is None
    with torch.no_grad():
        assert gelu_mlp(x, w1, b1, w2, b2).grad_fn is None


def test_bf16_autocast_grads_in_param_dtype():
    args = _inputs((2, 5, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref.gelu_mlp(*args)
        got = gelu_mlp(*args)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.float().sum().backward()
    assert all(a.grad.dtype == torch.float32 for a in args)


def test_bf16_autocast_matches_autocast_reference():
    """Under autocast the op runs on its inputs cast to bf16, as autocast's F.linear does: the same forward bits, and
    gradients close to autograd's of the autocast reference (same bf16 operands, its own order of operations)."""
    args = _inputs((2, 5, 24))
    grad_out = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(9)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, g_want = _grads(ref.gelu_mlp, args, grad_out)
        got, g_got = _grads(gelu_mlp, args, grad_out)
    assert torch.equal(got, want)
    for a, b in zip(g_got, g_want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    x, w1, b1, w2, b2 = _inputs((2, 3, 8), hidden=16, out=8, bias=bias)
    torch.library.opcheck(torch.ops.sslam_fast.gelu_mlp.default, (x, w1, b1, w2, b2, "reference"),
                          test_utils=OPCHECK_ALL)
    with torch.no_grad():
        out, h = torch.ops.sslam_fast.gelu_mlp(x, w1, b1, w2, b2, "reference")
    grad = torch.randn_like(out)
    for need in ([True, True, bias, True, bias], [False, False, False, True, False]):
        torch.library.opcheck(
            torch.ops.sslam_fast.gelu_mlp_backward.default,
            (grad, x.detach(), w1.detach(), w2.detach(), h, need, "reference"),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


def test_compile_fullgraph():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    args = _inputs((2, 3, 24))
    grad_out = torch.ones(2, 3, 24)
    want, g_want = _grads(ref.gelu_mlp, args, grad_out)
    torch._dynamo.reset()
    torch.compile(gelu_mlp, fullgraph=True, backend=record)(*args)
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.sslam_fast.gelu_mlp.default in targets  # opaque: one op, the backward keeps h only
    torch._dynamo.reset()
    got, g_got = _grads(torch.compile(gelu_mlp, backend="aot_eager", fullgraph=True), args, grad_out)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_argument():
    x, w1, b1, w2, b2 = _inputs()
    with pytest.raises(ValueError, match="gelu_mlp needs"):
        gelu_mlp(x[..., :5], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="b1 must have shape"):
        gelu_mlp(x, w1, b1[:3], w2, b2)
    with pytest.raises((TypeError, ValueError), match="x"):
        gelu_mlp(x.to(torch.int32), w1, b1, w2, b2)
    with pytest.raises((TypeError, ValueError), match="w2"):
        gelu_mlp(x, w1, b1, w2[0], b2)
    with pytest.raises(ValueError, match="gelu_mlp needs"):  # a direct call of the op checks its arguments too
        torch.ops.sslam_fast.gelu_mlp(x[..., :5], w1, b1, w2, b2, "reference")
    with pytest.raises(ValueError, match="not one of this op's backends"):
        torch.ops.sslam_fast.gelu_mlp(x, w1, b1, w2, b2, "cpp")
