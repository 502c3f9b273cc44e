"""A float64 oracle for the log-mel: the exact DFT and mel of the very same fp32 frames the reference builds.

Pure tones and sweeps put most mel bands 100-150 dB under the peak, where the fp32 rounding of any DFT dominates:
there torch's fp32 rFFT (torchaudio, the reference) is itself 4e-5 to 1.2e-4 mean abs away from the exact result.
A kernel with a different fp32 DFT is judged on such signals by being at least as close to this oracle as torchaudio.
"""

import torch

from sslam_fast.reference import fbank as ref


def exact_logmel(x: torch.Tensor, lengths: torch.Tensor, num_frames: int, banks: torch.Tensor,
                 p: ref.FrameParams | None = None) -> torch.Tensor:
    """(B, num_frames, M) float64: framing, DC removal, pre-emphasis and window in fp32 (as the reference), then the
    DFT, mel and log in float64. Frames past a row's count are 0."""
    p = p or ref.FrameParams.at(16000)
    fr = x.float().unfold(1, p.frame_length, p.frame_shift)[:, :num_frames]
    fr = fr - fr.mean(dim=-1, keepdim=True)
    prev = torch.cat([fr[..., :1], fr[..., :-1]], dim=-1)
    fr = (fr - ref.PREEMPHASIS * prev) * ref.hanning(p.frame_length)
    power = torch.fft.rfft(fr.double(), n=p.n_fft).abs().pow(2)
    logmel = (power @ banks.double().T).clamp_min(ref.EPS).log()
    valid = torch.arange(num_frames) < ref.frame_counts(lengths, p).unsqueeze(1)
    return torch.where(valid.unsqueeze(-1), logmel, torch.zeros((), dtype=torch.float64))
