"""The fbank kernel's ``tf32x3`` dots, emulated on CPU, against torchaudio's per-clip Kaldi fbank.

On the GPU, ``kernels/kaldi_fbank.py`` runs its DFT and mel products as ``tl.dot(..., input_precision="tf32x3")``
(``DOT_PRECISION``); the Triton interpreter computes every dot in fp32, so the other CPU tests never see the precision
the GPU uses. Here the kernel's arithmetic is replayed in torch with each ``tl.dot`` replaced by what Triton 3.8 makes
of it for sm_90. Read from the TTGIR of an sm_90 compile (pass ``TritonGPUF32DotTC``) of ``tl.dot(a, b, acc,
input_precision="tf32x3")``:

    a_big = cvt.rna.tf32.f32(a)    a_small = a - a_big       (the same for b; fp32 subtractions, exact)
    d = dot_tf32(a_small, b_big, 0)
    d = dot_tf32(a_big, b_small, d)
    d = where(isnan(d), 0, d)
    d = dot_tf32(a_big, b_big, d)
    result = d + acc

``cvt.rna`` rounds to nearest, ties away from zero. A ``dot_tf32`` is a wgmma ``.tf32`` on fp32 registers: ``a_big`` is
already TF32; ``a_small`` is not rounded by Triton, so the tensor core reads a full fp32 value as TF32, which it does
by keeping the top 10 mantissa bits (truncation, the usual reading); plain ``input_precision="tf32"`` hands a and b to
the tensor core the same way, with no ``cvt`` at all. Products of TF32 values are exact in fp32; the tensor core's
sums are modelled as fp32 sums. As the treatment of the 13 low bits of a non-TF32 operand is not documented in
detail, every verdict here is checked with both readings: truncation (``"truncate"``) and round to nearest
(``"rna"``).

The accuracy tests replay the kernel's own ``DOT_PRECISION`` ("tf32x3" today), so a switch of the module to "tf32"
fails them. The tolerances are the project's for the Triton fbank (README, tests/test_kaldi_fbank_triton.py): max
abs 5e-3 and mean abs 1e-5 on the log-mel, on well-conditioned signals; pure tones must be at least as close to the
exact (float64) DFT as torch's fp32 rFFT is. The control: the same emulation with plain ``"tf32"`` must miss those
tolerances (the module docstring: TF32 log-mel errors of 0.1 to 6), so the comparison tells the precisions apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

kaldi = pytest.importorskip("torchaudio.compliance.kaldi")
pytest.importorskip("triton")

import sslam_fast.kernels.kaldi_fbank as fbk  # noqa: E402
from fbank_oracle import exact_logmel  # noqa: E402

from sslam_fast.reference import kaldi_fbank as ref  # noqa: E402

MAX_TOL, MEAN_TOL = 5e-3, 1e-5  # the Triton fbank's tolerances on the log-mel (tests/test_kaldi_fbank_triton.py)
P16 = ref.FrameParams.at(16000)  # 400 / 160 / 512
NUM_BINS = 128
KALDI_ARGS = dict(htk_compat=True, use_energy=False, window_type="hanning", dither=0.0, frame_shift=10)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OPERAND_READS = ["truncate", "rna"]


# --- TF32 -------------------------------------------------------------------------------------------------------------

_LOW13 = 0x1FFF  # fp32 keeps 23 mantissa bits, TF32 the top 10


def tf32_rna(x: torch.Tensor) -> torch.Tensor:
    """``cvt.rna.tf32.f32``: round to the nearest TF32, ties away from zero (finite inputs). Adding half a TF32 ulp
    to the magnitude bits (the sign bit is apart) and clearing the 13 low bits does exactly that."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~_LOW13).view(torch.float32)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """The top 19 bits of an fp32 value (rounding toward zero to TF32)."""
    return (x.contiguous().view(torch.int32) & ~_LOW13).view(torch.float32)


def tc_dot(a, b, acc, precision: str, operand: str = "truncate"):
    """``tl.dot(a, b, acc, input_precision=precision)`` of fp32 operands as the GPU computes it (module docstring)."""
    read = tf32_truncate if operand == "truncate" else tf32_rna  # how a tensor core reads a non-TF32 fp32 register
    if precision == "ieee":
        return acc + a @ b
    if precision == "tf32":
        return acc + read(a) @ read(b)
    assert precision == "tf32x3", precision
    a_big, b_big = tf32_rna(a), tf32_rna(b)
    a_small, b_small = a - a_big, b - b_big
    d = read(a_small) @ b_big
    d = a_big @ read(b_small) + d
    d = torch.where(torch.isnan(d), torch.zeros((), dtype=d.dtype), d)
    return (a_big @ b_big + d) + acc


# --- the kernel's arithmetic ------------------------------------------------------------------------------------------


def kernel_logmel(x, lengths, precision, *, operand="truncate", split=None, offsets=None, num_bins=NUM_BINS, p=P16):
    """(sum of frames, num_bins) float32: the log-mel of every valid frame of every row, row after row, computed as
    ``_fbank_fwd_kernel`` computes it with the module's block sizes, operands (``_dft_basis``, ``_mel_operand``) and
    DFT form (``DFT_SPLIT`` unless ``split`` is given), each ``tl.dot`` replaced by ``tc_dot(precision)``."""
    split = fbk.DFT_SPLIT if split is None else split
    bk, bf = fbk.BLOCK_K, fbk.BLOCK_F
    L, S, half = p.frame_length, p.frame_shift, p.n_fft // 2
    banks = ref.mel_banks(num_bins, p.n_fft)
    block_m = max(16, 1 << (num_bins - 1).bit_length())
    _, k_pad, f_pad = fbk._geometry(L, p.n_fft, split)
    basis = fbk._dft_basis(L, p.n_fft, split, torch.device("cpu"))
    mel_op = fbk._mel_operand(banks, p.n_fft, split, block_m)
    window = ref.hanning(L)
    offsets = torch.zeros(x.shape[0]) if offsets is None else offsets

    frames = []
    for b, n in enumerate(lengths.tolist()):
        count = p.num_frames(n)
        if count:
            frames.append(x[b].unfold(0, L, S)[:count] - offsets[b])
    xo = torch.cat(frames)  # x - offset, (T, L)
    # Per-frame mean: sums of BLOCK_K samples, added block after block.
    blocks = torch.nn.functional.pad(xo, (0, -L % bk)).view(xo.shape[0], -1, bk).sum(-1)
    total = torch.zeros(xo.shape[0])
    for j in range(blocks.shape[1]):
        total = total + blocks[:, j]
    y = xo - (total / L)[:, None]
    y_prev = torch.cat([y[:, :1], y[:, :-1]], dim=1)  # y[-1] := y[0]
    e = (y - fbk.PREEMPHASIS * y_prev) * window
    width = k_pad + (half if split else 0)
    e = torch.nn.functional.pad(e, (0, max(0, width - L)))  # zero for n >= FRAME_LENGTH
    if split:  # one decimation-in-frequency butterfly: u = y[n] + y[n + H], d = y[n] - y[n + H]
        lo, hi = e[:, :k_pad], e[:, half : half + k_pad]
        operands = [(lo + hi, basis[0], basis[1]), (lo - hi, basis[2], basis[3])]
    else:
        operands = [(e[:, :k_pad], basis[0], basis[1])]

    mel = torch.zeros(xo.shape[0], block_m)
    for f0 in range(0, f_pad, bf):
        powers = []
        for a, cos, sin in operands:
            re = torch.zeros(xo.shape[0], bf)
            im = torch.zeros(xo.shape[0], bf)
            for k0 in range(0, k_pad, bk):
                chunk = a[:, k0 : k0 + bk]
                re = tc_dot(chunk, cos[k0 : k0 + bk, f0 : f0 + bf], re, precision, operand)
                im = tc_dot(chunk, sin[k0 : k0 + bk, f0 : f0 + bf], im, precision, operand)
            powers.append(re * re + im * im)
        for part, power in enumerate(powers):
            mel = tc_dot(power, mel_op[part, f0 : f0 + bf], mel, precision, operand)
    return torch.log(torch.clamp_min(mel, fbk.LOG_FLOOR))[:, :num_bins]


def torchaudio_logmel(x, lengths) -> torch.Tensor:
    """torchaudio's Kaldi fbank of each row's valid samples (the upstream per-clip loop), frames concatenated."""
    rows = [
        kaldi.fbank(x[b, :n][None], sample_frequency=16000, num_mel_bins=NUM_BINS, **KALDI_ARGS)
        for b, n in enumerate(lengths.tolist())
        if n >= P16.frame_length
    ]
    return torch.cat(rows)


# --- signals ----------------------------------------------------------------------------------------------------------

SECOND = 16000


def make_signal(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / SECOND
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    f0 = 150.0 + 97.0 * seed
    tones = 0.5 * torch.sin(2 * math.pi * f0 * t) + 0.2 * torch.sin(2 * math.pi * 3001.5 * t + 1.0)
    sweep = 0.4 * torch.sin(2 * math.pi * (100.0 * t + 0.5 * (0.45 * SECOND - 100.0) / (n / SECOND) * t * t))
    tail = (torch.arange(n) < n // 2).double()  # digital silence in the second half
    x = {
        "noise": 0.3 * noise,
        "tones_over_noise": tones + 0.05 * noise,
        "chirp_over_noise": sweep + 0.03 * noise,
        "near_silence": 1e-6 * noise,
        "faint_noise": 3e-5 * noise,  # mel energies around the log floor
        "clipped_square": torch.clamp(3.0 * torch.sign(torch.sin(2 * math.pi * (60.0 + 13 * seed) * t)), -1.0, 1.0),
        "noise_then_silence": 0.3 * noise * tail,
        "tones_then_silence": (tones + 0.05 * noise) * tail,
        "pure_tones": tones,
        "pure_chirp": sweep,
    }[kind]
    return x.to(torch.float32)


WELL_CONDITIONED = [
    "noise", "tones_over_noise", "chirp_over_noise", "near_silence", "faint_noise", "clipped_square",
    "noise_then_silence", "tones_then_silence",
]  # fmt: skip
LENGTHS = [SECOND, 12345, 400]  # 1 s, a ragged row, exactly one frame


def batch(kind: str, lengths=LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        x[i, :n] = make_signal(kind, n, seed=i + 1)
    return x, torch.tensor(lengths)


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    err = (got.double() - want.double()).abs()
    assert torch.isfinite(err).all()
    return err.max().item(), err.mean().item()


def within(max_err: float, mean_err: float) -> bool:
    return max_err <= MAX_TOL and mean_err <= MEAN_TOL


# --- tests ------------------------------------------------------------------------------------------------------------


def test_tf32_conversions():
    one = 1.0
    ulp = 2.0**-10  # TF32 ulp at 1
    x = torch.tensor([one + ulp / 2, -(one + ulp / 2), one + ulp / 2 - 2.0**-23, one + ulp - 2.0**-23, 3.0e38])
    assert tf32_rna(x).tolist()[:4] == [one + ulp, -(one + ulp), one, one + ulp]  # ties away from zero
    assert tf32_truncate(x).tolist()[:4] == [one, -one, one, one]
    v = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-20, 20, 10000)
    big = tf32_rna(v)
    assert torch.equal(big, tf32_truncate(big)) and torch.equal(big + (v - big), v)  # an exact split
    assert ((v - big).abs() <= big.abs() * 2.0**-11).all()


@pytest.mark.parametrize("split", [True, False], ids=["split", "direct"])
def test_emulation_is_the_kernel_math(split, monkeypatch):
    """With fp32 dots (what the interpreter computes) the emulation equals the interpreted kernel, so it replays the
    kernel's formulation (framing, DC removal, pre-emphasis, DFT form, operands, blocking) and not some other fbank.
    Interpreter-sized blocks keep the run short; the blocking only changes the order of fp32 sums."""
    if not fbk._is_interpreted():
        pytest.skip("compares with the interpreter's fp32 dots")
    for name, value in {"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_F": 64, "DFT_SPLIT": split}.items():
        monkeypatch.setattr(fbk, name, value)
    lengths = [39 * 160 + 400, 3001]
    for kind in ("noise", "tones_over_noise"):
        x, lens = batch(kind, lengths)
        offsets = torch.tensor([0.01, -0.2])
        p = P16
        got = fbk.fbank_triton(x, lens, offsets, ref.hanning(400), ref.mel_banks(NUM_BINS, 512), p.frame_length,
                               p.frame_shift, p.n_fft, 40, 40, 0.0, 1.0)  # fmt: skip
        kernel = torch.cat([got[0, :40], got[1, :17]])
        emulated = kernel_logmel(x, lens, "ieee", offsets=offsets)
        max_err, mean_err = errors(emulated, kernel)
        # Two fp32 evaluations of the same sums in different orders (numpy's and torch's matmuls): measured 1.1e-4
        # max and 4e-7 mean, all in bands ~100 dB under the frame's peak, where the log magnifies fp32 rounding. A slip
        # in the formulation (window, pre-emphasis, a butterfly term, an operand row) moves whole bands by >> 1e-3.
        assert max_err <= 1e-3 and mean_err <= 1e-6, (kind, max_err, mean_err)


@pytest.mark.parametrize("operand", OPERAND_READS)
@pytest.mark.parametrize("split", [True, False], ids=["split", "direct"])
@pytest.mark.parametrize("kind", WELL_CONDITIONED)
def test_tf32x3_matches_torchaudio(kind, split, operand):
    x, lengths = batch(kind)
    got = kernel_logmel(x, lengths, fbk.DOT_PRECISION, operand=operand, split=split)
    max_err, mean_err = errors(got, torchaudio_logmel(x, lengths))
    assert max_err <= MAX_TOL, f"{kind}: max abs error {max_err:.3g} > {MAX_TOL}"
    assert mean_err <= MEAN_TOL, f"{kind}: mean abs error {mean_err:.3g} > {MEAN_TOL}"


@pytest.mark.parametrize("operand", OPERAND_READS)
@pytest.mark.parametrize("kind", ["pure_tones", "pure_chirp"])
def test_tf32x3_pure_tones_as_close_to_exact_as_torchaudio(kind, operand):
    """Most mel bands of a pure tone sit 100-150 dB under its peak, where any fp32 DFT's rounding dominates (see
    tests/fbank_oracle.py): there tf32x3 must be about as close to the exact DFT as torch's fp32 rFFT."""
    lengths = [39 * 160 + 400, 4000]
    x, lens = batch(kind, lengths)
    got = kernel_logmel(x, lens, fbk.DOT_PRECISION, operand=operand)
    exact = exact_logmel(x, lens, 40, ref.mel_banks(NUM_BINS, 512))
    exact = torch.cat([exact[0, :40], exact[1, :23]])
    err_kernel = (got.double() - exact).abs()
    err_ref = (torchaudio_logmel(x, lens).double() - exact).abs()
    assert err_kernel.max() <= MAX_TOL, f"{kind}: max abs error vs exact {err_kernel.max():.3g}"
    assert err_kernel.mean() <= 1.5 * err_ref.mean() + MEAN_TOL, (
        f"{kind}: mean abs error vs exact {err_kernel.mean():.3g}, torchaudio's {err_ref.mean():.3g}"
    )


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data recordings not present")
@pytest.mark.parametrize("operand", OPERAND_READS)
def test_tf32x3_real_recordings(operand):
    """The repository's recordings, whole (10-12 s), resampled to 16 kHz as upstream does."""
    sf = pytest.importorskip("soundfile")
    import torchaudio.functional as AF

    for name in ("sslam_test_32k.wav", "sslam_infer_32k.wav", "librispeech_16k.flac"):
        audio, sr = sf.read(str(DATA / name), dtype="float32")
        x = torch.from_numpy(audio)
        x = x.mean(dim=1) if x.dim() == 2 else x
        x = AF.resample(x, sr, 16000) if sr != 16000 else x
        x = (x - x.mean())[None]  # the clip mean removal of eat_features (the op passes it as the row offset)
        lengths = torch.tensor([x.shape[1]])
        got = kernel_logmel(x, lengths, fbk.DOT_PRECISION, operand=operand)
        max_err, mean_err = errors(got, torchaudio_logmel(x, lengths))
        assert within(max_err, mean_err), f"{name}: max abs {max_err:.3g}, mean abs {mean_err:.3g}"


@pytest.mark.parametrize("operand", OPERAND_READS)
def test_tf32_alone_misses_the_tolerance(operand):
    """The control: with single TF32 dots the same emulation fails the tolerance, so the tests above discriminate."""
    report = {}
    for kind in WELL_CONDITIONED:
        x, lengths = batch(kind)
        report[kind] = errors(kernel_logmel(x, lengths, "tf32", operand=operand), torchaudio_logmel(x, lengths))
    failing = {kind: e for kind, e in report.items() if not within(*e)}
    assert failing, f"TF32 passes the fbank tolerance on every signal: {report}"
    # The module docstring's claim: TF32 errors of 0.1 and more on the log-mel.
    assert max(e[0] for e in report.values()) >= 0.1, report
