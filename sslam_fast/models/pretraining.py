"""The EAT / SSLAM pre-training model: student encoder, CNN decoder, EMA teacher and the objectives (ALGORITHM §2-§5).

``PretrainingModel(cfg).losses(source, masks, mix_windows=None)`` returns the loss terms of one step; ``ema_step(n)``
is fairseq's ``set_num_updates`` (resume guard + decay schedule + EMA update of the teacher). Both run on
``sslam_fast.ops``; ``sslam_fast.reference.model.losses`` / ``ema_step`` compute the same the upstream way on the same
model. Submodule names follow the naming contract: ``student`` (EATEncoder), ``decoder`` (CNNDecoder), ``teacher``
(EATEncoder, frozen, eval), ``num_updates`` (int), ``cfg``.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from sslam_fast._checks import check_tensor, value_checks, value_checks_enabled
from sslam_fast.models import objectives
from sslam_fast.models.config import ModelConfig
from sslam_fast.models.decoder import CNNDecoder
from sslam_fast.models.encoder import EATEncoder
from sslam_fast.ops import ema_decay, ema_update_

__all__ = ["PretrainingModel", "mix_windows_tensor"]


def mix_windows_tensor(mix_windows, device) -> torch.Tensor:
    """(s1, s2) as a (2,) int64 tensor on ``device``: from a pair of ints (copied from pinned host memory on CUDA, so
    the copy never waits for the device) or a 2-element int tensor. The values are not checked here;
    :meth:`PretrainingModel.check_inputs` checks them."""
    if isinstance(mix_windows, torch.Tensor):
        return mix_windows.reshape(2).to(device=device, dtype=torch.int64, non_blocking=True)
    host = torch.tensor([int(mix_windows[0]), int(mix_windows[1])], dtype=torch.int64)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class PretrainingModel(nn.Module):
    """Student + decoder + EMA teacher."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else ModelConfig()
        self.cfg = cfg
        self.student = EATEncoder(cfg)
        self.decoder = CNNDecoder(cfg)
        # make_target_model: the teacher starts as a copy of the student (without the decoder)
        self.teacher = EATEncoder(cfg)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.num_updates = 0

    def train(self, mode: bool = True) -> PretrainingModel:
        super().train(mode)
        self.teacher.eval()  # the EMA teacher always runs in eval mode
        return self

    # --- EMA teacher (ALGORITHM §4) -----------------------------------------------------------------------------------

    def ema_due(self, num_updates: int) -> bool:
        """Whether ``ema_step(num_updates)`` averages the teacher: in training mode, and not the resume guard's skip
        (``(self.num_updates == 0 and num_updates > 1) or self.num_updates >= num_updates``, ALGORITHM §11.9)."""
        n = int(num_updates)
        return self.training and not ((self.num_updates == 0 and n > 1) or self.num_updates >= n)

    @torch.no_grad()
    def ema_step(self, num_updates: int, *, schedule: tuple[float, float, int] | None = None) -> bool:
        """``set_num_updates(num_updates)``, called at the start of every train step with the optimizer steps done.

        When :meth:`ema_due` (training mode, past the resume guard: after loading a checkpoint at n > 0 the first
        call does nothing), ``teacher <- d * teacher + (1 - d) * student`` with ``d = ema_decay(num_updates,
        *schedule)`` for trained parameters and a copy for frozen ones (the positional table); ``schedule`` is
        (start, end, end_step), None for ALGORITHM §4's 0.9998 -> 0.99999 over 100k. Always sets ``self.num_updates``.
        Returns whether the teacher was updated (False also when d is 1). The update is ``sslam_fast.ops.ema_update_``
        (``torch._foreach`` ops over all parameters at once).
        """
        if isinstance(num_updates, bool) or not isinstance(num_updates, numbers.Integral) or num_updates < 0:
            raise ValueError(f"num_updates must be an int >= 0, got {num_updates!r}")
        n = int(num_updates)
        updated = False
        if self.ema_due(n):
            decay = ema_decay(n) if schedule is None else ema_decay(n, *schedule)
            if decay < 1:
                ema_update_(list(self.teacher.parameters()), list(self.student.parameters()), decay)
                updated = True
        self.num_updates = n
        return updated

    # --- objectives (ALGORITHM §4, §5) --------------------------------------------------------------------------------

    def check_inputs(self, source, masks, mix_windows=None, mask_noise_std=None, num_kept=None):
        """The argument checks of :meth:`losses`: structural checks always; the checks that read tensor values (equal
        kept counts, window offsets given as a tensor) only when ``sslam_fast._checks.value_checks_enabled()`` (a host
        sync each on a GPU). Returns the windows as a (2,) int64 tensor on source's device (or None), the noise std
        and the kept count per row."""
        cfg = self.cfg
        check_tensor("source", source, ndim=4, dtypes=(torch.float32, torch.float16, torch.bfloat16))
        B, C, T, Fb = source.shape
        p = cfg.patch_size
        if B < 1 or C != cfg.in_chans or Fb != cfg.grid[1] * p or T % p or T == 0 or T // p > cfg.max_time_patches:
            raise ValueError(
                f"source must have shape (B, {cfg.in_chans}, T, {cfg.grid[1] * p}) with B >= 1 and T a positive "
                f"multiple of {p} (at most {cfg.max_time_patches * p}), got {tuple(source.shape)}"
            )
        N = (T // p) * cfg.grid[1]
        check_tensor("masks", masks, ndim=2, dtypes=(torch.bool,), device=source.device)
        if tuple(masks.shape) != (B * cfg.clones, N):
            raise ValueError(
                f"masks must have shape (B * clones, N) = ({B * cfg.clones}, {N}), got {tuple(masks.shape)}"
            )
        if num_kept is not None and (isinstance(num_kept, bool) or not isinstance(num_kept, numbers.Integral)
                                     or not 0 < num_kept < N):
            raise ValueError(f"num_kept must be an int in [1, {N - 1}], got {num_kept!r}")
        if num_kept is None or value_checks_enabled():
            kept = N - masks.sum(1)
            lo, hi = (int(v) for v in torch.aminmax(kept))
            if lo != hi:
                raise ValueError("masks must mask the same number of tokens in every row (equal kept counts)")
            if lo in (0, N):
                raise ValueError(f"masks must mask at least one and keep at least one token per row, got {N - lo}")
            if num_kept is not None and num_kept != lo:
                raise ValueError(f"num_kept={num_kept} but the masks keep {lo} tokens a row")
            num_kept = lo
        windows = None
        if mix_windows is not None:
            if cfg.stage != "sslam":
                raise ValueError("mix_windows must be None for stage 'eat' (set ModelConfig.stage='sslam' for SSLAM)")
            windows = self._check_windows(mix_windows, T, source.device)
        elif cfg.stage == "sslam":
            raise ValueError("mix_windows must be given (s1, s2) for stage 'sslam'")
        std = cfg.mask_noise_std if mask_noise_std is None else mask_noise_std
        if isinstance(std, bool) or not isinstance(std, numbers.Real) or not std >= 0 or std == float("inf"):
            raise ValueError(f"mask_noise_std must be a finite float >= 0, got {mask_noise_std!r}")
        return windows, float(std), int(num_kept)

    def _check_windows(self, mix_windows, T: int, device: torch.device) -> torch.Tensor:
        if isinstance(mix_windows, torch.Tensor):
            if mix_windows.dtype not in (torch.int32, torch.int64) or mix_windows.numel() != 2:
                raise ValueError(f"mix_windows must be a pair (s1, s2) of ints or a 2-element int tensor, got a "
                                 f"{mix_windows.dtype} tensor of shape {tuple(mix_windows.shape)}")
            if value_checks_enabled():
                self._check_window_values(mix_windows.reshape(-1).tolist(), T)
        else:
            self._check_window_values(mix_windows, T)
        return mix_windows_tensor(mix_windows, device)

    def _check_window_values(self, mix_windows, T: int) -> None:
        cfg = self.cfg
        if not isinstance(mix_windows, (tuple, list)) or len(mix_windows) != 2:
            raise ValueError(f"mix_windows must be a pair (s1, s2) of frame offsets, got {mix_windows!r}")
        s1, s2 = mix_windows
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in (s1, s2)):
            raise ValueError(f"mix_windows must hold ints, got {mix_windows!r}")
        s1, s2 = int(s1), int(s2)
        w, p = cfg.mix_window_frames, cfg.patch_size
        if s1 % p or s2 % p or not (0 <= s1 and s1 + w <= s2 and s2 + w <= T):
            raise ValueError(
                f"mix_windows must satisfy 0 <= s1, s1 + {w} <= s2, s2 + {w} <= T = {T}, both multiples of {p}, "
                f"got ({s1}, {s2})"
            )

    def check_values(self, source: torch.Tensor, masks: torch.Tensor, mix_windows=None, num_kept=None) -> None:
        """Every check of :meth:`losses`, the value checks included, whatever ``value_checks_enabled()`` says: what a
        trainer runs eagerly on its first step before a compiled forward (which runs structural checks only)."""
        with value_checks(True):
            self.check_inputs(source, masks, mix_windows, None, num_kept)

    def losses(
        self,
        source: torch.Tensor,
        masks: torch.Tensor,
        mix_windows=None,
        mask_noise_std: float | None = None,
        num_kept: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss terms of one pre-training step (ALGORITHM §4 stage 1, §5 stage 2).

        Args:
            source: (B, 1, T, 128) normalised log-mels, T a multiple of 16 (1024 upstream).
            masks: (B * clones, N) bool, True = masked (predicted), clip-major rows ``b * clones + k``; every row
                masks the same number of tokens.
            mix_windows: None (stage 1, EAT) or (s1, s2) frame offsets of the two unmixed windows (stage 2, SSLAM;
                ``sslam_fast.ops.sample_mix_windows``), as ints or a 2-element int tensor (on source's device, it
                is never read back: under ``torch.compile`` new windows are new data, not a recompile). The mixed
                half reuses ``masks``.
            mask_noise_std: std of the decoder's mask tokens; None uses ``cfg.mask_noise_std``; 0 is deterministic.
            num_kept: the kept (unmasked) tokens per row of ``masks`` when the caller knows it (the trainer does: the
                mask generator keeps a fixed count). None reads it from the masks, one host sync on a GPU.

        Returns:
            dict of fp32 0-dim tensors: ``patch`` (sum over rows, masked tokens and channels of squared error /
            sqrt(D)), ``mix_patch`` (SSLAM's source-retention term, x2; 0 in stage 1), ``cls`` (per-row CLS sum
            times S), ``sample_size`` (S, the masked-token count of the student rows) and
            ``loss = (patch + mix_patch + cls) / S``.
        """
        windows, std, num_kept = self.check_inputs(source, masks, mix_windows, mask_noise_std, num_kept)
        return objectives.losses(self, source, masks, windows, std, num_kept)

    def forward(
        self, source: torch.Tensor, masks: torch.Tensor, mix_windows=None, num_kept: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Training forward: ``losses(source, masks, mix_windows, num_kept=num_kept)``."""
        return self.losses(source, masks, mix_windows, num_kept=num_kept)
