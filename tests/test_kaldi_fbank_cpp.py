"""torch.ops.sslam_fast_C.fbank on CPU (csrc/kaldi_fbank.cpp) against the plain-PyTorch reference; its input checks.

Tolerance: 1e-4 max abs on the log-mel. The kernel reproduces torch's float32 arithmetic up to and including the FFT
(frame mean in torch's summation order, torch's own rFFT), so it agrees with the reference to about 1e-6 even where
the float32 log-mel is ill-conditioned (low bands of pre-emphasised noise).
"""

import os
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import OPCHECK_ALL, needs_cpp

import sslam_fast.ops  # noqa: F401  (registers the fake of sslam_fast_C::fbank)
from sslam_fast.reference import kaldi_fbank as ref

pytestmark = needs_cpp("fbank")

TOL = 1e-4
SR = 16000
P = ref.FrameParams.at(SR)  # frame_length 400, frame_shift 160, n_fft 512


def fbank_cpu(x, lengths, offsets=None, num_frames=None, out_frames=None, shift=0.0, scale=1.0, mels=128):
    if offsets is None:
        offsets = torch.zeros(x.shape[0])
    if num_frames is None:
        num_frames = P.num_frames(x.shape[1])
    if out_frames is None:
        out_frames = num_frames
    return torch.ops.sslam_fast_C.fbank(
        x, lengths, offsets, ref.hanning(P.frame_length), ref.mel_banks(mels, P.n_fft, SR), P.frame_length,
        P.frame_shift, P.n_fft, num_frames, out_frames, shift, scale,
    )


def expected(x, lengths, offsets=None, num_frames=None, out_frames=None, shift=0.0, scale=1.0, mels=128):
    """(B, out_frames, M): (reference log-mel - shift) * scale on each row's own frames below num_frames, else
    (0 - shift) * scale."""
    B, N = x.shape
    if offsets is None:
        offsets = torch.zeros(B)
    if num_frames is None:
        num_frames = P.num_frames(N)
    if out_frames is None:
        out_frames = num_frames
    T = min(num_frames, out_frames, P.num_frames(N))
    logmel = ref.kaldi_fbank(x - offsets.unsqueeze(1), lengths, T, SR, mels)
    out = torch.full((B, out_frames, mels), (0.0 - shift) * scale)
    valid = torch.arange(T) < ref.frame_counts(lengths, P).unsqueeze(1)
    out[:, :T] = torch.where(valid.unsqueeze(-1), (logmel - shift) * scale, out[:, :T])
    return out


def check(x, lengths, **kw):
    got = fbank_cpu(x, lengths, **kw)
    want = expected(x, lengths, **kw)
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= TOL, f"max abs error {err:.3g} > {TOL}"
    return got


def full(B, N):
    return torch.full((B,), N, dtype=torch.int64)


def tones(N, freqs, amp=0.5):
    t = torch.arange(N, dtype=torch.float64) / SR
    return torch.stack([amp * torch.sin(2 * torch.pi * f * t) for f in freqs]).float()


# --- signals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amplitude", [0.1, 1.0, 1000.0])
def test_noise(amplitude):
    x = torch.randn(4, 16000) * amplitude  # 97 frames per row, 388 in all: two chunks of the FFT buffer
    check(x, full(4, 16000))


def test_tones():
    x = tones(12000, [440.0, 1000.0, 3150.5, 7900.0])
    check(x, full(4, 12000))


def test_chirp():
    N = 16000
    t = torch.arange(N, dtype=torch.float64) / SR
    f0, f1 = 50.0, 7500.0
    phase = 2 * torch.pi * (f0 * t + (f1 - f0) / (2 * t[-1]) * t**2)
    x = (0.8 * torch.sin(phase)).float().unsqueeze(0)
    check(x, full(1, N))


def test_near_silence():
    x = torch.randn(3, 8000) * 1e-6  # most bands at the log floor
    x[1] = 0.0  # exact silence: every band at log(eps)
    check(x, full(3, 8000))


def test_clipped_square():
    x = (3.0 * tones(9000, [300.0, 2500.0], amp=1.0)).clamp(-1.0, 1.0)
    check(x, full(2, 9000))


def test_ragged_lengths_and_offsets():
    N = 9000
    x = torch.randn(6, N) * 0.3 + 0.05
    lengths = torch.tensor([N, 300, 400, 7777, 0, 561], dtype=torch.int64)  # < 1 frame, exactly 1, ..., empty
    offsets = torch.tensor([0.05, -0.2, 0.0, 1.5, 0.3, 0.01])
    got = check(x, lengths, offsets=offsets)
    counts = ref.frame_counts(lengths, P)
    assert counts.tolist() == [P.num_frames(N), 0, 1, P.num_frames(7777), 0, 2]
    assert (got[1] == 0).all() and (got[4] == 0).all()  # rows without a frame are padding only
    assert (got[2, 1:] == 0).all()


@pytest.mark.parametrize(
    "num_frames, out_frames",
    [(None, None), (None, 60), (None, 80), (40, 70), (70, 40), (0, 10), (10, 0)],
)
def test_normalisation_and_frame_limits(num_frames, out_frames):
    N = 10000  # 61 frames
    x = torch.randn(3, N) * 0.2
    lengths = torch.tensor([N, 5000, 4100], dtype=torch.int64)
    nf = P.num_frames(N) if num_frames is None else num_frames
    of = nf if out_frames is None else out_frames
    got = check(x, lengths, num_frames=nf, out_frames=of, shift=-4.268, scale=1.0 / (2 * 4.569))
    assert got.shape == (3, of, 128)


def test_eat_clip():
    """A 10 s clip (998 frames), EAT's normalisation, frames padded to 1024."""
    x = torch.randn(2, 160000) * 0.1
    check(x, full(2, 160000), out_frames=1024, shift=-4.268, scale=1.0 / (2 * 4.569))


def test_other_mel_counts():
    x = torch.randn(2, 6000) * 0.1
    for mels in (23, 80):  # a last SIMD tile of filters that is only partly used
        check(x, full(2, 6000), mels=mels)


def test_matches_torchaudio():
    torchaudio = pytest.importorskip("torchaudio")
    x = torch.randn(3, 16000) * 0.1
    x[1] = tones(16000, [523.25])[0]
    got = fbank_cpu(x, full(3, 16000))
    for b in range(3):
        want = torchaudio.compliance.kaldi.fbank(
            x[b : b + 1], htk_compat=True, sample_frequency=SR, use_energy=False, window_type="hanning",
            num_mel_bins=128, dither=0.0, frame_shift=10,
        )
        assert (got[b] - want).abs().max().item() <= TOL


def test_threads_give_identical_results():
    x = torch.randn(5, 12000) * 0.1
    lengths = torch.tensor([12000, 11000, 3000, 400, 12000])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fbank_cpu(x, lengths)
        torch.set_num_threads(2)
        two = fbank_cpu(x, lengths)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_simd_paths(isa):
    """The AVX2 and baseline kernels (selected with SSLAM_FAST_CPU_ISA, read once per process) give the same values."""
    code = (
        "import torch, sslam_fast._C\n"
        "from sslam_fast.reference import kaldi_fbank as ref\n"
        "p = ref.FrameParams.at(16000)\n"
        "x = torch.load(__import__('sys').argv[1])\n"
        "L = torch.tensor([12000, 7000, 400])\n"
        "o = torch.ops.sslam_fast_C.fbank(x, L, torch.tensor([0.0, 0.1, -0.1]), ref.hanning(400), "
        "ref.mel_banks(100, 512, 16000), 400, 160, 512, 74, 80, 1.0, 0.5)\n"
        "torch.save(o, __import__('sys').argv[2])\n"
    )
    x = torch.randn(3, 12000) * 0.1
    lengths = torch.tensor([12000, 7000, 400])
    offsets = torch.tensor([0.0, 0.1, -0.1])
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "x.pt"), os.path.join(d, "o.pt")
        torch.save(x, src)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, SSLAM_FAST_CPU_ISA=isa, PYTHONPATH=path)
        subprocess.run([sys.executable, "-c", code, src, dst], check=True, env=env, timeout=120)
        got = torch.load(dst)
    want = expected(x, lengths, offsets=offsets, num_frames=74, out_frames=80, shift=1.0, scale=0.5, mels=100)
    assert (got - want).abs().max().item() <= TOL


# --- input checks --------------------------------------------------------------------------------------------------


def _args(**override):
    a = dict(
        waveforms=torch.randn(2, 4000), lengths=full(2, 4000), offsets=torch.zeros(2), window=ref.hanning(400),
        mel_banks=ref.mel_banks(128, 512, SR), frame_length=400, frame_shift=160, n_fft=512, num_frames=23,
        out_frames=23, shift=0.0, scale=1.0,
    )
    a.update(override)
    return a


def test_valid_args_run():
    assert torch.ops.sslam_fast_C.fbank(**_args()).shape == (2, 23, 128)


def test_opcheck():
    a = _args(waveforms=torch.randn(2, 2000), lengths=torch.tensor([2000, 1500]), num_frames=11, out_frames=14)
    torch.library.opcheck(torch.ops.sslam_fast_C.fbank.default, tuple(a.values()), test_utils=OPCHECK_ALL)


def test_refuses_sizes_before_allocating():
    x, lengths = torch.zeros(2, 800), torch.tensor([800, 800])
    window, banks = ref.hanning(400, "cpu"), ref.mel_banks(128, 512, 16000, "cpu")

    def call(frame_length=400, frame_shift=160, n_fft=512, num_frames=3, out_frames=4):
        return torch.ops.sslam_fast_C.fbank(x, lengths, torch.zeros(2), window, banks, frame_length, frame_shift,
                                            n_fft, num_frames, out_frames, 0.0, 1.0)

    assert call().shape == (2, 4, 128)
    with pytest.raises(RuntimeError, match="out_frames must lie in"):
        call(out_frames=2**31)
    with pytest.raises(RuntimeError, match="out_frames \\* mel filters"):
        call(out_frames=2**23)  # 2 x 2**23 x 128 = 2**31 elements: refused before at::empty
    with pytest.raises(RuntimeError, match="frame_shift must lie in"):
        call(frame_shift=-(2**63))
    with pytest.raises(RuntimeError, match="num_frames must lie in"):
        call(num_frames=-1)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(waveforms=torch.randn(2, 4000, dtype=torch.float64)), "dtype"),
        (dict(waveforms=torch.randn(4000)), "2-D"),
        (dict(waveforms=torch.randn(2, 1, 4000)), "2-D"),
        (dict(waveforms=torch.randn(4000, 2).t()), "contiguous"),
        (dict(lengths=torch.tensor([4000, 4001])), "lengths"),
        (dict(lengths=torch.tensor([4000, -1])), "lengths"),
        (dict(lengths=torch.tensor([4000, 4000], dtype=torch.int32)), "dtype"),
        (dict(lengths=full(3, 4000)), "lengths"),
        (dict(offsets=torch.zeros(3)), "offsets"),
        (dict(offsets=torch.zeros(2, dtype=torch.float64)), "dtype"),
        (dict(window=ref.hanning(401)), "window"),
        (dict(mel_banks=ref.mel_banks(128, 1024, SR)), "mel_banks"),
        (dict(mel_banks=torch.zeros(128, 257, dtype=torch.float16)), "dtype"),
        (dict(n_fft=256, mel_banks=ref.mel_banks(128, 256, SR)), "n_fft"),
        (dict(frame_shift=0), "frame_shift"),
        (dict(out_frames=-1), "out_frames"),
        (dict(num_frames=-1), "num_frames"),
    ],
)
def test_bad_inputs_raise(override, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sslam_fast_C.fbank(**_args(**override))
