"""Fine-tuning augmentations and losses on the device, batched, with upstream's distributions (docs/ALGORITHM.md §9).

Every random draw comes from the ``generator`` given (on the tensors' device; None = torch's default generator of that
device), every output stays on the input's device, and nothing is read back to the host: the random numbers are
tensors, and choices are ``torch.where`` over them, never Python branches on their values.

Upstream, per clip in the data loader (``[E] data/raw_audio_dataset.py``): ``_roll_mag_aug`` on the mean-removed
16 kHz waveform, then fbank, pad / crop and normalisation, then (SPC-2's ``noise``) fbank noise and a time roll. Per
batch in the model (``[E] models/EAT_audio_classification.py : MaeImageClassificationModel.forward``): ``Mixup``
(``[E] utils/mixup.py``, batch mode), then ``spectrogram_augment`` (torchaudio's ``FrequencyMasking`` and
``TimeMasking`` with ``iid_masks=True``), then the loss. The functions here keep that order when called in it:
``roll_aug`` -> features -> ``noise_aug`` -> ``mixup`` -> ``spec_augment`` -> model -> ``finetune_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslam_fast._checks import FLOAT_DTYPES, check_generator, check_lengths, check_real, check_tensor

__all__ = ["finetune_loss", "mixup", "noise_aug", "roll_aug", "smooth_targets", "spec_augment"]

ROLL_GAIN_BETA = 10.0  # mag = Beta(10, 10) + 0.5 ([E] data/raw_audio_dataset.py : _roll_mag_aug)
NOISE_SCALE = 0.1  # fbank + U[0,1)^(T,F) * U[0,1) / 10 ([E] data/raw_audio_dataset.py : __getitem__, noise)
NOISE_SHIFT = 10  # then a time roll by randint(-10, 10), i.e. -10..9 frames
MEL_BINS = 128  # SpecAugment's frequency mask bound is 128 * mask_ratio upstream
PCM_SCALE = 1.0 / 32768.0  # int16 PCM to floats in [-1, 1), as soundfile reads 16-bit files


def _rand(shape, like: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)


def _beta(alpha: float, n: int, like: torch.Tensor, generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha) as X / (X + Y) with X, Y ~ Gamma(alpha, 1), float32 on ``like``'s device."""
    conc = torch.full((2, n), float(alpha), device=like.device, dtype=torch.float32)
    g = torch._standard_gamma(conc, generator=generator)
    total = g[0] + g[1]
    return torch.where(total > 0, g[0] / total.clamp_min(torch.finfo(torch.float32).tiny), 0.5)


def _check_fbank(fbank, name: str = "fbank") -> torch.Tensor:
    check_tensor(name, fbank, ndim=4, dtypes=FLOAT_DTYPES)
    if fbank.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, T, F), got {tuple(fbank.shape)}")
    return fbank


def roll_aug(audio: torch.Tensor, lengths=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Upstream's ``_roll_mag_aug`` on a padded batch: each clip's first ``lengths[b]`` samples are rolled circularly
    by an offset uniform in ``[0, lengths[b])`` (``np.roll(w, randint(len(w)))``) and scaled by a gain ``Beta(10, 10)
    + 0.5`` (in [0.5, 1.5], mean 1); samples past ``lengths[b]`` are left as they are.

    ``audio`` (B, N) float at the model's sample rate (upstream rolls after resampling to 16 kHz and after the clip
    mean is removed, which a roll keeps and the gain scales, so it commutes with ``eat_features``' mean removal), or
    int16 PCM, read as ``audio.float() / 32768`` (soundfile's float read) with that scale folded into the gain: the
    result is float32 and bit for bit that of the float call on ``audio.float() * (1 / 32768)``, the scale being a
    power of two. ``lengths`` (B,) ints on the same device, None = every row full (their range check is a value check,
    see ``sslam_fast._checks``). Returns a new (B, N) tensor.
    """
    check_tensor("audio", audio, ndim=2, dtypes=FLOAT_DTYPES + (torch.int16,))
    check_generator(generator, audio.device.type)
    B, N = audio.shape
    full = lengths is None
    lengths = check_lengths(lengths, B, N, audio.device)
    n = lengths.clamp_min(1).unsqueeze(1)  # (B, 1); a row of length 0 stays as it is
    offset = torch.randint(0, 2**62, (B, 1), generator=generator, device=audio.device) % n
    gain = (_beta(ROLL_GAIN_BETA, B, audio, generator) + 0.5).unsqueeze(1)
    pcm = audio.dtype == torch.int16
    gain = gain * PCM_SCALE if pcm else gain.to(audio.dtype)  # x * (g / 32768) = (x / 32768) * g: both exact scalings
    if N == 0:
        return audio.float() if pcm else audio.clone()
    rows = torch.arange(B, device=audio.device)
    # np.roll: out[j] = w[(j - offset) mod len], read as one row window per clip instead of per-sample indices. With
    # z = [y, x] (2N samples) and y[i] = x[i - (N - len)] for i >= N - len (the valid part right-aligned), the window
    # z[N - offset : 2N - offset] holds x[j - offset] for offset <= j < len and x[len - offset + j] for j < offset.
    z = torch.cat([audio, audio], 1)
    if not full:  # y = [x, x][len : len + N]; a full row has y = x, z = [x, x]
        z[:, :N] = z.unfold(1, N, 1)[rows, lengths]
    start = N - offset.squeeze(1)  # in [N - len + 1, N] (N where offset = 0): one of z's N + 1 windows
    window = z.unfold(1, N, 1)[rows, start]
    rolled = window * gain if pcm else window.mul_(gain)  # int16 * float32 -> float32; else a new tensor, in place
    if full:
        return rolled
    keep = torch.arange(N, device=audio.device) < lengths.unsqueeze(1)
    rest = audio * PCM_SCALE if pcm else audio
    return torch.where(keep, rolled, rest, out=None if audio.requires_grad else rolled)  # out= has no autograd


def noise_aug(fbank: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """SPC-2's fbank noise (upstream ``noise=true``) on normalised (B, 1, T, F) features: per clip ``x + U^(T,F) * u /
    10`` with every ``U`` and the clip's ``u`` uniform in [0, 1), then a circular roll along time by an integer
    uniform in [-10, 9] (``torch.roll(x, randint(-10, 10), time)``). Returns a new tensor."""
    _check_fbank(fbank)
    check_generator(generator, fbank.device.type)
    B, _, T, Fb = fbank.shape
    level = _rand((B, 1, 1, 1), fbank, generator) * NOISE_SCALE
    noisy = fbank + (_rand((B, 1, T, Fb), fbank, generator) * level).to(fbank.dtype)
    shift = torch.randint(-NOISE_SHIFT, NOISE_SHIFT, (B, 1), generator=generator, device=fbank.device)
    src = torch.remainder(torch.arange(T, device=fbank.device).unsqueeze(0) - shift, T)  # torch.roll: out[t] = x[t-s]
    return torch.gather(noisy, 2, src.view(B, 1, T, 1).expand(B, 1, T, Fb))


def spec_augment(fbank: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Upstream's ``spectrogram_augment`` with ``mask_ratio`` r on (B, 1, T, F) features: per clip one frequency mask,
    then one time mask, each set to 0, drawn as torchaudio's ``mask_along_axis_iid`` draws them: for a bound ``m``
    (``128 r`` bins, ``T r`` frames) ``v = U m`` and ``s = U' (size - v)``, the masked span is ``[floor(s), floor(s) +
    floor(v))``, so its width is ``floor(U m)`` (uniform over 0 .. ceil(m) - 1, the top value less likely when m is
    not an integer) and the last bin / frame is never masked. r = 0 returns the input itself, else a new tensor."""
    _check_fbank(fbank)
    check_generator(generator, fbank.device.type)
    r = check_real("mask_ratio", mask_ratio, minimum=0.0)
    if r >= 1:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    if r == 0:
        return fbank
    B, _, T, Fb = fbank.shape

    def span(size: int, bound: float) -> torch.Tensor:  # (B, size) bool: the masked positions of each clip
        u = _rand((2, B, 1), fbank, generator)
        value = u[0] * bound
        start = (u[1] * (size - value)).floor()
        pos = torch.arange(size, device=fbank.device, dtype=torch.float32)
        return (pos >= start) & (pos < start + value.floor())

    freq = span(Fb, MEL_BINS * r).view(B, 1, 1, Fb)
    time = span(T, T * r).view(B, 1, T, 1)
    return torch.where(freq | time, 0.0, fbank)  # masked_fill(freq | time, 0), faster on the CPU


def mixup(fbank: torch.Tensor, targets: torch.Tensor, alpha: float, prob: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's batch-mode ``Mixup``: with probability ``prob`` one ``lam ~ Beta(alpha, alpha)`` for the whole
    batch, else ``lam = 1``; ``x = lam x + (1 - lam) x.flip(0)`` and the same for ``targets`` (no label smoothing:
    upstream's ``mixup_target`` leaves the targets as given). ``fbank`` (B, ...) with B even (upstream asserts it),
    ``targets`` (B, C) float. ``alpha`` 0 returns the inputs. Returns new tensors."""
    check_tensor("fbank", fbank, dtypes=FLOAT_DTYPES)
    check_tensor("targets", targets, ndim=2, dtypes=FLOAT_DTYPES, device=fbank.device)
    check_generator(generator, fbank.device.type)
    a = check_real("alpha", alpha, minimum=0.0)
    p = check_real("prob", prob, minimum=0.0, maximum=1.0)
    B = fbank.shape[0] if fbank.dim() else 0
    if targets.shape[0] != B:
        raise ValueError(f"targets must have one row per clip ({B}), got shape {tuple(targets.shape)}")
    if B % 2:
        raise ValueError(f"mixup needs an even batch size (upstream's Mixup asserts it), got {B}")
    if a == 0:
        return fbank, targets
    u = _rand((1,), fbank, generator)
    lam = torch.where(u < p, _beta(a, 1, fbank, generator), 1.0)  # (1,)
    lam_x = lam.to(fbank.dtype).view((1,) * fbank.dim())
    lam_t = lam.to(targets.dtype).view(1, 1)
    mixed = (fbank * lam_x).add_(fbank.flip(0).mul_(1 - lam_x))  # lam x + (1 - lam) x.flip(0), in new buffers
    return mixed, targets * lam_t + targets.flip(0) * (1 - lam_t)


def smooth_targets(targets: torch.Tensor, eps: float, multilabel: bool) -> torch.Tensor:
    """Label smoothing: single-label ``t (1 - eps) + eps / C`` (``F.cross_entropy(label_smoothing=eps)``'s target),
    multi-label ``t (1 - eps) + eps / 2`` per class (each class a two-way choice; upstream never smooths its BCE
    targets). ``eps`` 0 returns ``targets``."""
    check_tensor("targets", targets, ndim=2, dtypes=FLOAT_DTYPES)
    e = check_real("eps", eps, minimum=0.0)
    if e >= 1:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    if e == 0:
        return targets
    return targets * (1 - e) + e / (2 if multilabel else targets.shape[1])


def finetune_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """The training loss in float32: ``"bce"`` = ``binary_cross_entropy_with_logits`` averaged over every clip and
    class; ``"ce"`` = soft-target cross-entropy ``-(targets * log_softmax(logits)).sum(-1)`` averaged over clips (=
    ``F.cross_entropy`` for one-hot or smoothed targets). ``logits`` and ``targets`` are (B, C).

    Upstream sums the per-element losses and divides by the criterion's ``sample_size``: the number of positive labels
    for AudioSet's BCE, the clip count for ESC-50's CE and SPC-2's BCE; that is a constant factor per batch (C, or
    about C / labels per clip, for BCE), which Adam's update does not see apart from ``adam_eps``. Its
    ``nan_to_num`` on the logits is left out, so a non-finite forward reaches the trainer's non-finite check."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("targets", targets, ndim=2, dtypes=FLOAT_DTYPES, device=logits.device)
    if targets.shape != logits.shape:
        raise ValueError(f"targets {tuple(targets.shape)} and logits {tuple(logits.shape)} must have the same shape")
    x, t = logits.float(), targets.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(x, t)
    if kind == "ce":
        return -(t * F.log_softmax(x, dim=-1)).sum(-1).mean()
    raise ValueError(f"kind must be 'bce' or 'ce', got {kind!r}")
