"""A short demo of the ops on generated clips: ``python -m sslam_fast.demo``.

Generates polyphonic clips (tones, chirps, noise bursts), turns them into EAT model inputs with every backend that
runs here, checks each against the upstream per-clip torchaudio pipeline, times both, then builds SSLAM's partially
mixed batch and a waveform mix at a chosen SNR.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sslam_fast import _backend
from sslam_fast.ops import eat_features, mix_waveforms, partial_max_mix, sample_mix_windows


def synthetic_clips(batch: int, seconds: float, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, n) clips, each a sum of a few overlapping events: harmonic tones, chirps and band-limited noise."""
    n = int(seconds * sample_rate)
    t = torch.arange(n) / sample_rate
    clips = torch.zeros(batch, n)
    for b in range(batch):
        for _ in range(3):
            start = int(torch.randint(0, n // 2, (1,), generator=generator))
            length = int(torch.randint(n // 8, n // 2, (1,), generator=generator))
            env = torch.zeros(n)
            env[start: start + length] = torch.hann_window(min(length, n - start), periodic=False)
            kind = int(torch.randint(0, 3, (1,), generator=generator))
            f0 = float(torch.empty(1).uniform_(100, 2000, generator=generator))
            if kind == 0:
                event = sum(torch.sin(2 * math.pi * f0 * k * t) / k for k in range(1, 5))
            elif kind == 1:
                event = torch.sin(2 * math.pi * (f0 * t + 0.5 * 1500.0 / seconds * t**2))
            else:
                event = torch.randn(n, generator=generator)
            clips[b] += 0.2 * env * event
    return clips


def upstream_features(clips: torch.Tensor, sample_rate: int, target_length: int) -> torch.Tensor:
    """The upstream loader's way: one clip at a time through torchaudio (ALGORITHM §1)."""
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as AF

    out = []
    for clip in clips:
        x = AF.resample(clip, sample_rate, 16000) if sample_rate != 16000 else clip
        x = x - x.mean()
        fb = kaldi.fbank(x[None], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                         num_mel_bins=128, dither=0.0, frame_shift=10)
        fb = torch.nn.functional.pad(fb, (0, 0, 0, max(0, target_length - fb.shape[0])))[:target_length]
        out.append(((fb + 4.268) / (4.569 * 2))[None])
    return torch.stack(out)


def _timed(fn, repeats: int = 3):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return result, best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    clips = synthetic_clips(args.batch, args.seconds, args.sample_rate, g)
    print(f"{args.batch} generated clips of {args.seconds:.1f} s at {args.sample_rate} Hz; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    want, t_up = _timed(lambda: upstream_features(clips, args.sample_rate, 1024))
    print(f"  upstream torchaudio loop   {1e3 * t_up / args.batch:7.3f} ms/clip")
    for backend in _backend.available_backends("eat_features", "cpu"):
        if backend == "triton":
            continue  # the interpreter is a correctness tool, not a fast path
        got, t = _timed(lambda b=backend: eat_features(clips, sample_rate=args.sample_rate, backend=b))
        err = (got - want).abs()
        print(f"  eat_features[{backend:9s}] {1e3 * t / args.batch:7.3f} ms/clip  {t_up / t:5.2f}x  "
              f"max|err| {err.max():.2e}  mean|err| {err.mean():.2e}")

    s1, s2 = sample_mix_windows(g)
    both = partial_max_mix(got, (s1, s2), concat=True)
    changed = (both[args.batch:] != got).any(-1).float().mean()
    print(f"  partial_max_mix windows s1={s1} s2={s2}: [x; x_mix] {tuple(both.shape)}, "
          f"{100 * float(changed):.0f}% of frames changed by mixing")

    mixed = mix_waveforms(clips, clips.roll(1, 0), 10.0)
    noise = mixed - clips
    snr = 10 * torch.log10(clips.pow(2).mean(1) / noise.pow(2).mean(1))
    print(f"  mix_waveforms at 10 dB: measured SNR {snr.min():.3f}..{snr.max():.3f} dB")


if __name__ == "__main__":
    main()
