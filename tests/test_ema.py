"""EMA teacher update and decay schedule (ALGORITHM §4): ema_update_ against upstream's per-parameter loop."""

from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sslam_fast.ops.ema import ema_decay, ema_update_
from sslam_fast.reference import ema as ref

ema_mod = importlib.import_module("sslam_fast.ops.ema")

# Shapes of an EAT-like parameter list, scaled down: matrices, vectors, a 0-dim scalar, a single element, primes.
SHAPES = [(7, 5), (5,), (), (1,), (3, 1, 4, 4), (13,), (2, 11, 3), (1, 1, 17)]


def _params(shapes, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]


def _students(shapes, dtype=torch.float32, seed=1, frozen_idx=(), device="cpu"):
    ps = [torch.nn.Parameter(p) for p in _params(shapes, dtype, seed, device)]
    for i in frozen_idx:
        ps[i].requires_grad_(False)
    return ps


class _CountOps(TorchDispatchMode):
    """Counts the ATen calls that can launch work (view ops, which only make metadata, are not counted)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


# --- correctness ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.9998, 0.99999, 0.5, 0.0, 1.0], ids=lambda d: f"decay{d}")
def test_matches_upstream_loop_exactly_fp32(decay):
    students = _students(SHAPES, frozen_idx=(2,))
    teach_fast = _params(SHAPES, seed=5)
    teach_ref = [t.clone() for t in teach_fast]
    ema_update_(teach_fast, students, decay)
    ref.ema_update_(teach_ref, students, decay)
    for i, (a, b) in enumerate(zip(teach_fast, teach_ref)):
        assert torch.equal(a, b), i
    # and the loop computes the formula: decay * t + (1 - decay) * s (fp64 check), the frozen one a copy
    t0 = _params(SHAPES, seed=5)
    for i, (a, t, s) in enumerate(zip(teach_fast, t0, students)):
        want = s.detach() if i == 2 else decay * t.double() + (1 - decay) * s.detach().double()
        torch.testing.assert_close(a.double(), want.double(), rtol=1e-6, atol=1e-7)
    if 0.0 < decay < 1.0:
        assert not torch.equal(teach_fast[0], students[0].detach())  # really averaged
        assert not torch.equal(teach_fast[0], t0[0])


@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_dtypes_match_loop(sdtype):
    # fp32 master, low-precision student (fairseq ema_fp32 with an fp16 / bf16 model), plus an fp32 student group
    # and an fp16 teacher fed by an fp32 student (downcast): every group is handled, exactly as the loop does.
    shapes = SHAPES + [(4, 4), (6,)]
    students = _students(SHAPES, sdtype, frozen_idx=(1,)) + _students([(4, 4), (6,)], torch.float32, seed=9)
    teach = _params(SHAPES, seed=3) + [torch.randn(4, 4), torch.randn(6).half()]
    want = [t.clone() for t in teach]
    ema_update_(teach, students, 0.999)
    ref.ema_update_(want, students, 0.999)
    assert [t.dtype for t in teach] == [t.dtype for t in want]  # teachers keep their dtype
    for i, (a, b) in enumerate(zip(teach, want)):
        assert torch.equal(a, b), i
    assert torch.equal(teach[1], students[1].detach().float())  # frozen: an exact upcast copy
    assert len(shapes) == len(teach)


@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cast_in_one_piece_matches_loop(sdtype, monkeypatch):
    # The CUDA strategy for a mixed-dtype group (flatten, one cast, views), forced on CPU.
    monkeypatch.setattr(ema_mod, "_mixed_dtype_in_place_ok", lambda *args: False)
    students = _students(SHAPES, sdtype, frozen_idx=(4,))
    teach = _params(SHAPES, seed=6)
    want = [t.clone() for t in teach]
    with _CountOps() as mode:
        ema_update_(teach, students, 0.99)
    assert "aten.cat.default" in {str(op) for op in mode.ops}  # the students were cast in one piece
    ref.ema_update_(want, students, 0.99)
    for i, (a, b) in enumerate(zip(teach, want)):
        assert torch.equal(a, b), i
    views = ema_mod._cast_group(students[:3], torch.float32, torch.device("cpu"))
    assert [v.shape for v in views] == [s.shape for s in students[:3]]
    assert all(torch.equal(v, s.detach().float()) for v, s in zip(views, students[:3]))


def test_frozen_list_and_requires_grad():
    students = _students(SHAPES, frozen_idx=(0,))
    frozen = [False] * len(SHAPES)
    frozen[3] = frozen[5] = True
    teach = _params(SHAPES, seed=4)
    want = [t.clone() for t in teach]
    ema_update_(teach, students, 0.9, frozen=frozen)
    ref.ema_update_(want, students, 0.9, frozen=frozen)
    for i, (a, b) in enumerate(zip(teach, want)):
        assert torch.equal(a, b), i
    for i in (0, 3, 5):  # copied: requires_grad False (0) or listed (3, 5)
        assert torch.equal(teach[i], students[i].detach()), i
    for i in (1, 4, 6):
        assert not torch.equal(teach[i], students[i].detach()), i


def test_modules_like_upstream():
    # A student module with a fixed (requires_grad=False) table like EAT's positional embedding.
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    student.register_parameter("pos", torch.nn.Parameter(torch.randn(9, 6), requires_grad=False))
    teacher = copy.deepcopy(student).requires_grad_(False)
    master = [p.detach().clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    want = [m.clone() for m in master]
    for step in range(3):  # a few steps with the schedule
        d = ema_decay(step)
        ema_update_(master, student.parameters(), d)  # a generator is accepted
        ref.ema_update_(want, list(student.parameters()), d)
    for a, b in zip(master, want):
        assert torch.equal(a, b)
    names = [n for n, _ in student.named_parameters()]
    assert torch.equal(master[names.index("pos")], student.pos.detach())  # the fixed table is copied
    assert not torch.equal(master[names.index("0.weight")], student[0].weight.detach())


def test_empty_lists():
    ema_update_([], [], 0.5)  # nothing to do, no error


# --- no per-parameter loop --------------------------------------------------------------------------------------------


def _count(fn, n_params, sdtype):
    shapes = [(3, 2)] * n_params
    students = _students(shapes, sdtype, frozen_idx=(0,))
    teach = _params(shapes, seed=2)
    with _CountOps() as mode:
        fn(teach, students, 0.99)
    return len(mode.ops), mode.ops


@pytest.mark.parametrize("cast", [False, True], ids=["cpu-strategy", "cuda-strategy"])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16], ids=["same-dtype", "mixed-dtype"])
def test_op_count_does_not_scale_with_parameters(sdtype, cast, monkeypatch):
    if cast:
        monkeypatch.setattr(ema_mod, "_mixed_dtype_in_place_ok", lambda *args: False)
    few, ops_few = _count(ema_update_, 3, sdtype)
    many, ops_many = _count(ema_update_, 60, sdtype)
    assert few == many, (ops_few, ops_many)
    names = {str(op) for op in ops_many}
    assert "aten._foreach_mul_.Scalar" in names and "aten._foreach_add_.List" in names
    # The check can fail: the per-parameter loop issues ops in proportion to the parameters.
    loop_few, _ = _count(ref.ema_update_, 3, sdtype)
    loop_many, _ = _count(ref.ema_update_, 60, sdtype)
    assert loop_many >= loop_few + 2 * 57


# --- schedule ---------------------------------------------------------------------------------------------------------


def test_ema_decay_schedule():
    assert ema_decay(0) == 0.99999 - (0.99999 - 0.9998)  # = start, written as upstream computes it
    assert ema_decay(0) == pytest.approx(0.9998, abs=1e-15)
    assert ema_decay(50000) == pytest.approx(0.999895, abs=1e-12)
    assert ema_decay(100000) == 0.99999 and ema_decay(400000) == 0.99999
    assert ema_decay(99999) == pytest.approx(0.99999 - 0.00019 / 100000, abs=1e-12)
    values = [ema_decay(n) for n in range(0, 100001, 5000)]
    assert all(a < b for a, b in itertools.pairwise(values))
    assert ema_decay(10, start=0.5, end=1.0, end_step=20) == pytest.approx(0.75)


def test_ema_decay_bad_arguments():
    with pytest.raises(ValueError, match="num_updates"):
        ema_decay(-1)
    with pytest.raises(TypeError, match="num_updates"):
        ema_decay(1.5)
    with pytest.raises(ValueError, match="start"):
        ema_decay(0, start=1.5)
    with pytest.raises(ValueError, match="end"):
        ema_decay(0, end=float("nan"))
    with pytest.raises(ValueError, match="end_step"):
        ema_decay(0, end_step=0)


def test_ema_update_bad_arguments():
    t, s = _params(SHAPES), _students(SHAPES)
    with pytest.raises(ValueError, match="student_params"):
        ema_update_(t, s[:-1], 0.9)
    with pytest.raises(ValueError, match=r"student_params\[1\]"):
        ema_update_(t[:2], [s[0], torch.randn(6)], 0.9)
    with pytest.raises(TypeError, match=r"teacher_params\[0\]"):
        ema_update_([t[0].numpy()], [s[0]], 0.9)
    with pytest.raises(TypeError, match=r"student_params\[0\]"):
        ema_update_([t[0]], [s[0].detach().long()], 0.9)
    with pytest.raises(TypeError, match="teacher_params"):
        ema_update_(t[0], s[0], 0.9)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="decay"):
            ema_update_(t, s, bad)
    with pytest.raises(TypeError, match="decay"):
        ema_update_(t, s, True)
    with pytest.raises(ValueError, match="frozen"):
        ema_update_(t, s, 0.9, frozen=[True])
    with pytest.raises(TypeError, match="frozen"):
        ema_update_(t, s, 0.9, frozen=[1] * len(t))
    before = [x.clone() for x in t]
    with pytest.raises(ValueError):
        ema_update_(t, s, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(t, before))  # validation happens before any update


# --- CUDA -------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_eat_sized(sdtype):
    # EAT-base: 12 blocks x 12 tensors + embeddings, ~86M parameters; fp32 master, student in sdtype.
    shapes = [(768, 1, 16, 16), (768,), (1, 6144, 768), (1, 1, 768), (768,), (768,)]
    for _ in range(12):
        shapes += [(2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,), (768, 3072)]
        shapes += [(768,), (768,), (768,)]
    students = _students(shapes, sdtype, frozen_idx=(2,), device="cuda")
    teach = _params(shapes, seed=7, device="cuda")
    want = [t.clone() for t in teach]
    ema_update_(teach, students, 0.9998)
    ref.ema_update_(want, students, 0.9998)
    for a, b in zip(teach, want):  # the same formula in fused kernels: equal up to FMA contraction
        torch.testing.assert_close(a, b, rtol=2.5e-7, atol=1e-7)
    assert torch.equal(teach[2], students[2].detach().float())


def _cuda_kernel_count(fn, n_params, sdtype):
    shapes = [(768,)] * n_params  # many small tensors: a per-parameter loop would launch 2 kernels each
    students = _students(shapes, sdtype, frozen_idx=(0,), device="cuda")
    teach = _params(shapes, seed=3, device="cuda")
    fn(teach, students, 0.99)  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(teach, students, 0.99)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.cuda
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16], ids=["same-dtype", "mixed-dtype"])
def test_cuda_kernel_count_does_not_scale(sdtype):
    fused = _cuda_kernel_count(ema_update_, 400, sdtype)
    loop = _cuda_kernel_count(ref.ema_update_, 400, sdtype)
    assert loop >= 2 * 399  # the check can fail: the loop launches per parameter
    # multi-tensor apply takes 64-110 tensors per launch (cat up to 128 inputs): ~12-20 launches for 400 tensors
    assert fused <= 40, fused
