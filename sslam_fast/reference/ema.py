"""The EMA teacher update and its decay schedule in plain PyTorch (ALGORITHM §4): the definition and the test oracle.

- ``ema_update_``: the per-parameter loop of ``[F] fairseq/modules/ema_module.py : EMAModule._step_internal``.
- ``ema_decay``: the schedule of ``[E] models/EAT_pretraining.py : Data2VecMultiModel.set_num_updates`` (via fairseq's
  ``get_annealed_rate``).
"""

from __future__ import annotations

import torch


def ema_decay(num_updates: int, start: float = 0.9998, end: float = 0.99999, end_step: int = 100000) -> float:
    """The EMA decay after ``num_updates`` optimizer steps (ALGORITHM §4): linear from ``start`` to ``end``, then
    ``end``.

    Mirrors fairseq ``get_annealed_rate(start, end, curr_step, total_steps)``.
    """
    if num_updates >= end_step:
        return end
    r = end - start
    pct_remaining = 1 - num_updates / end_step
    return end - r * pct_remaining


@torch.no_grad()
def ema_update_(teacher_params, student_params, decay: float, frozen=None) -> None:
    """The per-parameter loop of ``EMAModule._step_internal``: teacher <- decay * teacher + (1 - decay) * student.

    Args:
        teacher_params: list of float tensors (the fp32 EMA master), updated in place.
        student_params: list of float tensors of the same shapes (any float dtype; upcast to the teacher's dtype).
        decay: the EMA decay.
        frozen: optional list of bools; a pair is copied (``teacher <- student``) when its entry is True or the
            student tensor does not require grad (upstream: ``key in skip_keys or not param.requires_grad``).
    """
    lr = 1 - decay  # upstream computes the weights exactly this way: mul_(1 - lr), add_(alpha=lr)
    for i, (t, s) in enumerate(zip(teacher_params, student_params)):
        if (frozen is not None and frozen[i]) or not s.requires_grad:
            t.copy_(s.to(dtype=t.dtype).data)
        else:
            t.mul_(1 - lr)
            t.add_(s.data.to(dtype=t.dtype), alpha=lr)
