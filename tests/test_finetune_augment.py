"""Fine-tuning augmentations and losses (sslam_fast.finetune.augment): upstream's distributions, per-clip
independence, generator reproducibility, device placement and no host sync."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio
from torch.utils._python_dispatch import TorchDispatchMode

from sslam_fast._checks import value_checks
from sslam_fast.finetune.augment import finetune_loss, mixup, noise_aug, roll_aug, smooth_targets, spec_augment

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa, fb = np.searchsorted(a, grid, "right") / len(a), np.searchsorted(b, grid, "right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def ks_bound(n: int, m: int) -> float:
    return 1.95 * np.sqrt((n + m) / (n * m))  # the 0.1 % critical value


# --- roll_aug ---------------------------------------------------------------------------------------------------


def roll_parts(out: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor):
    """(offsets, gains) of each row of roll_aug(audio) for rows holding 1, 2, ..., L (distinct, positive)."""
    offsets, gains = [], []
    for b in range(out.shape[0]):
        L = int(lengths[b])
        x, y = audio[b, :L].double(), out[b, :L].double()
        gain = y.sum() / x.sum()
        k = int(torch.argmin(y))  # where the 1 went: np.roll moves index 0 to the offset
        assert torch.allclose(y, torch.roll(x, k) * gain, rtol=1e-5, atol=1e-4), b
        offsets.append(k)
        gains.append(float(gain))
    return np.array(offsets), np.array(gains)


def test_roll_aug_is_a_circular_roll_of_the_valid_part_with_a_beta_gain():
    B, N = 4000, 40
    lengths = torch.randint(5, N + 1, (B,))
    lengths[:3] = torch.tensor([N, 5, 1])
    audio = torch.where(torch.arange(N) < lengths[:, None], torch.arange(1, N + 1, dtype=torch.float32), 0.0)
    audio[:, -1] = torch.where(lengths < N, torch.full((B,), 7.0), audio[:, -1])  # non-zero padding stays untouched
    out = roll_aug(audio, lengths, gen(1))
    assert out.shape == audio.shape and out.dtype == audio.dtype
    pad = torch.arange(N) >= lengths[:, None]
    assert torch.equal(out[pad], audio[pad])
    offsets, gains = roll_parts(out, audio, lengths)
    assert gains.min() >= 0.5 and gains.max() <= 1.5
    ref = np.random.default_rng(0).beta(10, 10, size=20000) + 0.5
    assert ks_two_sample(gains, ref) < ks_bound(len(gains), len(ref))
    assert abs(gains.mean() - 1.0) < 0.01 and abs(gains.var() - 100 / (400 * 21)) < 0.0015
    # offsets uniform in [0, L): the fraction offset / L is uniform in [0, 1) for every row length
    frac = offsets / lengths.numpy()
    assert (offsets < lengths.numpy()).all() and (offsets >= 0).all()
    assert ks_two_sample(frac[3:], (np.floor(np.random.default_rng(1).random(20000) * 40) / 40)) < 0.06
    assert len(set(offsets[lengths.numpy() == N])) > N // 2  # clips draw their own offsets


def test_roll_aug_full_rows_by_default_and_reproducible():
    audio = torch.randn(8, 100)
    a = roll_aug(audio, None, gen(5))
    assert torch.equal(a, roll_aug(audio, None, gen(5)))
    assert not torch.equal(a, roll_aug(audio, None, gen(6)))
    assert torch.allclose(a.pow(2).sum(1) / audio.pow(2).sum(1), (a.abs().max(1).values / audio.abs().max(1).values)
                          ** 2, rtol=1e-4)  # a roll times one gain per row
    with pytest.raises(ValueError, match="lengths"):
        roll_aug(audio, torch.full((8,), 101), gen())
    with pytest.raises(ValueError, match="lengths must have one entry per row"):
        roll_aug(audio, torch.full((3,), 10), gen())
    with pytest.raises(ValueError, match="dimensions"):
        roll_aug(audio[0], None, gen())


def roll_aug_by_indices(audio: torch.Tensor, lengths, generator) -> torch.Tensor:
    """roll_aug as per-sample index arithmetic, ``gather(x, (j - offset) mod len)``, from the same draws in the same
    order: the oracle of the row-window implementation."""
    from sslam_fast._checks import check_lengths
    from sslam_fast.finetune.augment import ROLL_GAIN_BETA, _beta

    B, N = audio.shape
    lengths = check_lengths(lengths, B, N, audio.device)
    n = lengths.clamp_min(1).unsqueeze(1)
    offset = torch.randint(0, 2**62, (B, 1), generator=generator, device=audio.device) % n
    gain = (_beta(ROLL_GAIN_BETA, B, audio, generator) + 0.5).unsqueeze(1)
    j = torch.arange(N, device=audio.device).unsqueeze(0)
    src = torch.remainder(j - offset, n)
    rolled = torch.gather(audio, 1, torch.where(j < n, src, j)) * gain.to(audio.dtype)
    return torch.where(j < lengths.unsqueeze(1), rolled, audio)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bit patterns (NaN payloads and signed zeros included)."""
    int_type = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
                torch.float64: torch.int64}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(int_type), b.view(int_type))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roll_aug_is_bit_identical_to_per_sample_indices(device, dtype):
    data = gen(11)
    for trial, (B, N) in enumerate([(64, 37), (33, 1), (16, 4096), (5, 2), (0, 9), (3, 0)]):
        audio = (torch.randn(B, N, generator=data) * 3).to(dtype)
        if B * N:  # specials: signed zero, infinities, NaN keep their bits
            flat = audio.view(-1)
            flat[torch.randint(0, B * N, (4,), generator=data)] = torch.tensor(
                [-0.0, float("inf"), float("-inf"), float("nan")], dtype=dtype)
        audio = audio.to(device)
        lengths = torch.randint(0, N + 1, (B,), generator=data)
        lengths[: min(B, 3)] = torch.tensor([0, min(1, N), N])[: min(B, 3)]  # the edges: empty, one sample, full
        for lens in (lengths.to(device), None, torch.full((B,), N, device=device, dtype=torch.int32)):
            g_new, g_old = gen(trial, device), gen(trial, device)
            new, old = roll_aug(audio, lens, g_new), roll_aug_by_indices(audio, lens, g_old)
            assert same_bits(new, old), (B, N, lens)
            assert torch.equal(g_new.get_state(), g_old.get_state())  # the same draws, nothing more
            assert new.data_ptr() != audio.data_ptr() or new.numel() == 0
    audio = torch.randn(8, 64, generator=data).to(dtype).to(device)  # the comparison sees a different draw
    assert not same_bits(roll_aug(audio, None, gen(1, device)), roll_aug_by_indices(audio, None, gen(2, device)))


@pytest.mark.parametrize("device", DEVICES)
def test_roll_aug_of_int16_pcm_is_bit_identical_to_the_float_read(device):
    """int16 input: the same bits as rolling soundfile's float read ``x / 32768`` (the scale folded into the gain)."""
    data = gen(12)
    for trial, (B, N) in enumerate([(64, 37), (16, 4096), (4, 1), (2, 0)]):
        pcm = torch.randint(-32768, 32768, (B, N), generator=data, dtype=torch.int32).to(torch.int16)
        if B * N:
            pcm.view(-1)[:3] = torch.tensor([-32768, 32767, 0], dtype=torch.int16)[: B * N]
        pcm = pcm.to(device)
        lengths = torch.randint(0, N + 1, (B,), generator=data)
        lengths[: min(B, 3)] = torch.tensor([0, min(1, N), N])[: min(B, 3)]
        for lens in (lengths.to(device), None):
            g_new, g_old = gen(trial, device), gen(trial, device)
            new = roll_aug(pcm, lens, g_new)
            old = roll_aug_by_indices(pcm.float() * (1.0 / 32768.0), lens, g_old)
            assert new.dtype == torch.float32 and same_bits(new, old), (B, N, lens)
            assert torch.equal(g_new.get_state(), g_old.get_state())
    with pytest.raises(TypeError, match="audio"):
        roll_aug(pcm.to(torch.int32), None, gen())


def test_roll_aug_keeps_autograd_through_the_roll():
    audio = torch.randn(4, 50, requires_grad=True)
    lengths = torch.tensor([50, 20, 1, 0])
    out = roll_aug(audio, lengths, gen(4))
    assert same_bits(out.detach(), roll_aug_by_indices(audio.detach(), lengths, gen(4)))
    (out * torch.arange(200.0).view(4, 50)).sum().backward()
    expect = torch.func.vjp(lambda a: roll_aug_by_indices(a, lengths, gen(4)), audio.detach())[1](
        torch.arange(200.0).view(4, 50))[0]
    assert torch.equal(audio.grad, expect)


# --- noise_aug ----------------------------------------------------------------------------------------------------


def test_noise_aug_adds_scaled_uniform_noise_then_rolls_time_by_minus10_to_9():
    B, T, Fb = 3000, 40, 8
    base = (torch.arange(T, dtype=torch.float32) * 10.0).view(1, 1, T, 1).expand(B, 1, T, Fb).contiguous()
    out = noise_aug(base, gen(2))
    shifts = torch.remainder(-torch.floor(out[:, 0, 0, 0] / 10.0).long(), T)  # out[0] = x[-s] + noise < 0.1
    shifts = torch.where(shifts >= T // 2, shifts - T, shifts)
    rolled = torch.stack([torch.roll(base[b], int(shifts[b]), 1) for b in range(B)])
    noise = (out - rolled).double()
    assert noise.min() >= 0 and noise.max() < 0.1 + 1e-3
    s = shifts.numpy()
    assert s.min() == -10 and s.max() == 9  # randint(-10, 10): the high end is excluded
    counts = np.bincount(s + 10, minlength=20)
    assert counts.min() > B / 20 * 0.7 and counts.max() < B / 20 * 1.3
    level = noise.amax(dim=(1, 2, 3)).numpy() / 0.1  # the clip's u: the max of T*F uniforms times u ~ u
    assert ks_two_sample(level, np.random.default_rng(3).random(20000)) < 0.05
    per_clip_mean = noise.mean(dim=(1, 2, 3)).numpy()
    assert abs(per_clip_mean.mean() - 0.025) < 0.002  # E[U u / 10] = 0.5 * 0.5 / 10


# --- spec_augment -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r, T", [(0.2, 96), (0.4, 512), (0.2, 128)])
def test_spec_augment_equals_upstreams_torchaudio_masks_on_the_same_random_stream(r, T):
    """Upstream's spectrogram_augment (FrequencyMasking(128 r) then TimeMasking(T r), iid_masks, on the transposed
    input) with the same default-generator stream gives exactly the same output."""
    x = torch.randn(16, 1, T, 128)
    torch.manual_seed(7)
    fm = torchaudio.transforms.FrequencyMasking(128 * r, iid_masks=True)
    tm = torchaudio.transforms.TimeMasking(T * r, iid_masks=True)
    ref = tm(fm(x.transpose(2, 3))).transpose(2, 3)
    torch.manual_seed(7)
    assert torch.equal(spec_augment(x, r, None), ref)


def mask_widths(out: torch.Tensor):
    m = out[:, 0] == 0  # (B, T, F)
    full_t = m.all(dim=2)  # masked time frames
    full_f = m.all(dim=1)  # masked frequency bins
    return full_t.sum(1).numpy(), full_f.sum(1).numpy(), full_t, full_f


def test_spec_augment_widths_are_uniform_and_drawn_per_clip():
    B, T, Fb, r = 6000, 40, 128, 0.2
    out = spec_augment(torch.ones(B, 1, T, Fb), r, gen(4))
    wt, wf, full_t, full_f = mask_widths(out)
    # the zeros are exactly one frequency band and one time band per clip
    assert torch.equal(out[:, 0] == 0, full_t[:, :, None] | full_f[:, None, :])
    for full in (full_t, full_f):
        d = torch.diff(full.int(), dim=1).abs().sum(1)
        assert int(d.max()) <= 2  # contiguous
    # widths floor(U m): P(k) = 1/m for k < floor(m), the rest for floor(m)
    for w, m in ((wf, Fb * r), (wt, T * r)):
        k = np.arange(int(np.ceil(m)))
        p = (np.minimum(k + 1, m) - k) / m  # P(floor(U m) = k)
        counts = np.bincount(w, minlength=len(p))
        assert len(counts) == len(p)
        chi2 = float(((counts - B * p) ** 2 / (B * p)).sum())
        assert chi2 < 60, chi2  # df <= 25: the 0.1 % critical value is 52.6
    assert abs(np.corrcoef(wt, wf)[0, 1]) < 0.06  # independent frequency and time masks
    assert len(set(zip(wt[:50], wf[:50]))) > 30  # each clip its own masks


def test_spec_augment_mask_positions_cover_the_axis_but_its_last_index():
    """torchaudio's start floor(U' (size - v)) and width floor(v) can reach every index but the last one."""
    out = spec_augment(torch.ones(4000, 1, 64, 128), 0.2, gen(8))
    _, _, full_t, full_f = mask_widths(out)
    assert full_f[:, :-1].any(0).all() and full_t[:, :-1].any(0).all()
    assert not full_f[:, -1].any() and not full_t[:, -1].any()


def test_spec_augment_zero_ratio_and_bad_input():
    x = torch.randn(2, 1, 32, 128)
    assert spec_augment(x, 0.0, gen()) is x
    with pytest.raises(ValueError, match="mask_ratio"):
        spec_augment(x, 1.0, gen())
    with pytest.raises(ValueError, match="mask_ratio"):
        spec_augment(x, -0.1, gen())
    with pytest.raises(ValueError, match=r"\(B, 1, T, F\)"):
        spec_augment(torch.randn(2, 2, 32, 128), 0.2, gen())
    with pytest.raises(ValueError, match="dimensions"):
        spec_augment(torch.randn(32, 128), 0.2, gen())


# --- mixup --------------------------------------------------------------------------------------------------------


def test_mixup_lambda_distribution_probability_and_flip_partner():
    n, alpha, prob = 12000, 0.8, 0.9
    g = gen(9)
    x = torch.tensor([[1.0], [0.0], [0.0], [0.0]]).view(4, 1, 1, 1)
    t = torch.eye(4)
    lams = []
    for _ in range(n):
        xm, tm = mixup(x, t, alpha, prob, g)
        lam = float(xm[0])
        lams.append(lam)
        # one lambda for the batch, partner = the flipped batch, targets mixed the same way
        assert torch.allclose(tm, t * lam + t.flip(0) * (1 - lam))
        assert float(xm[3]) == pytest.approx(1 - lam, abs=1e-6)
    lams = np.array(lams)
    unmixed = lams == 1.0
    assert abs(unmixed.mean() - (1 - prob)) < 0.012  # 4.5 sd of a binomial share
    mixed = lams[~unmixed]
    ref = np.random.default_rng(4).beta(alpha, alpha, size=20000)
    assert ks_two_sample(mixed, ref) < ks_bound(len(mixed), len(ref))
    assert abs(mixed.mean() - 0.5) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixup_is_the_formula_bit_for_bit(dtype):
    """x lam + x.flip(0) (1 - lam) with lam cast to the features' dtype, exactly (lam read back from eye targets)."""
    x = torch.randn(6, 1, 16, 128, generator=gen(3)).to(dtype)
    x.view(-1)[:3] = torch.tensor([-0.0, float("inf"), float("nan")]).to(dtype)
    for seed in range(5):
        xm, tm = mixup(x, torch.eye(6), 0.8, 1.0, gen(seed))
        lam = tm[0, 0].view(1, 1, 1, 1).to(dtype)  # 1 * lam + 0 * (1 - lam) = lam
        assert same_bits(xm, x * lam + x.flip(0) * (1 - lam))


def test_mixup_prob_and_alpha_extremes_and_errors():
    x, t = torch.randn(4, 1, 16, 128), torch.rand(4, 5)
    g = gen(1)
    xa, ta = mixup(x, t, 0.8, 0.0, g)  # never mixed
    assert torch.equal(xa, x) and torch.equal(ta, t)
    xb, tb = mixup(x, t, 0.0, 1.0, g)  # alpha 0: off
    assert xb is x and tb is t
    xc, _ = mixup(x, t, 0.8, 1.0, g)
    assert not torch.equal(xc, x)
    with pytest.raises(ValueError, match="even"):
        mixup(x[:3], t[:3], 0.8, 0.9, g)
    with pytest.raises(ValueError, match="one row per clip"):
        mixup(x, t[:2], 0.8, 0.9, g)
    with pytest.raises(ValueError, match="prob"):
        mixup(x, t, 0.8, 1.5, g)


# --- targets and losses -------------------------------------------------------------------------------------------


def test_smooth_targets():
    t = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    single = smooth_targets(t[:1], 0.1, multilabel=False)
    assert torch.allclose(single, torch.tensor([[0.025, 0.925, 0.025, 0.025]]))
    multi = smooth_targets(t, 0.1, multilabel=True)
    assert torch.allclose(multi, t * 0.9 + 0.05)
    assert smooth_targets(t, 0.0, True) is t
    with pytest.raises(ValueError, match="eps"):
        smooth_targets(t, 1.0, False)


def test_losses_match_torch_and_upstream_forms():
    logits = torch.randn(6, 5, dtype=torch.float64).float()
    idx = torch.tensor([0, 3, 1, 4, 2, 2])
    onehot = F.one_hot(idx, 5).float()
    soft = torch.softmax(torch.randn(6, 5), -1)
    multi = (torch.rand(6, 5) > 0.5).float()
    assert torch.allclose(finetune_loss(logits, multi, "bce"), F.binary_cross_entropy_with_logits(logits, multi))
    assert torch.allclose(finetune_loss(logits, onehot, "ce"), F.cross_entropy(logits, idx))
    assert torch.allclose(finetune_loss(logits, soft, "ce"), (-soft * F.log_softmax(logits, -1)).sum(-1).mean())
    smoothed = smooth_targets(onehot, 0.1, multilabel=False)  # ESC-50: CE with label smoothing 0.1
    assert torch.allclose(finetune_loss(logits, smoothed, "ce"), F.cross_entropy(logits, idx, label_smoothing=0.1))
    half = finetune_loss(logits.half(), multi, "bce")
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="kind"):
        finetune_loss(logits, multi, "mse")
    with pytest.raises(ValueError, match="same shape"):
        finetune_loss(logits, multi[:, :3], "bce")


# --- device, generator and host syncs -----------------------------------------------------------------------------


class CountSyncs(TorchDispatchMode):
    """Counts the aten ops that read a tensor value back to the host."""

    SYNC = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC:
            self.count += 1
        return func(*args, **(kwargs or {}))


def run_all(device: str, generator):
    data = gen(100)
    audio = torch.randn(4, 3000, generator=data).to(device)
    lengths = torch.tensor([3000, 2000, 1000, 10], device=device)
    fbank = torch.randn(4, 1, 64, 128, generator=data).to(device)
    targets = torch.rand(4, 10, generator=data).to(device)
    outs = [roll_aug(audio, lengths, generator), noise_aug(fbank, generator), spec_augment(fbank, 0.2, generator)]
    xm, tm = mixup(fbank, targets, 0.8, 0.9, generator)
    outs += [xm, tm, smooth_targets(targets, 0.1, True), finetune_loss(xm[:, 0, 0, :10], tm, "bce"),
             finetune_loss(xm[:, 0, 0, :10], tm, "ce")]
    return outs


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_stay_on_the_device_and_nothing_syncs(device):
    g = gen(3, device)
    with value_checks(False), CountSyncs() as mode:  # the trainer's steady state (the lengths range check is off)
        outs = run_all(device, g)
    assert mode.count == 0
    assert all(o.device.type == device for o in outs)


def test_only_the_lengths_value_check_reads_values():
    """With value checks on (a direct call), the lengths range check is the one value read."""
    audio, lengths = torch.randn(2, 100), torch.tensor([100, 50])
    with CountSyncs() as mode:
        roll_aug(audio, lengths, gen())
    assert mode.count > 0
    with CountSyncs() as mode:
        roll_aug(audio, None, gen())
        spec_augment(torch.randn(2, 1, 32, 128), 0.2, gen())
        mixup(torch.randn(2, 1, 32, 128), torch.rand(2, 3), 0.8, 0.9, gen())
        noise_aug(torch.randn(2, 1, 32, 128), gen())
    assert mode.count == 0


def test_generator_draws_are_reproducible_and_device_checked():
    a = run_all("cpu", gen(11))
    b = run_all("cpu", gen(11))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = run_all("cpu", gen(12))
    assert not any(torch.equal(x, y) for x, y in zip(a[:5], c[:5]))  # every augmentation draws from the generator
    fbank = torch.randn(2, 1, 32, 128, device="meta")
    with pytest.raises(ValueError, match="generator"):
        spec_augment(fbank, 0.2, gen())
    with pytest.raises(TypeError, match="generator"):
        noise_aug(torch.randn(2, 1, 32, 128), generator=3)
