"""The EMA teacher update with fused multi-tensor kernels, and its decay schedule (ALGORITHM §4).

``ema_update_(teacher, student, decay)`` does what fairseq's ``EMAModule._step_internal`` does parameter by parameter
(``teacher.mul_(1 - lr); teacher.add_(student.to(teacher.dtype), alpha=lr)`` with ``lr = 1 - decay``, or a copy for
frozen parameters), but with torch's ``_foreach`` multi-tensor ops: the parameters are grouped once by
(frozen, devices, dtypes) and every group costs a fixed number of launches (``_foreach_mul_`` + ``_foreach_add_``,
each a few multi-tensor-apply kernels on CUDA) instead of two launches per parameter (~400 for the ~200 EAT
parameters). On CUDA a student group whose dtype (bf16 / fp16 student, fp32 master) or device differs from its
teachers is upcast in one piece: flattened into one buffer (one cat), cast once, and split back into views. On CPU,
where the ``_foreach`` ops are a C++ loop over the per-tensor kernels anyway, those kernels upcast on the fly.

Why not a ``torch.library`` custom op: the update mutates a variable-length list of tensors of mixed dtypes and
devices in place; a custom-op schema would have to declare every list element as mutated and the op would still
only forward to the ``_foreach`` kernels, which are already single ATen ops. It runs outside autograd (teacher
weights are not trained), so there is nothing for a fake kernel or an autograd formula to add.

``ema_decay(n)`` is the schedule: linear from 0.9998 to 0.99999 over 100k updates, then constant.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from sslam_fast._checks import check_real, is_int
from sslam_fast.reference import ema as ref

__all__ = ["ema_decay", "ema_update_"]


def ema_decay(num_updates: int, start: float = 0.9998, end: float = 0.99999, end_step: int = 100000) -> float:
    """The EMA decay for update ``num_updates`` (ALGORITHM §4, fairseq ``get_annealed_rate``).

    ``end - (end - start) * (1 - num_updates / end_step)`` for ``num_updates < end_step``, else ``end``.
    ``num_updates`` is the number of optimizer steps done so far (int >= 0); start and end lie in [0, 1];
    end_step is a positive int.
    """
    if not is_int(num_updates):
        raise TypeError(f"num_updates must be an int, got {type(num_updates).__name__}")
    if num_updates < 0:
        raise ValueError(f"num_updates must be >= 0, got {num_updates}")
    start = check_real("start", start, minimum=0, maximum=1)
    end = check_real("end", end, minimum=0, maximum=1)
    if not is_int(end_step):
        raise TypeError(f"end_step must be an int, got {type(end_step).__name__}")
    if end_step <= 0:
        raise ValueError(f"end_step must be positive, got {end_step}")
    return ref.ema_decay(int(num_updates), start, end, int(end_step))


def _as_tensor_list(name: str, params) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise TypeError(f"{name} must be a list/tuple/iterable of tensors, got {type(params).__name__}")
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"{name}[{i}] must be a floating-point tensor, got {p.dtype}")
    return params


def _cast_group(students: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The students in (dtype, device) as views of one buffer: one cat, one cast (and copy), no per-tensor kernels."""
    flat = _flatten_dense_tensors(students).to(device=device, dtype=dtype)
    return list(_unflatten_dense_tensors(flat, students))


def _mixed_dtype_in_place_ok(copy: bool, t_device, t_dtype, s_device, s_dtype) -> bool:
    """Whether the ``_foreach`` op may take the student in its own dtype and still match the upcast-first loop.

    On CPU the ``_foreach`` ops are a C++ loop of the per-tensor kernels, which read a lower-precision operand and
    compute in the teacher's dtype: exact when the student's dtype converts exactly into the teacher's (bf16 / fp16
    -> fp32), and a copy converts exactly like ``.to()``. That skips the flatten + cast passes, which cost ~3x the
    update itself on CPU. On CUDA a mixed-dtype list leaves the multi-tensor fast path (one launch per tensor), so
    the group is cast in one piece instead.
    """
    if s_device != t_device or t_device.type != "cpu":
        return False
    return copy or torch.promote_types(s_dtype, t_dtype) == t_dtype


@torch.no_grad()
def ema_update_(teacher_params, student_params, decay: float, frozen=None) -> None:
    """EMA teacher update in place: ``teacher <- decay * teacher + (1 - decay) * student`` (ALGORITHM §4).

    Args:
        teacher_params: list/tuple/iterable of float tensors (the EMA master, usually fp32), updated in place.
        student_params: the matching student tensors, same length and shapes; any float dtype and device (a
            dtype or device mismatch is resolved by converting the student to the teacher's, as upstream's
            ``param.to(dtype=ema_param.dtype)``).
        decay: float in [0, 1] (``ema_decay(n)``).
        frozen: optional list of bools, one per pair. A pair is copied (``teacher <- student``) instead of averaged
            when its entry is True or when the student tensor does not require grad (upstream: the fixed positional
            table).

    The arithmetic is upstream's, operation for operation (``mul_(1 - lr)`` then ``add_(alpha=lr)``,
    ``lr = 1 - decay``), so the result equals the per-parameter loop exactly on CPU. Returns None.
    """
    teachers = _as_tensor_list("teacher_params", teacher_params)
    students = _as_tensor_list("student_params", student_params)
    if len(teachers) != len(students):
        raise ValueError(
            f"student_params must have one tensor per teacher tensor ({len(teachers)}), got {len(students)}"
        )
    decay = check_real("decay", decay, minimum=0, maximum=1)
    if frozen is not None:
        if isinstance(frozen, torch.Tensor) or not isinstance(frozen, Iterable):
            raise TypeError(f"frozen must be None or a list of bools, got {type(frozen).__name__}")
        frozen = list(frozen)
        if len(frozen) != len(teachers):
            raise ValueError(f"frozen must have one bool per parameter ({len(teachers)}), got {len(frozen)}")
        if not all(isinstance(f, bool) for f in frozen):
            raise TypeError("frozen must hold bools")

    # Group once (the only per-parameter Python work: attribute reads, no kernels).
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for i, (t, s) in enumerate(zip(teachers, students)):
        if t.shape != s.shape:
            raise ValueError(
                f"student_params[{i}] has shape {tuple(s.shape)} but teacher_params[{i}] has {tuple(t.shape)}"
            )
        copy = (frozen is not None and frozen[i]) or not s.requires_grad
        key = (copy, t.device, t.dtype, s.device, s.dtype)
        ts, ss = groups.setdefault(key, ([], []))
        ts.append(t)
        ss.append(s)

    lr = 1 - decay
    for (copy, t_device, t_dtype, s_device, s_dtype), (ts, ss) in groups.items():
        matched = (s_device, s_dtype) == (t_device, t_dtype)
        if not matched and not _mixed_dtype_in_place_ok(copy, t_device, t_dtype, s_device, s_dtype):
            ss = _cast_group(ss, t_dtype, t_device)
        if copy:
            torch._foreach_copy_(ts, ss)
        else:
            torch._foreach_mul_(ts, 1 - lr)
            torch._foreach_add_(ts, ss, alpha=lr)
