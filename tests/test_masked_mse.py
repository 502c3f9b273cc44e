"""Masked patch loss (ALGORITHM §4, §5.4): masked_mse, forward and gradients of every backend against the reference.

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py). The C++ kernel
(csrc/masked_mse.cpp) runs on CPU tensors: the shared tests give it CPU tensors even when there is a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEV, DTYPES, HAS_CUDA, needs_cpp, needs_triton

from sslam_fast import _backend
from sslam_fast.ops.masked_mse import masked_mse

needs_kernels = needs_cpp("masked_mse", "masked_mse_backward")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_kernels), pytest.param("triton", marks=needs_triton)]


def _dev(backend):
    return "cpu" if backend == "cpp" else DEV


def _inputs(R, N, D, clones, pdtype=torch.float32, tdtype=torch.float32, p_mask=0.8, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(R, N, D, generator=g).to(device, pdtype).requires_grad_()
    target = torch.randn(R // clones, N, D, generator=g).to(device, tdtype).requires_grad_()
    mask = (torch.rand(R, N, generator=g) < p_mask).to(device)
    return pred, target, mask


def _upstream(pred, target, mask, clones):
    """EAT: repeat-interleave the target, gather masked tokens, d2v_loss (mse * 1/sqrt(D)), criterion sum."""
    y = target.repeat_interleave(clones, 0)[mask]
    x = pred[mask]
    x = x.view(-1, x.size(-1)).float()
    loss = F.mse_loss(x, y.view(-1, x.size(-1)).float(), reduction="none") * (1 / math.sqrt(x.size(-1)))
    return loss.sum()


def _oracle64(pred, target, mask, clones):
    """The same sum in float64 (differentiable in pred)."""
    diff = pred.double() - target.double().repeat_interleave(clones, 0)
    return (diff.square().sum(-1) * mask).sum() / math.sqrt(pred.shape[-1])


# (R, N, D, clones): R = 1, primes, clones 1 and > 1, D below and above one channel block.
CASES = [(6, 17, 48, 1), (6, 17, 48, 3), (1, 1, 1, 1), (5, 13, 7, 5), (4, 31, 300, 2), (8, 40, 64, 8)]


def _case_id(c):
    return "R{}-N{}-D{}-K{}".format(*c)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_forward_and_grads(backend, case):
    R, N, D, K = case
    pred, target, mask = _inputs(R, N, D, K, device=_dev(backend))
    mask[0, 0] = True  # at least one masked token
    loss = masked_mse(pred, target, mask, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    gp, gt = torch.autograd.grad(loss * 0.75, (pred, target))  # a non-unit upstream gradient
    want = _upstream(pred, target, mask, K)
    wp, wt = torch.autograd.grad(want * 0.75, (pred, target))
    torch.testing.assert_close(loss, want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(gp, wp, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gt, wt, rtol=1e-6, atol=1e-6)
    assert bool((gp[~mask] == 0).all())  # unmasked tokens get no gradient
    assert masked_mse(pred, target, mask, clones=K, backend=backend).item() == loss.item()


@pytest.mark.parametrize("pdtype", ["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_pred(backend, pdtype):
    if backend == "triton" and pdtype == "bf16" and not HAS_CUDA:
        pytest.skip("bf16 rounding of the gradient is wrong in the Triton interpreter")
    # the realistic mix: low-precision decoder output, fp32 teacher target
    pred, target, mask = _inputs(6, 23, 40, 2, pdtype=DTYPES[pdtype], device=_dev(backend))
    target.requires_grad_(False)
    loss = masked_mse(pred, target, mask, backend=backend)
    (gp,) = torch.autograd.grad(loss, (pred,))
    # inputs are upcast exactly, so the loss is as accurate as in fp32 (here against fp64)
    p64 = pred.detach().double().requires_grad_()
    want64 = _oracle64(p64, target, mask, 2)
    torch.testing.assert_close(loss.double(), want64, rtol=2e-6, atol=1e-6)
    # the gradient is computed in fp32 and rounded once: within half an ulp of pred's dtype of the fp64 gradient
    (w64,) = torch.autograd.grad(want64, (p64,))
    assert gp.dtype == pred.dtype
    ulp = 2.0**-10 if pdtype == "fp16" else 2.0**-7
    err = (gp.double() - w64).abs()
    assert bool((err <= 0.5 * ulp * w64.abs() * (1 + 1e-5) + 1e-8).all()), err.max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_extremes_and_nan(backend):
    dev = _dev(backend)
    pred, target, _ = _inputs(4, 9, 16, 2, device=dev)
    none = torch.zeros(4, 9, dtype=torch.bool, device=dev)
    loss = masked_mse(pred, target, none, backend=backend)
    assert loss.item() == 0.0
    gp, gt = torch.autograd.grad(loss, (pred, target))
    assert not gp.any() and not gt.any()
    full = torch.ones(4, 9, dtype=torch.bool, device=dev)
    want = ((pred.detach() - target.detach().repeat_interleave(2, 0)) ** 2).sum() / 4.0
    torch.testing.assert_close(masked_mse(pred, target, full, backend=backend), want, rtol=2e-6, atol=0)
    # a NaN at an unmasked token is never read; at a masked token it reaches the loss (for the fp16 loss scaler)
    mask = torch.rand(4, 9, device=dev) < 0.5
    mask[1, 2], mask[3, 4] = False, True
    p = pred.detach().clone()
    p[1, 2, 5] = float("nan")
    clean = masked_mse(p, target, mask, backend=backend)
    assert torch.isfinite(clean)
    p.requires_grad_()
    (g,) = torch.autograd.grad(masked_mse(p, target.detach(), mask, backend=backend), (p,))
    assert bool(torch.isfinite(g).all())
    p2 = p.detach().clone()
    p2[3, 4, 0] = float("nan")
    assert torch.isnan(masked_mse(p2, target, mask, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # the mixed half of the decoder output is a row slice; a non-unit channel stride is copied first
    pred, target, mask = _inputs(8, 11, 20, 2, device=_dev(backend))
    half = pred[4:]
    want = _upstream(half, target[2:], mask[4:], 2)
    torch.testing.assert_close(masked_mse(half, target[2:], mask[4:], backend=backend), want, rtol=2e-6, atol=0)
    tr = pred.detach().transpose(1, 2).contiguous().transpose(1, 2)
    m_t = mask.t().contiguous().t()  # strided mask
    assert not m_t.is_contiguous()
    torch.testing.assert_close(
        masked_mse(tr, target, m_t, backend=backend), _upstream(pred, target, mask, 2), rtol=2e-6, atol=0
    )


@needs_triton
def test_triton_deterministic_and_close_to_reference():
    pred, target, mask = _inputs(6, 37, 96, 3, seed=5)
    a = masked_mse(pred, target, mask, backend="triton")
    assert torch.equal(a, masked_mse(pred, target, mask, backend="triton"))
    torch.testing.assert_close(a, masked_mse(pred, target, mask, backend="reference"), rtol=1e-6, atol=0)


def test_bad_input():
    pred, target, mask = _inputs(6, 5, 8, 2, device="cpu")
    with pytest.raises(ValueError, match="pred"):
        masked_mse(pred[0], target, mask)
    with pytest.raises(TypeError, match="pred"):
        masked_mse(pred.double(), target, mask)
    with pytest.raises(TypeError, match="target"):
        masked_mse(pred, target.long(), mask)
    with pytest.raises(ValueError, match="target"):
        masked_mse(pred, target[:, :4], mask)
    with pytest.raises(ValueError, match="target"):
        masked_mse(pred, target[:2].repeat(2, 1, 1)[:4], mask)  # 4 rows do not divide 6
    with pytest.raises(TypeError, match="mask"):
        masked_mse(pred, target, mask.float())
    with pytest.raises(ValueError, match="mask"):
        masked_mse(pred, target, mask[:, :4])
    with pytest.raises(ValueError, match="mask"):
        masked_mse(pred, target, mask[None])
    with pytest.raises(ValueError, match="clones"):
        masked_mse(pred, target, mask, clones=3)
    with pytest.raises(ValueError, match="clones"):
        masked_mse(pred, target, mask, clones=0)
    with pytest.raises(ValueError, match="target"):
        masked_mse(pred, target.to("meta"), mask)
    with pytest.raises(ValueError, match="backend"):
        masked_mse(pred, target, mask, backend="x")
    with pytest.raises(RuntimeError, match="cuda"):  # no CUDA-C++ kernel for this op, on any device
        masked_mse(pred, target, mask, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_channels_is_refused(backend):
    """D = 0 returned NaN (a sum of nothing divided by sqrt(0)): refused, by the public op and by the custom op."""
    dev = _dev(backend)
    pred, target, mask = (t.detach() for t in _inputs(4, 5, 0, 2, device=dev))
    with pytest.raises(ValueError, match="D > 0"):
        masked_mse(pred, target, mask, backend=backend)
    with pytest.raises(ValueError, match="D > 0"):
        torch.ops.sslam_fast.masked_mse(pred, target, mask, 2, backend)
    with pytest.raises(ValueError, match="D > 0"):
        torch.ops.sslam_fast.masked_mse_backward(torch.tensor(1.0, device=dev), pred, target, mask, 2, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_checks_clones(backend):
    """The custom op is callable directly: clones is checked against the shapes before the reference's
    repeat_interleave(clones) allocates from it."""
    dev = _dev(backend)
    pred, target, mask = (t.detach() for t in _inputs(6, 5, 8, 2, device=dev))
    for clones in (0, -1, 3, 2**40, 2**63 - 1):
        with pytest.raises(ValueError, match="clones"):
            torch.ops.sslam_fast.masked_mse(pred, target, mask, clones, backend)


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = _dev(backend)
    pred, target, mask = _inputs(6, 9, 12, 3, pdtype=torch.float32, device=dev)
    torch.library.opcheck(torch.ops.sslam_fast.masked_mse.default, (pred, target, mask, 3, backend))
    torch.library.opcheck(
        torch.ops.sslam_fast.masked_mse_backward.default,
        (torch.tensor(1.5, device=dev), pred.detach(), target.detach(), mask, 3, backend),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


# --- the C++ CPU kernel ----------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("tdtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("pdtype", ["fp32", "fp16", "bf16"])
def test_cpp_matches_reference_all_dtypes(pdtype, tdtype):
    # 16 x 64 x 107 elements: two parallel chunks; D = 107 = 6 * 16 + 8 + 3 takes every step of the channel loop
    pred, target, mask = _inputs(16, 64, 107, 4, pdtype=DTYPES[pdtype], tdtype=DTYPES[tdtype], seed=3, device="cpu")
    loss = masked_mse(pred, target, mask, backend="cpp")
    gp, gt = torch.autograd.grad(loss * 0.5, (pred, target))
    want = masked_mse(pred, target, mask, backend="reference")
    wp, wt = torch.autograd.grad(want * 0.5, (pred, target))
    torch.testing.assert_close(loss, want, rtol=2e-6, atol=0)
    assert gp.dtype == pred.dtype and gt.dtype == target.dtype
    assert torch.equal(gp, wp)  # the same float32 operations, rounded once
    torch.testing.assert_close(gt, wt, rtol=0, atol=0)


@needs_kernels
def test_cpp_same_bits_for_any_thread_count():
    pred, target, mask = _inputs(16, 64, 96, 4, seed=4, device="cpu")  # two parallel chunks with two threads
    pred, target = pred.detach(), target.detach()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.sslam_fast_C.masked_mse(pred, target, mask, 4)
        torch.set_num_threads(2)
        two = torch.ops.sslam_fast_C.masked_mse(pred, target, mask, 4)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    torch.testing.assert_close(one.double(), _oracle64(pred, target, mask, 4), rtol=1e-6, atol=0)


@needs_kernels
def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.base_name(_backend.resolve("masked_mse", "auto", "cpu")) == "cpp"
    assert _backend.base_name(_backend.resolve("masked_mse_backward", "auto", "cpu")) == "cpp"
    calls = []
    for name in ("masked_mse", "masked_mse_backward"):
        fn = _backend.kernel(name, "cpp")
        counted = lambda *a, fn=fn, n=name: calls.append(n) or fn(*a)  # noqa: E731
        monkeypatch.setitem(_backend._REGISTRY[name].kernels, "cpp", counted)
    pred, target, mask = _inputs(4, 9, 16, 2, device="cpu")
    masked_mse(pred, target, mask).backward()
    assert calls == ["masked_mse", "masked_mse_backward"]


@needs_kernels
def test_cpp_ops_opcheck():
    pred, target, mask = _inputs(6, 9, 12, 3, device="cpu")
    pred, target = pred.detach(), target.detach()
    torch.library.opcheck(torch.ops.sslam_fast_C.masked_mse.default, (pred, target, mask, 3))
    torch.library.opcheck(
        torch.ops.sslam_fast_C.masked_mse_backward.default, (torch.tensor(1.5), pred, target, mask, 3)
    )


@needs_kernels
def test_cpp_ops_refuse_a_wrapping_clone_count_and_no_channels():
    """target rows x clones overflowed int64 in the shape check: 4 x (2**62 + 1) wraps to 4 and passed for 4 rows of
    pred. D = 0 gave NaN (0 / sqrt(0))."""
    pred, target, mask = (t.detach() for t in _inputs(4, 5, 8, 1, device="cpu"))
    for f in (torch.ops.sslam_fast_C.masked_mse,
              lambda *a: torch.ops.sslam_fast_C.masked_mse_backward(torch.tensor(1.0), *a)):
        for clones in (2**62 + 1, 2**63 - 1):
            with pytest.raises(RuntimeError, match="clones must lie in"):
                f(pred, target, mask, clones)
        with pytest.raises(RuntimeError, match="at least one channel"):
            f(pred[..., :0], target[..., :0], mask, 1)


@needs_kernels
def test_cpp_ops_bad_input():
    pred, target, mask = _inputs(6, 5, 8, 2, device="cpu")
    pred, target = pred.detach(), target.detach()
    f = torch.ops.sslam_fast_C.masked_mse
    with pytest.raises(RuntimeError, match="target must have shape"):
        f(pred, target, mask, 3)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        f(pred, target, mask[:, :4], 2)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        f(pred, target, mask.float(), 2)
    with pytest.raises(RuntimeError, match="pred must be float32, float16 or bfloat16"):
        f(pred.double(), target, mask, 2)
    with pytest.raises(RuntimeError, match="grad must be a CPU scalar"):
        torch.ops.sslam_fast_C.masked_mse_backward(torch.ones(2), pred, target, mask, 2)


# --- compiled (non-interpreted) Triton -----------------------------------------------------------------------------
# The interpreter runs kernels as numpy code; it cannot catch what only the compiler sees (types of loop-carried
# values, ints specialised to constexpr 1, bf16 lowering). Without a GPU, compile the kernels for sm_90 (H100) to a
# cubin in a subprocess where TRITON_INTERPRET is unset.

from sm90_compile import compiles_for_sm90 as _compiles_for_sm90  # noqa: E402


@pytest.mark.skipif(HAS_CUDA or not _backend.triton_importable(), reason="the CUDA tests run the kernels themselves")
def test_kernels_compile_for_sm90():
    args = {n: "i32" for n in ["N", "D", "clones", "p_sr", "p_sn", "t_sr", "t_sn", "m_sr", "m_sn", "n_nblk"]}
    fwd = dict(pred_ptr="*bf16", target_ptr="*fp32", mask_ptr="*u8", part_ptr="*fp32", **args, scale="fp32")
    bwd = dict(grad_ptr="*fp32", pred_ptr="*bf16", target_ptr="*fp32", mask_ptr="*u8", gp_ptr="*bf16", **args)
    bwd.update(n_dblk="i32", scale2="fp32")
    blocks = {"BLOCK_N": 16, "BLOCK_D": 128}
    specs = [
        ("_masked_mse_fwd_kernel", fwd, blocks, 4),
        ("_masked_mse_fwd_kernel", fwd, dict(blocks, clones=1), 4),  # clones == 1 is specialised to a constexpr
        ("_masked_mse_bwd_kernel", bwd, {"BLOCK_N": 16, "BLOCK_D": 256}, 4),
    ]
    _compiles_for_sm90("masked_mse", specs)


# --- CUDA -------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("pdtype", ["bf16", "fp16", "fp32"])
def test_cuda_sslam_shapes(pdtype):
    # 192 decoder rows x 512 tokens x 768, target per clip (24 rows, K = 8 clones), 410 masked tokens per row.
    R, N, D, K = 192, 512, 768, 8
    pred, target, _ = _inputs(R, N, D, K, pdtype=DTYPES[pdtype], device="cuda")
    mask = torch.zeros(R, N, dtype=torch.bool, device="cuda")
    mask.scatter_(1, torch.rand(R, N, device="cuda").argsort(1)[:, :410], True)
    loss = masked_mse(pred, target, mask)  # auto -> triton
    gp, gt = torch.autograd.grad(loss, (pred, target))
    want = masked_mse(pred, target, mask, backend="reference")
    wp, wt = torch.autograd.grad(want, (pred, target))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(gp, wp)
    torch.testing.assert_close(gt, wt, rtol=1e-4, atol=1e-6)
    assert torch.equal(masked_mse(pred, target, mask), loss)  # deterministic
    assert _backend.base_name(_backend.resolve("masked_mse", "auto", "cuda")) == "triton"
