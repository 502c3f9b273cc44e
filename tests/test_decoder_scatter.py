"""The decoder's input: decoder_scatter (ALGORITHM §3), every backend against the reference and upstream's noise.

Triton kernels run on CUDA when there is one, else on CPU under the interpreter (tests/conftest.py); the cpp backend
(ATen row copies) runs on CPU. tests/test_clone_gather.py feeds clone_gather's output to decoder_scatter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DEV, DTYPES, HAS_CUDA, OPCHECK_ALL, needs_triton, on_cpu_only

from sslam_fast import _backend
from sslam_fast.ops.decoder_scatter import decoder_scatter
from sslam_fast.reference import decoder_scatter as ref

CPP = pytest.param("cpp", marks=on_cpu_only)
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton), CPP]

# (R, N, k, D): R = 1, N prime / 512-like small variants, D a power of two and 48, k = N keeps every token.
SHAPES = [(1, 17, 5, 64), (6, 17, 9, 48), (3, 40, 9, 64), (3, 40, 9, 48), (6, 13, 13, 48), (18, 19, 4, 48)]
SHAPE_IDS = [f"R{r}-N{n}-k{k}-D{d}" for r, n, k, d in SHAPES]


def _masks(R: int, N: int, k: int, seed: int = 0, device=DEV):
    """Upstream's routing indices for rows with k visible tokens: (mask, ids_keep ascending, ids_restore)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(R, N)
    for r in range(R):
        mask[r, torch.randperm(N, generator=g)[:k]] = 0.0  # 0 = visible
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible first, ascending
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return mask.to(device), ids_shuffle[:, :k].contiguous().to(device), ids_restore.to(device)


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


# --- decoder_scatter --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_scatter_std0_exact(shape, dtype, backend, nan_empty):
    R, N, k, D = shape
    _, ids_keep, ids_restore = _masks(R, N, k, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(R, 1 + k, D, generator=g).to(DEV, dtype)
    grad = torch.randn(R, N, D, generator=g).to(DEV, dtype)
    out, dx = _run(lambda t: decoder_scatter(t, ids_restore, 0.0, backend=backend), (x,), grad)
    assert out.shape == (R, N, D) and out.dtype == dtype and dx.dtype == dtype
    want = torch.zeros(R, N, D, dtype=dtype, device=DEV)
    want_dx = torch.zeros_like(x)
    for r in range(R):
        want[r, ids_keep[r]] = x[r, 1:]  # visible tokens back at their positions, exact zeros elsewhere
        want_dx[r, 1:] = grad[r, ids_keep[r]]
    assert torch.equal(out, want) and torch.equal(dx, want_dx)
    ref_out, ref_dx = _run(lambda t: ref.decoder_scatter(t, ids_restore, t.new_zeros(R, N - k, D)), (x,), grad)
    assert torch.equal(out, ref_out) and torch.equal(dx, ref_dx)  # autograd of the reference agrees too


def test_backward_reference_matches_autograd():
    """The explicit backward of the reference equals autograd of its forward."""
    R, N, k, D = 6, 17, 5, 48
    _, _, ids_restore = _masks(R, N, k, seed=11)
    x = torch.randn(R, 1 + k, D, device=DEV, requires_grad=True)
    grad = torch.randn(R, N, D, device=DEV)
    (want,) = torch.autograd.grad(ref.decoder_scatter(x, ids_restore, x.new_zeros(R, N - k, D)), x, grad)
    assert torch.equal(ref.decoder_scatter_backward(grad, ids_restore, k), want)


@pytest.mark.parametrize("backend", ["reference", CPP])
def test_decoder_scatter_noise_is_upstreams(backend):
    R, N, k, D = 6, 17, 5, 48
    _, _, ids_restore = _masks(R, N, k, seed=5)
    x = torch.randn(R, 1 + k, D, device=DEV, requires_grad=True)
    out = decoder_scatter(x, ids_restore, 0.01, torch.Generator(DEV).manual_seed(7), backend=backend)
    noise = x.new_empty(R, N - k, D).normal_(0, 0.01, generator=torch.Generator(DEV).manual_seed(7))  # upstream
    want = torch.gather(torch.cat([x[:, 1:], noise], 1), 1, ids_restore.unsqueeze(-1).expand(R, N, D))
    assert torch.equal(out, want)
    grad = torch.randn(R, N, D, device=DEV)
    (dx,) = torch.autograd.grad(out, x, grad)
    (want_dx,) = torch.autograd.grad(want, x, grad)
    assert torch.equal(dx, want_dx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decoder_scatter_noise_distribution(backend, dtype):
    R, N, k, D = 8, 40, 9, 48  # 11,904 noise entries
    std = 0.01
    mask, _, ids_restore = _masks(R, N, k, seed=6)
    x = torch.randn(R, 1 + k, D, device=DEV).to(dtype)
    exact = decoder_scatter(x, ids_restore, 0.0, backend=backend)
    out = decoder_scatter(x, ids_restore, std, torch.Generator(DEV).manual_seed(1), backend=backend)
    assert out.dtype == dtype
    vis, masked = mask == 0, mask == 1
    assert torch.equal(out[vis], exact[vis])  # visible entries untouched
    z = out[masked].double() / std
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.std().item() - 1) < 0.05
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.03  # Gaussian, not uniform
    assert abs((z**4).mean().item() - 3) < 0.4  # kurtosis
    zz = out[masked].reshape(-1, D).double()  # one row per masked token
    assert zz.unique(dim=0).shape[0] == zz.shape[0]  # no two tokens share a noise vector (counter aliasing)
    if dtype == torch.float32:  # 16-bit rounding makes repeated values common; fp32 values of N(0, 1) are distinct
        assert z.unique().numel() > 0.99 * n
    # Adjacent channels of one token (one Philox counter feeds 4 of them): independent.
    assert abs(torch.corrcoef(torch.stack([zz[:, :-1].flatten(), zz[:, 1:].flatten()]))[0, 1].item()) < 0.05
    # A generator reproduces the draw; a different seed (or the default generator) gives another one.
    again = decoder_scatter(x, ids_restore, std, torch.Generator(DEV).manual_seed(1), backend=backend)
    other = decoder_scatter(x, ids_restore, std, torch.Generator(DEV).manual_seed(2), backend=backend)
    assert torch.equal(out, again) and not torch.equal(out[masked], other[masked])
    assert not torch.equal(decoder_scatter(x, ids_restore, std, backend=backend)[masked], out[masked])


# --- bad input --------------------------------------------------------------------------------------------------------


def test_decoder_scatter_bad_input():
    R, N, k, D = 6, 17, 5, 48
    _, _, ids = _masks(R, N, k, seed=10, device="cpu")
    x = torch.randn(R, 1 + k, D)
    decoder_scatter(x, ids, 0.01)  # valid
    dup = ids.clone()
    dup[0, 0] = dup[0, 1]
    cases = [
        (ValueError, "ids_restore must lie", {"ids_restore": torch.where(ids == 0, N, ids)}),
        (ValueError, "ids_restore must lie", {"ids_restore": ids - 1}),
        (ValueError, "permutations", {"ids_restore": dup}),
        (ValueError, "x must have 3", {"x": x[0]}),
        (ValueError, "ids_restore must have 2", {"ids_restore": ids[0]}),
        (ValueError, "one row per row", {"ids_restore": ids[:-1]}),
        (ValueError, "N >= k", {"x": torch.randn(R, N + 2, D)}),
        (ValueError, "CLS", {"x": torch.randn(R, 0, D)}),
        (TypeError, "ids_restore must have dtype", {"ids_restore": ids.int()}),
        (TypeError, "x must have dtype", {"x": x.long()}),
        (ValueError, "ids_restore is on meta", {"ids_restore": ids.to("meta")}),
        (ValueError, "mask_noise_std", {"mask_noise_std": -0.01}),
        (ValueError, "mask_noise_std", {"mask_noise_std": float("nan")}),
        (TypeError, "mask_noise_std", {"mask_noise_std": None}),
        (TypeError, "generator", {"generator": 1234}),
        (ValueError, "backend", {"backend": "Triton"}),
    ]
    if HAS_CUDA:
        cases.append((ValueError, "generator must be a cpu torch.Generator", {"generator": torch.Generator("cuda")}))
    base = {"x": x, "ids_restore": ids, "mask_noise_std": 0.01}
    for exc, match, change in cases:
        with pytest.raises(exc, match=match):
            decoder_scatter(**{**base, **change})


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_checks_keep(backend):
    """The backward op can be called directly: keep, which sizes its result, is checked against ids_restore."""
    R, N, k, D = 4, 10, 4, 8
    _, _, ids_restore = _masks(R, N, k, seed=12)
    grad = torch.randn(R, N, D, device=DEV)
    for keep in (-1, N + 1):
        with pytest.raises(ValueError, match="keep must lie"):
            torch.ops.sslam_fast.decoder_scatter_backward(grad, ids_restore, keep, backend)


@on_cpu_only
@pytest.mark.parametrize("R,N,k,D", [(6, 17, 5, 48), (4, 40, 9, 64), (3, 13, 13, 16), (2, 11, 0, 8)])
def test_cpp_backward_reads_only_the_kept_rows(R, N, k, D):
    """The cpp backward gathers the k kept tokens' gradient rows, never a permuted copy of all N rows: no tensor it
    makes holds N * D values per row, and the result is bit for bit the reference's (CLS row zero)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, _, ids_restore = _masks(R, N, k, seed=R + k)
    grad = torch.randn(R, N, D)
    made = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,))
                        if isinstance(t, torch.Tensor) and t.is_floating_point()
                        and t.untyped_storage().data_ptr() != grad.untyped_storage().data_ptr())  # views of grad
            return out

    with Sizes():
        dx = _backend.kernel("decoder_scatter_backward", "cpp")(grad, ids_restore, k)
    assert torch.equal(dx, ref.decoder_scatter_backward(grad, ids_restore, k))
    assert dx.shape == (R, 1 + k, D) and dx.is_contiguous() and not dx[:, 0].any()
    assert made and max(made) == R * (1 + k) * D, made  # the result is the largest buffer: R N D > R (1 + k) D


@on_cpu_only
def test_auto_on_cpu(monkeypatch):
    monkeypatch.delenv("SSLAM_FAST_BACKEND", raising=False)
    assert _backend.base_name(_backend.resolve("decoder_scatter", "auto", "cpu")) == "cpp"


# --- custom-op plumbing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    R, N, k, D = 6, 13, 4, 16
    _, _, ids_restore = _masks(R, N, k, seed=2)
    xe = torch.randn(R, 1 + k, D, device=DEV, requires_grad=True)
    # the mask tokens as the public function hands them over: drawn noise for the ATen backends, a seed for triton
    noise = torch.randn(R, N - k, D, device=DEV) * 0.01 if backend in ("reference", "cpp") else None
    seed = torch.tensor([12345], device=DEV) if backend == "triton" else None
    ops = torch.ops.sslam_fast
    for args in [(xe, ids_restore, None, None, 0.0, backend), (xe, ids_restore, noise, seed, 0.01, backend)]:
        torch.library.opcheck(ops.decoder_scatter.default, args, test_utils=OPCHECK_ALL)
    gd = torch.randn(R, N, D, device=DEV)
    torch.library.opcheck(ops.decoder_scatter_backward.default, (gd, ids_restore, k, backend), test_utils=OPCHECK_ALL)


# --- sm_90 code generation without a GPU ----------------------------------------------------------------------------

_SM90_SCRIPT = textwrap.dedent(
    """
    import os, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sslam_fast.kernels import decoder_scatter as kr

    D = 768
    bd, bt = kr._blocks(D)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    def i(*names):
        return {n: "i32" for n in names}
    def c(**kw):
        return {n: "constexpr" for n in kw}
    cases = [
        (kr._decoder_scatter_fwd_kernel, dict(x_ptr="*fp16", ids_ptr="*i64", seed_ptr="*i64", out_ptr="*fp16",
         **i("N", "KEEP", "D", "D4"), std="fp32"), dict(HAS_NOISE=True, BLOCK_T=bt, BLOCK_D=bd)),
        (kr._decoder_scatter_bwd_kernel, dict(grad_ptr="*fp16", ids_ptr="*i64", dx_ptr="*fp16",
         **i("N", "KEEP", "D")), dict(BLOCK_T=bt, BLOCK_D=bd)),
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
    R, N, k, D = 96, 512, 102, 768
    mask, _, ids_restore = _masks(R, N, k, seed=1)
    enc = torch.randn(R, 1 + k, D, device="cuda").to(dtype)
    gd = torch.randn(R, N, D, device="cuda").to(dtype)
    out, dx = _run(lambda t: decoder_scatter(t, ids_restore, 0.0), (enc,), gd)  # auto -> triton
    ref_out, ref_dx = _run(lambda t: decoder_scatter(t, ids_restore, 0.0, backend="reference"), (enc,), gd)
    assert torch.equal(out, ref_out) and torch.equal(dx, ref_dx)
    noisy = decoder_scatter(enc, ids_restore, 0.01)
    z = noisy[mask == 1].double() / 0.01
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert torch.equal(noisy[mask == 0], out[mask == 0])
    assert _backend.base_name(_backend.resolve("decoder_scatter", "auto", "cuda")) == "triton"
