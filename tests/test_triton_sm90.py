"""Every Triton kernel of kernels/*.py compiled for sm_90 (H100) exactly as its launcher launches it, without a GPU.

The interpreter (how the other tests run the kernels on CPU) never runs Triton's GPU code generation, so it cannot see
a kernel that fails to compile for the real target or spills registers there. Hand-written signatures (``sm90_compile
.compiles_for_sm90``) drift from the launchers: an int that happens to equal 1 becomes a constexpr, a pointer or int
divisible by 16 gets a divisibility hint, a launcher changes num_warps or passes a new argument. Here nothing is
written by hand:

1. ``scenarios()`` calls the public ops (``sslam_fast.ops``, backend="triton") on CPU inputs shaped like SSLAM's,
   in a subprocess under the interpreter, with the launch entry point replaced by a recorder (``sm90_compile.capture``).
   Each launch is specialised by Triton's own JIT binder for an sm_90 target: signature, constexprs, divisibility
   attributes and launch options, as ``JITFunction.run`` would compute them on the GPU. The kernels are not run.
2. Identical specialisations are compiled once, for sm_90, in subprocesses without the interpreter; ptxas's report of
   the cubin Triton built (``ptxas -v``, Triton's own flags) gives the spills.
3. ``test_sm90_compile[module.kernel-scenario]`` fails with the compiler's message when a launch does not compile, and
   when ptxas reports spills beyond the ``# sm_90 spills: N bytes (reason)`` comment above that kernel (0 without one).

Scenario sizes: SSLAM stage 2 on one GPU is B = 12 clips (24 after the concat of the mix), K = 8 clones (R = 96 or 192
student rows), 64 x 8 = 512 patch tokens of which 102 are kept (student L = 103), teacher L = 513 and 273 (the two
unmixed windows dropped: 272 tokens), D = 768 (12 heads of 64), decoder (R, 768, 64, 8) channels-last, 10 s clips at
16 kHz (160000 samples, fbank 400 / 160 / 512 with 128 mel bins, 1024 frames). Every size that reaches a kernel as an
int is real, except the batch: R = 16 rows (a multiple of 16 like 96 and 192) and B = 2 clips (neither 1 nor a
multiple of 16, like 12 and 24), which give the same specialisations; the batch is otherwise only a grid dimension.
Dtypes: fp32 and bf16 (the trainer's precisions; fp16 only for the fbank output, which the ops accept). Not covered:
the launchers' test-only paths that no op reaches (``inverse_block_mask_triton(keep=-1)``, attention's block
overrides).

Cost: the capture runs once per session when this module is collected (~5 s); the ~50 compiles take 20-45 s on two
cores (no kernel cache: each report is that of a fresh compile).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

import sm90_compile as sm90  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

# --- launch configurations that depend on the device ------------------------------------------------------------------
# The capture runs on CPU tensors, so a launcher that picks its configuration by device type would be recorded with
# its interpreter configuration. Each module whose launcher code looks at the device is listed here with the number of
# device-dependent expressions it holds (``_device_fingerprint``) and how the capture gets the CUDA configuration; a
# new or changed device test fails ``test_device_dependent_launch_config_is_reviewed`` until it is reviewed here.
DEVICE_DEPENDENT = {
    "attention": (3, "tile_config(device_type, ...) picks the tiles: the capture calls it with 'cuda'"),
    "inverse_block_mask": (2, "rows_per_program defaults to 1 on CUDA, 64 under the interpreter: the capture passes 1"),
    "kaldi_fbank": (8, "validation (CPU tensors need the interpreter), the torch.cuda.device context, and "
                       "_bf16_by_hand (integer bf16 rounding only under the interpreter): the capture makes it answer "
                       "False"),
}


def capture_setup():
    """Make the launchers that choose their configuration by device type choose the CUDA one (see DEVICE_DEPENDENT)."""
    import sslam_fast.kernels.attention as ka
    import sslam_fast.kernels.inverse_block_mask as km
    import sslam_fast.kernels.kaldi_fbank as kf

    kf._bf16_by_hand = lambda device_type: False
    # The launches are recorded, not run: the ops' outputs stay uninitialised, so the value checks that read an
    # output (eat_features' and mix_waveforms' finiteness) would judge garbage. Only the launches matter here.
    import os

    os.environ["SSLAM_FAST_CHECK"] = "0"

    tile_config = ka.tile_config
    ka.tile_config = lambda device_type, *args, **kwargs: tile_config("cuda", *args, **kwargs)
    mask_launcher = km.inverse_block_mask_triton

    def masks_on_cuda(*args, rows_per_program=None, **kwargs):
        return mask_launcher(*args, rows_per_program=1 if rows_per_program is None else rows_per_program, **kwargs)

    km.inverse_block_mask_triton = masks_on_cuda


# --- scenarios (run in the capture subprocess) ------------------------------------------------------------------------

R, B, K, N, KEEP, D, HEADS = 16, 2, 8, 512, 102, 768, 12  # rows, clips, clones, tokens, kept tokens, width, heads
SAMPLES = 160000  # 10 s at 16 kHz


def _ids(rows, n, keep, g):
    """(ids_keep (rows, keep) ascending, ids_restore (rows, n)): random masks as mask_indices builds them."""
    import torch

    order = torch.stack([torch.randperm(n, generator=g) for _ in range(rows)])
    kept = order[:, :keep].sort(dim=1).values
    masked = order[:, keep:].sort(dim=1).values
    full = torch.cat([kept, masked], dim=1)
    restore = torch.empty_like(full).scatter_(1, full, torch.arange(n).expand(rows, n))
    return kept, restore


def scenarios():
    """(name, callable) pairs; each calls public ops with backend="triton" (and their backward where they have one)."""
    import torch

    from sslam_fast import ops
    from sslam_fast.models.objectives import kept_token_index

    g = torch.Generator().manual_seed(0)
    bf16, fp32 = torch.bfloat16, torch.float32
    tri = {"backend": "triton"}

    def randn(*shape, dtype=fp32, grad=False):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    def backward(out):
        out.backward(torch.randn(out.shape, generator=g).to(out.dtype))

    def fbank(n, lengths, dtype):
        ops.eat_features(0.1 * randn(len(lengths), n), torch.tensor(lengths), dtype=dtype, **tri)

    def attention(rows, length, dtype, grad):
        qkv = randn(rows, length, 3, HEADS, D // HEADS, dtype=dtype, grad=grad)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # upstream's views of the fused qkv projection
        out = ops.attention(q, k, v, **tri)
        if grad:
            backward(out)

    def clone_gather(dtype):
        ids_keep, _ = _ids(R, N, KEEP, g)
        x, cls, w, b = (
            randn(B, N, D, dtype=dtype, grad=True),
            randn(1, 1, D, grad=True),
            randn(D, grad=True),
            randn(D, grad=True),
        )
        backward(ops.clone_gather(x, ids_keep, K, cls, w, b, 1e-6, **tri))

    def decoder_scatter(dtype, std):
        _, ids_restore = _ids(R, N, KEEP, g)
        backward(ops.decoder_scatter(randn(R, 1 + KEEP, D, dtype=dtype, grad=True), ids_restore, std, g, **tri))

    def ln_gelu_residual(dtype, channels_last):
        def feature_map():
            if channels_last:  # the decoder's (R, N, D) tokens viewed as (R, D, 64, 8): channels-last, no copy
                return randn(R, N, D, dtype=dtype).transpose(1, 2).reshape(R, D, 64, 8).requires_grad_(True)
            return randn(R, D, 64, 8, dtype=dtype, grad=True)

        backward(ops.ln_gelu_residual(feature_map(), feature_map(), **tri))

    def masked_mse(dtype, mix_rows):
        pred = randn(2 * R if mix_rows else R, N, D, dtype=dtype, grad=True)
        rows = pred[R:] if mix_rows else pred  # SSLAM's mix loss: the second half of the concat batch
        mask = torch.rand(R, N, generator=g) < 0.8
        ops.masked_mse(rows, randn(B, N, D), mask, clones=K, **tri).backward()

    def layer_targets(dtype, top_k, tokens, index):
        ys = randn(12, B, tokens, D, dtype=dtype)  # the stacked FFN outputs of the 12 teacher blocks
        token_index = kept_token_index(64, 8, torch.tensor([2, 30]), 15) if index else None
        ops.layer_targets(ys, top_k, token_index, **tri)

    def partial_max_mix(dtype, concat):
        spec = randn(12, 1, 1024, 128, dtype=dtype)
        ops.partial_max_mix(spec, (32, 512), window_frames=240, concat=concat, **tri)

    def mix_waveforms(n, per_row):
        a, b = randn(B, n), randn(B, n)
        ops.mix_waveforms(a, b, randn(B) if per_row else 5.0, **tri)

    return [
        # fbank: the trainer's eat_features (clips padded to 10 s, fp32 out), a batch of any other length (N, the
        # row stride, not a multiple of 16: extraction / prediction), bf16 and fp16 outputs, and kaldi_fbank's plain
        # log-mel (shift 0, scale 1).
        ("eat_features-fp32", lambda: fbank(SAMPLES, [SAMPLES, 123457], fp32)),
        ("eat_features-fp32-ragged", lambda: fbank(SAMPLES - 1269, [SAMPLES - 1269, 99999], fp32)),
        ("eat_features-bf16", lambda: fbank(SAMPLES, [SAMPLES, 123457], bf16)),
        ("eat_features-fp16", lambda: fbank(SAMPLES, [SAMPLES, 123457], torch.float16)),
        ("kaldi_fbank", lambda: ops.kaldi_fbank(0.1 * randn(B, 16000), torch.tensor([16000, 12345]), **tri)),
        # attention: the student (L = 103, forward and backward), teachers A (513) and B (273) forward only.
        ("attention-student-bf16", lambda: attention(R, 1 + KEEP, bf16, True)),
        ("attention-student-fp32", lambda: attention(R, 1 + KEEP, fp32, True)),
        ("attention-teacher-bf16", lambda: attention(B, 1 + N, bf16, False)),
        ("attention-teacher_b-bf16", lambda: attention(B, 1 + 272, bf16, False)),
        ("clone_gather-bf16", lambda: clone_gather(bf16)),
        ("clone_gather-fp32", lambda: clone_gather(fp32)),
        ("decoder_scatter-noise-bf16", lambda: decoder_scatter(bf16, 0.01)),
        ("decoder_scatter-noise-fp32", lambda: decoder_scatter(fp32, 0.01)),
        ("decoder_scatter-std0-bf16", lambda: decoder_scatter(bf16, 0.0)),
        ("ln_gelu_residual-channels_last-bf16", lambda: ln_gelu_residual(bf16, True)),
        ("ln_gelu_residual-channels_last-fp32", lambda: ln_gelu_residual(fp32, True)),
        ("ln_gelu_residual-channels_first-bf16", lambda: ln_gelu_residual(bf16, False)),
        ("masked_mse-bf16", lambda: masked_mse(bf16, False)),
        ("masked_mse-fp32", lambda: masked_mse(fp32, False)),
        ("masked_mse-mix_rows-bf16", lambda: masked_mse(bf16, True)),
        # layer_targets: the frame targets (top 12), SSLAM's CLS target (top 1: K == 1 is a constexpr), teacher B's
        # 272 kept tokens, and a token_index (the kernel's gather path).
        ("layer_targets-top12-bf16", lambda: layer_targets(bf16, 12, N, False)),
        ("layer_targets-top12-fp32", lambda: layer_targets(fp32, 12, N, False)),
        ("layer_targets-top1-bf16", lambda: layer_targets(bf16, 1, N, False)),
        ("layer_targets-teacher_b-bf16", lambda: layer_targets(bf16, 12, 272, False)),
        ("layer_targets-token_index-bf16", lambda: layer_targets(bf16, 12, N, True)),
        ("inverse_block_mask-64x8", lambda: ops.inverse_block_mask(12, K, grid=(64, 8), **tri)),
        ("partial_max_mix-concat-fp32", lambda: partial_max_mix(fp32, True)),
        ("partial_max_mix-bf16", lambda: partial_max_mix(bf16, False)),
        ("mix_waveforms-snr_rows", lambda: mix_waveforms(SAMPLES, True)),
        ("mix_waveforms-snr_scalar-ragged", lambda: mix_waveforms(SAMPLES - 1269, False)),
    ]


# --- collection: capture once, parametrise over the distinct launches -------------------------------------------------

_CAPTURED = None


def _captured() -> dict:
    global _CAPTURED
    if _CAPTURED is None:
        captured = sm90.capture("test_triton_sm90")
        _CAPTURED = dict(captured, distinct=sm90.distinct_launches(captured["launches"]))
    return _CAPTURED


def pytest_generate_tests(metafunc):
    if "launch_id" in metafunc.fixturenames:
        metafunc.parametrize("launch_id", list(_captured()["distinct"]))


@pytest.fixture(scope="module")
def compiled(request):
    """id -> compile result for the launches this session runs (all of them when the stale-comment check runs)."""
    if not PTXAS.exists():
        pytest.skip(f"triton ships no ptxas at {PTXAS}: cannot compile for sm_90 here")
    distinct = _captured()["distinct"]
    names = {item.name for item in request.session.items}
    if "test_spill_comments_match_ptxas" in names:
        wanted = list(distinct)
    else:
        wanted = [lid for lid in distinct if f"test_sm90_compile[{lid}]" in names]
    return sm90.compile_launches({lid: distinct[lid] for lid in wanted})


def _describe(launch: dict) -> str:
    names = list(launch["signature"])
    consts = {names[path[0]]: v for path, v in launch["constexprs"].items()}
    opts = {k: launch["options"][k] for k in ("num_warps", "num_stages", "num_ctas") if k in launch["options"]}
    hinted = [names[path[0]] for path, a in launch["attrs"].items() if a]
    return (
        f"{launch['module_path']}.{launch['kernel']} from scenario {launch['scenario']!r} (also {launch['also']})\n"
        f"  signature: {launch['signature']}\n  constexprs: {consts}\n  divisible by 16: {hinted}\n"
        f"  options: {opts}, grid {launch['grid']}"
    )


# --- tests ------------------------------------------------------------------------------------------------------------


def test_sm90_compile(launch_id, compiled):
    """The launch compiles for sm_90 and ptxas reports no more spills than the kernel's ``# sm_90 spills`` comment."""
    launch = _captured()["distinct"][launch_id]
    res = compiled[launch_id]
    assert res["ok"], f"{_describe(launch)}\ndoes not compile for sm_90:\n{res['error']}\n{res.get('log', '')}"
    allowed, reason = sm90.allowed_spills().get((launch["module"], launch["kernel"]), (0, "no spills"))
    spills = max(res["spill_stores"], res["spill_loads"])
    assert spills <= allowed, (
        f"{_describe(launch)}\nspills on sm_90: {res['spill_stores']} bytes stores, {res['spill_loads']} bytes loads "
        f"({res['registers']} registers); allowed {allowed} ({reason})\n{res['log']}"
    )


def test_scenarios_capture_cleanly():
    """Every scenario ran to its end and launched at least one kernel (a failing op must not shrink the coverage)."""
    captured = _captured()
    errors = "\n\n".join(f"{name}:\n{tb}" for name, tb in captured["errors"])
    assert not captured["errors"], errors
    launched = {launch["scenario"] for launch in captured["launches"]}
    idle = [name for name in captured["scenarios"] if name not in launched]
    assert captured["scenarios"] and not idle, f"scenarios that launched nothing: {idle}"


def test_every_launched_kernel_is_compiled():
    """The scenarios launch every ``@triton.jit`` kernel that kernels/*.py launches as ``kernel[grid](...)``: a new
    kernel (or a launch path no scenario reaches) fails here until a scenario covers it."""
    in_source = sm90.launched_kernels()
    captured = {(launch["module"], launch["kernel"]) for launch in _captured()["launches"]}
    assert in_source, "found no kernel launches in kernels/*.py"
    assert in_source - captured == set(), f"launched in kernels/ but by no scenario: {sorted(in_source - captured)}"
    assert captured - in_source == set(), (
        f"captured but not found as kernel[grid](...) in kernels/: {sorted(captured - in_source)}"
    )


def test_source_parsers(tmp_path):
    """The parsers behind the coverage and spill checks: launched kernels only (not @triton.jit helpers), and a
    ``# sm_90 spills`` comment counts only in the comment block right above its kernel's decorator."""
    (tmp_path / "toy.py").write_text(
        "import triton\n\n"
        "@triton.jit\ndef _helper(x):\n    return x\n\n\n"
        "# sm_90 spills: 64 bytes (a 2 KB table kept in registers)\n"
        "# another comment line\n"
        "@triton.jit(do_not_specialize=['n'])\ndef _kernel(p, n):\n    pass\n\n\n"
        "# sm_90 spills: 8 bytes (not beside a kernel: a code line follows)\nX = 1\n\n"
        "@triton.jit\ndef _unlaunched(p):\n    pass\n\n\n"
        "def launch(p, n):\n    _kernel[(1,)](p, n, num_warps=4)\n"
    )
    assert sm90.launched_kernels(tmp_path) == {("toy", "_kernel")}
    assert sm90.allowed_spills(tmp_path) == {("toy", "_kernel"): (64, "a 2 KB table kept in registers")}


def _device_fingerprint(tree) -> int:
    """Expressions of a module that look at the device: the string "cuda", ``.type`` / ``.is_cuda`` attributes,
    ``torch.cuda`` and calls of ``_is_interpreted``."""
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == "cuda":
            n += 1
        elif isinstance(node, ast.Attribute) and node.attr in ("type", "is_cuda"):
            n += 1
        elif isinstance(node, ast.Attribute) and node.attr == "cuda" and getattr(node.value, "id", None) == "torch":
            n += 1
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_is_interpreted":
            n += 1
    return n


def test_device_dependent_launch_config_is_reviewed():
    """The capture runs on CPU: every launcher that looks at the device is listed in DEVICE_DEPENDENT, with the CUDA
    configuration forced by ``capture_setup`` where the launch depends on it."""
    found = {}
    for path in sorted(sm90.KERNELS_DIR.glob("*.py")):
        n = _device_fingerprint(ast.parse(path.read_text()))
        if n:
            found[path.stem] = n
    listed = {name: n for name, (n, _) in DEVICE_DEPENDENT.items()}
    assert found == listed, (
        f"device-dependent code in kernels/ changed: found {found}, reviewed {listed}. Check whether the launch "
        "configuration depends on the device; if so make capture_setup choose the CUDA one; then update "
        "DEVICE_DEPENDENT."
    )


def test_spill_comments_match_ptxas(compiled):
    """A ``# sm_90 spills: N bytes`` comment states what ptxas reports (the maximum over the kernel's launches): it
    sits above a launched kernel and is neither stale (the kernel spills less) nor too generous."""
    distinct = _captured()["distinct"]
    worst = {}
    for lid, launch in distinct.items():
        res = compiled.get(lid)
        if res and res["ok"]:
            kernel = (launch["module"], launch["kernel"])
            worst[kernel] = max(worst.get(kernel, 0), res["spill_stores"], res["spill_loads"])
    for kernel, (allowed, reason) in sm90.allowed_spills().items():
        assert kernel in worst, f"'# sm_90 spills' comment above {kernel}, which no scenario compiles"
        assert worst[kernel] == allowed, (
            f"{kernel}: comment says {allowed} bytes ({reason}), ptxas reports {worst[kernel]}"
        )
