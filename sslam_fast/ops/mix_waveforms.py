"""Additive mixing of waveform pairs at a given SNR as a dispatching custom op: ``mix_waveforms``.

``mix_waveforms(a, b, snr_db)`` adds the partner waveform b to a with a per-row gain, so that the mix has the requested
SNR of a over the scaled b (the convention of ``torchaudio.functional.add_noise``).

Backends: ``reference`` (``sslam_fast.reference.mix_waveforms``, any device) and ``triton`` (kernels/mix_waveforms.py;
CUDA, or CPU under ``TRITON_INTERPRET=1``). The op acts on model inputs, so it has no backward.
"""

from __future__ import annotations

import numbers

import torch

from sslam_fast import _backend
from sslam_fast._checks import FLOAT_DTYPES, check_finite, check_real, check_tensor, value_checks_enabled
from sslam_fast.reference import mix_waveforms as ref

__all__ = ["mix_waveforms"]

# |snr_db| beyond this is refused. The gain is 10^(-snr/20) times the level ratio: at -1000 dB it is 1e50, beyond
# float32 (the mix is inf / NaN), at +1000 dB 1e-50, i.e. 0 (the mix is a, silently). 200 dB (a power ratio of 1e20)
# is far outside any augmentation (SSLAM mixes at 0 dB) and keeps the gain well inside float32.
MAX_ABS_SNR_DB = 200.0


def _reference(a, b, snr_row, snr_scalar):
    """The reference with the op's arguments: a per-row SNR, or None for ``snr_scalar`` on every row."""
    if snr_row is None:
        snr_row = torch.full((a.shape[0],), snr_scalar, dtype=torch.float32, device=a.device)
    return ref.mix_waveforms(a, b, snr_row)


def _validate(a: torch.Tensor, b: torch.Tensor, snr_db: torch.Tensor | None, snr_scalar: float) -> None:
    """What the kernels index by (metadata only), so that a direct call of the op cannot read out of bounds."""
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2, device=a.device)
    if b.shape != a.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if snr_db is not None:
        check_tensor("snr_db", snr_db, ndim=1, device=a.device)
        if snr_db.shape[0] != a.shape[0]:
            raise ValueError(f"snr_db must have one entry per row ({a.shape[0]}), got {snr_db.shape[0]}")


_op = _backend.define_op(
    "mix_waveforms",
    "(Tensor a, Tensor b, Tensor? snr_db, float snr_scalar) -> Tensor",
    fake=lambda a, b, snr_db, snr_scalar, backend: torch.empty_like(a),
    kernels={
        "reference": _reference,
        "triton": _backend.triton_kernel("mix_waveforms", "mix_waveforms_triton"),
    },
    validate=_validate,
)


def _check_snr(snr_db, a: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Either (per-row (B,) tensor, 0.0) or (None, scalar)."""
    if isinstance(snr_db, torch.Tensor):
        check_tensor("snr_db", snr_db, ndim=(0, 1), dtypes=FLOAT_DTYPES, device=a.device)
        if snr_db.dim() == 1 and snr_db.shape[0] != a.shape[0]:
            raise ValueError(f"snr_db must have one entry per row ({a.shape[0]}), got {snr_db.shape[0]}")
        check_finite("snr_db", snr_db)
        if snr_db.numel() and value_checks_enabled():  # reading the values is a host sync on a GPU
            worst = float(snr_db.abs().max())
            if worst > MAX_ABS_SNR_DB:
                raise ValueError(f"snr_db must lie in [-{MAX_ABS_SNR_DB}, {MAX_ABS_SNR_DB}] dB, got |snr_db| = {worst}")
        return snr_db.reshape(-1).expand(a.shape[0]).contiguous(), 0.0
    if isinstance(snr_db, bool) or not isinstance(snr_db, numbers.Real):
        raise TypeError(f"snr_db must be a float or a (B,) float tensor, got {type(snr_db).__name__}")
    return None, check_real("snr_db", snr_db, minimum=-MAX_ABS_SNR_DB, maximum=MAX_ABS_SNR_DB)


def mix_waveforms(a: torch.Tensor, b: torch.Tensor, snr_db, *, backend: str = "auto") -> torch.Tensor:
    """Mix waveform pairs at a given SNR: ``a + g b`` with ``g = sqrt(P_a / (P_b 10^(snr_db/10)))`` per row.

    Args:
        a, b: (B, N) float (float32 / float16 / bfloat16 / float64), same dtype and device, finite.
        snr_db: float, or a (B,) (or 0-dim) float tensor on a's device: the SNR in dB of a over the scaled b, in
            [-200, 200] (a tensor's range is a value check).
        backend: "auto" | "reference" | "triton".

    Returns:
        (B, N) in a's dtype. P is the mean square of a row, computed in fp32, and the sum ``a + g b`` is formed in fp32.
        A silent b (P_b == 0) or a silent a gives g = 0, so the row equals a. A mix that overflows the dtype raises
        ValueError (a value check). No gradient.
    """
    check_tensor("a", a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("b", b, ndim=2, dtypes=FLOAT_DTYPES, device=a.device)
    if b.dtype != a.dtype:
        raise TypeError(f"b must have a's dtype ({a.dtype}), got {b.dtype}")
    if b.shape != a.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    check_finite("a", a)
    check_finite("b", b)
    snr_row, snr_scalar = _check_snr(snr_db, a)
    chosen = _backend.resolve("mix_waveforms", backend, a.device)
    out = _op(a, b, snr_row, snr_scalar, chosen)
    # Within the SNR range the gain is finite, but g b (b brought to a's level times 10^(-snr_db / 20)) can still
    # overflow the dtype: float16 tops out at 65504. A value check, so the trainer's steady state does not sync on it.
    if value_checks_enabled() and out.numel() and not bool(torch.isfinite(out.sum(dtype=torch.float32))):
        if not bool(torch.isfinite(out).all()):
            dtype = str(a.dtype).replace("torch.", "")
            raise ValueError(
                f"mix_waveforms: the mix is not finite: b scaled for snr_db overflows {dtype}; use a higher snr_db, "
                "quieter waveforms or a wider dtype"
            )
    return out
