"""Additive mixing of waveform pairs at a given SNR in plain PyTorch: the definition, the CPU fallback, the test oracle.

``mix_waveforms`` has no upstream counterpart in SSLAM; it follows the usual convention (as
``torchaudio.functional.add_noise``): the mix ``a + g b`` has power ratio ``snr_db`` of a over the scaled b.
"""

from __future__ import annotations

import torch


def mix_gains(a: torch.Tensor, b: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 gains ``g = sqrt(P_a / (P_b 10^(snr/10)))``, P the mean square of a row in fp32; 0 when P_b == 0.

    Written as ``sqrt(P_a) / (sqrt(P_b) 10^(snr/20))`` (the same value) so that a tiny but non-zero P_b does not
    overflow the ratio P_a / P_b in fp32.
    """
    pa = a.to(torch.float32).square().mean(dim=1) if a.shape[1] else a.new_zeros(a.shape[0], dtype=torch.float32)
    pb = b.to(torch.float32).square().mean(dim=1) if b.shape[1] else b.new_zeros(b.shape[0], dtype=torch.float32)
    amp = torch.pow(10.0, snr_db.to(torch.float32) / 20.0)
    g = pa.sqrt() / (pb.sqrt() * amp)
    return torch.where(pb > 0, g, torch.zeros_like(g))


def mix_waveforms(a: torch.Tensor, b: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
    """``a + g b`` row by row (computed in fp32, returned in a's dtype) so that the mix has SNR ``snr_db`` of a over b.

    Args:
        a, b: (B, N) float, same dtype and device.
        snr_db: (B,) float, per-row SNR in dB.

    A silent b (P_b == 0) or a silent a gives g = 0, so the result is a.
    """
    g = mix_gains(a, b, snr_db)
    return (a.to(torch.float32) + g.unsqueeze(1) * b.to(torch.float32)).to(a.dtype)
