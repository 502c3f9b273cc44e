"""A short demo of the ops on generated clips: ``python -m sslam_fast.demo [--plot DIR]``.

Generates polyphonic clips (tones, chirps, noise bursts), turns them into EAT model inputs with every backend that
runs here, checks each against the upstream per-clip torchaudio pipeline, times both, then builds SSLAM's partially
mixed batch and a waveform mix at a chosen SNR.

``--plot DIR`` draws the ops instead, into three PNGs: ``masks.png`` (one clip's log-mel and its K inverse-block clone
masks on the 64 x 8 patch grid), ``mixing.png`` (a clip, its partner, their partial max-mix with the two unmixed
windows marked) and ``fbank.png`` (each fbank backend beside torchaudio's, and their difference). The data behind each
picture comes from a function of its own (:func:`mask_data`, :func:`mixing_data`, :func:`fbank_data`); matplotlib is
imported only when drawing.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sslam_fast import _backend
from sslam_fast.ops import (
    eat_features,
    inverse_block_mask,
    kaldi_fbank,
    mix_waveforms,
    partial_max_mix,
    sample_mix_windows,
)


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


PLOT_SECONDS = 10.24  # 163840 samples at 16 kHz: 1022 frames, padded to the model's 1024 (ALGORITHM §1)
GRID = (64, 8)  # (time, frequency) patches of 16 x 16 (ALGORITHM §3)
PATCH = 16


def demo_batch(seed: int, batch: int = 2, sample_rate: int = 16000) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` clips of :data:`PLOT_SECONDS` made as the built-in synthetic set makes its clips (2-4 events of
    distinct classes over a faint background, ``sslam_fast.data.synthetic``) and their EAT inputs (batch, 1, 1024,
    128)."""
    import numpy as np

    from sslam_fast.data.synthetic import _clip

    rng = np.random.default_rng(seed)
    n = int(PLOT_SECONDS * sample_rate)
    clips = torch.from_numpy(np.stack([_clip(n, sample_rate, rng)[0] for _ in range(batch)]))
    return clips, eat_features(clips, sample_rate=sample_rate)


def mask_data(feats: torch.Tensor, clones: int, seed: int, clip: int = 0) -> dict:
    """Clip ``clip``'s log-mel (1024, 128) and its clone masks ``inverse_block_mask(1, clones, seed=seed)`` as
    (clones, 64, 8) bool, True = masked; token ``n = 8 t + f`` is time patch t, frequency patch f (ALGORITHM §3)."""
    masks = inverse_block_mask(1, clones, grid=GRID, seed=seed)
    return {"spec": feats[clip, 0], "masks": masks.view(clones, *GRID), "seed": seed, "clip": clip}


def mixing_data(feats: torch.Tensor, windows: tuple[int, int], clip: int = 0) -> dict:
    """Clip ``clip``'s log-mel, its partner (clip ``clip - 1``, cyclically) and row ``clip`` of
    ``partial_max_mix(feats, windows)``: their element-wise max outside the two unmixed windows (ALGORITHM §5.1)."""
    from sslam_fast.reference.partial_max_mix import WINDOW_FRAMES

    mix = partial_max_mix(feats, windows, window_frames=WINDOW_FRAMES)
    return {"clip": feats[clip, 0], "partner": feats[(clip - 1) % feats.shape[0], 0], "mix": mix[clip, 0],
            "windows": tuple(int(w) for w in windows), "window_frames": WINDOW_FRAMES, "index": clip}


def fbank_data(clip: torch.Tensor, sample_rate: int = 16000) -> dict:
    """One clip's log-mel by ``torchaudio.compliance.kaldi.fbank`` with EAT's arguments and by each fbank backend that
    runs here: the CPU ones (the Triton interpreter is left out: a correctness tool, not a backend to show) and, with
    CUDA, the GPU ones. ``{"torchaudio": (T, 128), "backends": {label: (T, 128)}}``, all on the CPU."""
    import torchaudio.compliance.kaldi as kaldi

    want = kaldi.fbank(clip[None], htk_compat=True, sample_frequency=sample_rate, use_energy=False,
                       window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    got = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in _backend.available_backends("kaldi_fbank", device):
            if device == "cpu" and backend == "triton":
                continue
            out = kaldi_fbank(clip[None].to(device), sample_rate=sample_rate, backend=backend)
            got[backend if device == "cpu" else f"{backend} (cuda)"] = out[0].cpu()
    return {"torchaudio": want, "backends": got}


def _levels(*specs: torch.Tensor) -> dict:
    """The colour range of log-mel panels: from the median (the faint background and the padding show as black, which
    keeps the events readable and the PNG small) to the maximum."""
    both = torch.cat([s.flatten() for s in specs])
    return {"vmin": float(both.median()), "vmax": float(both.max())}


def _spec_panel(ax, spec: torch.Tensor, title: str, **kw):
    """A (frames, mel) log-mel as an image: time across, mel bins up."""
    ax.imshow(spec.T.numpy(), origin="lower", aspect="auto", interpolation="nearest", cmap="magma",
              extent=(0, spec.shape[0], 0, spec.shape[1]), **kw)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("mel bin", fontsize=8)
    ax.tick_params(labelsize=7)


def masks_figure(data: dict, dpi: int = 100):
    """The clip's log-mel, then one panel per clone with its masked patches greyed out (the kept ones show the
    log-mel). Each mask image carries the gid ``"mask:<k>"`` and holds the (8, 64) grid, frequency up."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    from sslam_fast.plot import agg_figure

    spec, masks = data["spec"], data["masks"]
    K, (H, W) = masks.shape[0], masks.shape[1:]
    fig = agg_figure((10.0, 1.3 * (K + 1) + 0.3), dpi)
    axes = fig.subplots(K + 1, 1, sharex=True)
    lim = _levels(spec)
    _spec_panel(axes[0], spec, f"clip {data['clip']}: normalised log-mel, {spec.shape[0]} frames x {spec.shape[1]} "
                f"mel bins = {H} x {W} patches of {PATCH} x {PATCH}", **lim)
    grey = ListedColormap(["#c8c8c8"])
    for k in range(K):
        ax = axes[k + 1]
        grid = masks[k].T.numpy()  # (W, H): frequency patches up, time patches across
        _spec_panel(ax, spec, f"clone {k}: {int((~masks[k]).sum())} of {H * W} patches kept, the rest masked "
                    f"(inverse_block_mask seed={data['seed']})", **lim)
        ax.imshow(np.ma.masked_array(grid.astype(np.float32), mask=~grid), origin="lower", aspect="auto",
                  interpolation="nearest", cmap=grey, alpha=0.92, extent=(0, H * PATCH, 0, W * PATCH), gid=f"mask:{k}")
    axes[-1].set_xlabel("frame (10 ms)", fontsize=8)
    return fig


def mixing_figure(data: dict, dpi: int = 100):
    """Clip, partner, partial max-mix (unmixed windows outlined) and what the partner adds to the clip. The images
    carry the gids ``"clip"``, ``"partner"``, ``"mix"`` and ``"added"``."""
    from sslam_fast.plot import agg_figure

    clip, partner, mix = data["clip"], data["partner"], data["mix"]
    (s1, s2), wf = data["windows"], data["window_frames"]
    fig = agg_figure((10.0, 6.0), dpi)
    axes = fig.subplots(4, 1, sharex=True)
    lim = _levels(clip, partner)
    i = data["index"]
    _spec_panel(axes[0], clip, f"clip {i}", gid="clip", **lim)
    _spec_panel(axes[1], partner, f"its partner, clip {i} - 1 (cyclic)", gid="partner", **lim)
    _spec_panel(axes[2], mix, f"partial_max_mix: max of both outside the unmixed windows [{s1}, {s1 + wf}) and "
                f"[{s2}, {s2 + wf}), the clip alone inside", gid="mix", **lim)
    added = mix - clip  # >= 0: what the partner raises
    axes[3].imshow(added.T.numpy(), origin="lower", aspect="auto", interpolation="nearest", cmap="Greys",
                   extent=(0, clip.shape[0], 0, clip.shape[1]), vmin=0, vmax=max(float(added.max()), 1e-6),
                   gid="added")
    axes[3].set_title("mix - clip: what the partner adds (zero inside the windows)", fontsize=9)
    axes[3].tick_params(labelsize=7)
    axes[3].set_xlabel("frame (10 ms)", fontsize=8)
    for ax in axes:
        for s in (s1, s2):
            ax.axvspan(s, s + wf, fill=False, edgecolor="#00d0ff", linewidth=1.5, linestyle="--")
    return fig


def fbank_figure(data: dict, dpi: int = 100):
    """One row per backend: its log-mel, torchaudio's, and their difference (gids ``"<label>:out"``,
    ``"<label>:torchaudio"``, ``"<label>:diff"``)."""
    from sslam_fast.plot import agg_figure

    want, got = data["torchaudio"], data["backends"]
    rows = max(len(got), 1)
    fig = agg_figure((12.0, 2.2 * rows + 0.4), dpi)
    axes = fig.subplots(rows, 3, squeeze=False)
    lim = _levels(want)
    for r, (label, out) in enumerate(got.items()):
        diff = out - want
        span = max(float(diff.abs().max()), 1e-12)
        _spec_panel(axes[r, 0], out, f"kaldi_fbank, backend {label}", gid=f"{label}:out", **lim)
        _spec_panel(axes[r, 1], want, "torchaudio.compliance.kaldi.fbank", gid=f"{label}:torchaudio", **lim)
        axes[r, 2].imshow(diff.T.numpy(), origin="lower", aspect="auto", interpolation="nearest", cmap="RdBu_r",
                          vmin=-span, vmax=span, extent=(0, diff.shape[0], 0, diff.shape[1]), gid=f"{label}:diff")
        axes[r, 2].set_title(f"{label} - torchaudio: max |diff| {float(diff.abs().max()):.1e}", fontsize=9)
        axes[r, 2].tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("frame (10 ms)", fontsize=8)
    return fig


def write_plots(out_dir, *, seed: int = 0, clones: int = 4, dpi: int = 100) -> list:
    """Write ``masks.png``, ``mixing.png`` and ``fbank.png`` into ``out_dir`` (created); returns their paths."""
    from pathlib import Path

    from sslam_fast.plot import save_png

    out_dir = Path(out_dir)
    clips, feats = demo_batch(seed)
    g = torch.Generator().manual_seed(seed)
    figures = {
        "masks.png": masks_figure(mask_data(feats, clones, seed), dpi),
        "mixing.png": mixing_figure(mixing_data(feats, sample_mix_windows(g)), dpi),
        "fbank.png": fbank_figure(fbank_data(clips[0]), dpi),
    }
    return [save_png(fig, out_dir / name) for name, fig in figures.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sslam_fast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="DIR", help="write masks.png, mixing.png and fbank.png into DIR instead")
    parser.add_argument("--clones", type=int, default=4, help="clone masks in masks.png (default 4)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch of the pictures (default 100)")
    args = parser.parse_args(argv)
    if args.plot is not None:
        if not 1 <= args.clones <= 16:
            parser.error(f"--clones must lie in [1, 16], got {args.clones}")
        if not 10 <= args.dpi <= 1000:
            parser.error(f"--dpi must lie in [10, 1000], got {args.dpi}")
        if args.seed < 0:
            parser.error(f"--seed must be >= 0, got {args.seed}")
        for path in write_plots(args.plot, seed=args.seed, clones=args.clones, dpi=args.dpi):
            print(f"wrote {path}")
        return

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
