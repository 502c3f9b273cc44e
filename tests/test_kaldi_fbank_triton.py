"""The Triton fbank launcher (``kernels/kaldi_fbank.py``) against the plain-PyTorch reference
(``sslam_fast.reference.kaldi_fbank``).

Runs on CUDA when there is a GPU, otherwise on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set
by tests/conftest.py before triton is imported). Shapes are small: the interpreter runs about 2 M elements/s.

Tolerances on the log-mel (fp32 output): max abs 5e-3 and mean abs 1e-5 against the reference, on signals whose
log-mel is well conditioned in fp32 (noise, tones and chirps over a broadband floor, clipped square, near silence).
Pure tones and sweeps are not: most of their mel bands sit 100-150 dB under the peak, where the fp32 rounding of any
DFT dominates. There, torch's own fp32 rFFT (the reference) is 4e-5 to 1.2e-4 mean abs (up to ~5e-3 max) away from
the exact DFT of the very same frames, so no other fp32 DFT can agree with it to 1e-5 mean;
``test_pure_tones_as_close_to_exact_as_reference`` checks instead that the kernel is at least as close to the exact
(float64) result as the reference is.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEV
from fbank_oracle import exact_logmel

from sslam_fast.reference import kaldi_fbank as ref

triton = pytest.importorskip("triton")

import sslam_fast.kernels.kaldi_fbank as fbk  # noqa: E402

fbank_triton = fbk.fbank_triton

DEVICE = torch.device(DEV)
P16 = ref.FrameParams.at(16000)  # 400 / 160 / 512
MAX_TOL, MEAN_TOL = 5e-3, 1e-5
N40 = 39 * 160 + 400  # 6640 samples: 40 frames
LENGTHS = [N40, 400, 300, 3001]  # full, exactly one frame, shorter than one frame (no frames), 17 frames


# --- signals ----------------------------------------------------------------------------------------------------------


def make_signal(kind: str, n: int, seed: int, sr: int = 16000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / sr
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    f0 = 150.0 + 97.0 * seed
    tones = 0.5 * torch.sin(2 * math.pi * f0 * t) + 0.2 * torch.sin(2 * math.pi * 3001.5 * t + 1.0)
    sweep = 0.4 * torch.sin(2 * math.pi * (100.0 * t + 0.5 * (0.45 * sr - 100.0) / (n / sr) * t * t))
    x = {
        "noise": 0.3 * noise,
        "tones_over_noise": tones + 0.05 * noise,
        "chirp_over_noise": sweep + 0.03 * noise,
        "near_silence": 1e-6 * noise,
        "faint_noise": 3e-5 * noise,  # mel energies around the log floor eps
        "clipped_square": torch.clamp(3.0 * torch.sign(torch.sin(2 * math.pi * (60.0 + 13 * seed) * t)), -1.0, 1.0),
        "pure_tones": tones,
        "pure_chirp": sweep,
    }[kind]
    return x.to(torch.float32)


def batch(kind: str, lengths=LENGTHS, sr: int = 16000) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of one kind (a different seed each), zero past their length."""
    n = max(lengths)
    x = torch.zeros(len(lengths), n)
    for i, length in enumerate(lengths):
        x[i, :length] = make_signal(kind, length, seed=i + 1, sr=sr)
    return x, torch.tensor(lengths, dtype=torch.int64)


# --- running the launcher and the reference ---------------------------------------------------------------------------


def run_triton(x, lengths, offsets=None, *, num_mel_bins=128, sr=16000, num_frames=None, out_frames=None, shift=0.0,
               scale=1.0, out_dtype=torch.float32, banks=None, params=None):
    p = params or ref.FrameParams.at(sr)
    if num_frames is None:
        num_frames = p.num_frames(int(lengths.max()))
    if out_frames is None:
        out_frames = num_frames
    if offsets is None:
        offsets = torch.zeros(x.shape[0])
    if banks is None:
        banks = ref.mel_banks(num_mel_bins, p.n_fft, sr)
    x = x.to(DEVICE)
    out = fbank_triton(
        x, lengths.to(DEVICE), offsets.to(DEVICE), ref.hanning(p.frame_length).to(DEVICE), banks.to(DEVICE),
        p.frame_length, p.frame_shift, p.n_fft, num_frames, out_frames, shift, scale, out_dtype,
    )
    assert out.device == x.device and out.dtype == out_dtype
    assert out.shape == (x.shape[0], out_frames, banks.shape[0])
    return out.cpu()


def run_reference(x, lengths, offsets=None, *, num_mel_bins=128, sr=16000, num_frames=None, out_frames=None,
                  shift=0.0, scale=1.0):
    """The launcher's contract in plain PyTorch: the reference fbank, zero frames past each row's count, normalised."""
    p = ref.FrameParams.at(sr)
    if num_frames is None:
        num_frames = p.num_frames(int(lengths.max()))
    if out_frames is None:
        out_frames = num_frames
    if offsets is not None:
        x = x - offsets[:, None]
    t = min(num_frames, out_frames)
    logmel = ref.kaldi_fbank(x.to(DEVICE), lengths.to(DEVICE), t, sr, num_mel_bins).cpu()
    logmel = torch.nn.functional.pad(logmel, (0, 0, 0, out_frames - t))
    return (logmel - shift) * scale


def valid_mask(lengths, out_frames, num_frames, p=P16) -> torch.Tensor:
    """(B, out_frames) True where a frame is computed (t < min(F_b, num_frames))."""
    counts = torch.tensor([min(p.num_frames(int(n)), num_frames) for n in lengths])
    return torch.arange(out_frames)[None, :] < counts[:, None]


def fill_value(shift: float, scale: float, dtype=torch.float32) -> torch.Tensor:
    return ((torch.zeros((), dtype=torch.float32) - shift) * scale).to(dtype)


def assert_logmel_close(got, want, mask, what, max_tol=MAX_TOL, mean_tol=MEAN_TOL):
    err = (got.float() - want.float()).abs()[mask]
    assert err.numel() > 0, what
    assert torch.isfinite(err).all(), f"{what}: non-finite values"
    assert err.max() <= max_tol, f"{what}: max abs error {err.max():.3g} > {max_tol}"
    assert err.mean() <= mean_tol, f"{what}: mean abs error {err.mean():.3g} > {mean_tol}"


def assert_padding_exact(got, mask, shift, scale, what):
    pad = got[~mask.unsqueeze(-1).expand_as(got)]
    assert torch.equal(pad, fill_value(shift, scale, got.dtype).expand_as(pad)), f"{what}: padding frames"


# --- configuration ----------------------------------------------------------------------------------------------------

GPU_CONFIG = {name: getattr(fbk, name) for name in ("BLOCK_T", "BLOCK_K", "BLOCK_F")}
# The interpreter's cost is per operation, not per element: under it, most tests use larger blocks (fewer loop
# steps). The blocking only changes the padding and the order of the sums; test_gpu_block_config runs the real one.
FAST_CONFIG = {"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_F": 64}
INTERPRETED = fbk._is_interpreted()


@pytest.fixture(autouse=True)
def _block_config(monkeypatch):
    if INTERPRETED:
        for name, value in FAST_CONFIG.items():
            monkeypatch.setattr(fbk, name, value)


# --- accuracy ---------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["direct", "split"])
def dft_mode(request, monkeypatch):
    """Both DFT formulations of the kernel (``DFT_SPLIT``; the launcher reads it at each call)."""
    monkeypatch.setattr(fbk, "DFT_SPLIT", request.param == "split")
    return request.param


@pytest.mark.parametrize(
    "kind", ["noise", "tones_over_noise", "chirp_over_noise", "near_silence", "faint_noise", "clipped_square"]
)
def test_matches_reference(kind, dft_mode):
    x, lengths = batch(kind)
    got = run_triton(x, lengths)
    want = run_reference(x, lengths)
    mask = valid_mask(lengths, got.shape[1], got.shape[1])
    assert mask.sum() == 40 + 1 + 0 + 17
    assert_logmel_close(got, want, mask, kind)
    assert_padding_exact(got, mask, 0.0, 1.0, kind)
    assert torch.all(got[2] == 0), "a row shorter than one frame has no frames"


@pytest.mark.parametrize("out_frames", [45, 23])
def test_out_frames_pad_and_crop_with_80_bins(out_frames, dft_mode):
    # num_frames 37 < the longest row's 40; out_frames above num_frames (padding) and below it (crop).
    x, lengths = batch("tones_over_noise", [N40, 3001, 400, 5000])
    got = run_triton(x, lengths, num_mel_bins=80, num_frames=37, out_frames=out_frames)
    want = run_reference(x, lengths, num_mel_bins=80, num_frames=37, out_frames=out_frames)
    mask = valid_mask(lengths, out_frames, 37)
    assert_logmel_close(got, want, mask, f"80 bins, out_frames {out_frames}")
    assert_padding_exact(got, mask, 0.0, 1.0, f"80 bins, out_frames {out_frames}")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_offsets_shift_scale_and_output_dtype(out_dtype):
    shift, scale = -4.268, 1.0 / (2 * 4.569)  # the EAT normalisation
    x, lengths = batch("noise")
    offsets = torch.tensor([0.25, -0.03, 7.0, 1e-3])
    x = x + offsets[:, None]  # the offsets cancel, as a row's clip mean would
    got = run_triton(x, lengths, offsets, out_frames=52, shift=shift, scale=scale, out_dtype=out_dtype)
    want = run_reference(x, lengths, offsets, out_frames=52, shift=shift, scale=scale)
    mask = valid_mask(lengths, 52, 40)
    if out_dtype == torch.float32:
        assert_logmel_close(got, want, mask, "normalised", MAX_TOL * scale, MEAN_TOL * scale)
    else:  # the fp32 result rounded once at the store
        half_ulp = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[out_dtype]
        err = (got.float() - want).abs()[mask]
        bound = MAX_TOL * scale + half_ulp * want.abs()[mask] * 1.01
        assert torch.all(err <= bound), f"{out_dtype}: max excess {(err - bound).max():.3g}"
    assert_padding_exact(got, mask, shift, scale, str(out_dtype))


def test_other_frame_geometry_8khz(dft_mode):
    # 200-sample frames, shift 80, n_fft 256: 128 DFT columns (direct) or 64 (split), 200 or 128 reduction steps.
    p = ref.FrameParams.at(8000)
    lengths = [39 * 80 + 200, 200, 1500]
    x, lengths = batch("noise", lengths, sr=8000)
    got = run_triton(x, lengths, num_mel_bins=64, sr=8000)
    want = run_reference(x, lengths, num_mel_bins=64, sr=8000)
    mask = valid_mask(lengths, got.shape[1], got.shape[1], p)
    assert_logmel_close(got, want, mask, "8 kHz")


@pytest.mark.parametrize("n_fft", [512, 400])
def test_every_dft_bin_reaches_the_mel_product(n_fft, dft_mode):
    """Random dense filters weigh every bin (DC included, which Kaldi's filters leave out), and single-bin filters
    check bins at the edges of the kernel's blocks and of the split form's even / odd halves one at a time.

    n_fft 400 is not a power of two: 200 (direct) or 100 (split) DFT columns, zero-padded to a multiple of BLOCK_F.
    """
    p = ref.FrameParams(400, 160, n_fft)
    g = torch.Generator().manual_seed(5)
    single = (0, 1, n_fft // 4 - 1, n_fft // 4, n_fft // 4 + 1, n_fft // 2 - 1)
    banks = torch.cat([torch.rand(24, n_fft // 2 + 1, generator=g), torch.zeros(len(single), n_fft // 2 + 1)])
    for i, k in enumerate(single):
        banks[24 + i, k] = 1.0  # filter 24 + i only sees bin k: it gives log |X[k]|^2
    banks[:, -1] = 0.0  # the contract: the Nyquist column is 0
    x, lengths = batch("noise", [N40, 2000])
    got = run_triton(x, lengths, banks=banks, params=p)
    want = exact_logmel(x, lengths, 40, banks, p).float()
    mask = valid_mask(lengths, 40, 40, p)
    assert_logmel_close(got[..., :24], want[..., :24], mask, f"random filters, n_fft {n_fft}")
    for i, k in enumerate(single):
        err = (got[..., 24 + i] - want[..., 24 + i]).abs()[mask].max()
        assert err <= MAX_TOL, f"bin {k} of n_fft {n_fft}: max abs error {err:.3g}"


@pytest.mark.parametrize("kind", ["pure_tones", "pure_chirp"])
def test_pure_tones_as_close_to_exact_as_reference(kind, dft_mode):
    """Pure tones: at least as accurate as torch's fp32 rFFT, measured against the exact DFT of the same frames."""
    x, lengths = batch(kind, [N40, 4000])
    banks = ref.mel_banks(128, 512)
    got = run_triton(x, lengths)
    want = run_reference(x, lengths)
    exact = exact_logmel(x, lengths, 40, banks)
    mask = valid_mask(lengths, 40, 40)
    err_kernel = (got.double() - exact).abs()[mask]
    err_ref = (want.double() - exact).abs()[mask]
    assert err_kernel.max() <= MAX_TOL, f"{kind}: max abs error vs exact {err_kernel.max():.3g}"
    assert err_kernel.mean() <= 1.5 * err_ref.mean() + MEAN_TOL, (
        f"{kind}: mean abs error vs exact {err_kernel.mean():.3g}, the reference's {err_ref.mean():.3g}"
    )


# --- coverage of the output, masking ---------------------------------------------------------------------------------


def test_every_output_element_is_written():
    # Tiles with valid frames, tiles past every row's frames, a row without frames; 80 of BLOCK_M = 128 bins.
    x, lengths = batch("noise", [N40, 300])
    p = P16
    args = (x.to(DEVICE), lengths.to(DEVICE), torch.zeros(2, device=DEVICE), ref.hanning(400, DEVICE),
            ref.mel_banks(80, 512, 16000, DEVICE), p.frame_length, p.frame_shift, p.n_fft, 40, 130, 0.5, 2.0)
    out = torch.full((2, 130, 80), float("nan"), device=DEVICE)
    fbk._launch(out, *args)
    assert not torch.isnan(out).any()
    assert torch.equal(out, fbank_triton(*args))


def test_samples_past_a_row_length_are_never_read():
    x, lengths = batch("noise", [3001, N40, 300])
    dirty = x.clone()
    for i, n in enumerate(lengths.tolist()):
        dirty[i, n:] = float("nan")
    assert torch.equal(run_triton(dirty, lengths, out_frames=70), run_triton(x, lengths, out_frames=70))


def test_degenerate_sizes():
    x, lengths = batch("noise", [1000, 500])
    assert run_triton(x, lengths, out_frames=0).shape == (2, 0, 128)
    assert run_triton(x[:0], lengths[:0], num_frames=3).shape == (0, 3, 128)
    got = run_triton(x, lengths, num_frames=0, out_frames=5, shift=1.5, scale=-2.0)
    assert torch.equal(got, fill_value(1.5, -2.0).expand(2, 5, 128))
    # Rows shorter than a frame (no launch): still exactly the padding value, in every output dtype.
    shift, scale = -4.268, 1.0 / (2 * 4.569)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in (0, 399):
            got = run_triton(torch.zeros(2, n), torch.tensor([n, 0]), num_frames=3, out_frames=4, shift=shift,
                             scale=scale, out_dtype=dtype)
            assert torch.equal(got, fill_value(shift, scale, dtype).expand(2, 4, 128)), (dtype, n)


# --- bad input --------------------------------------------------------------------------------------------------------


def _good_args():
    p = P16
    return {
        "waveforms": torch.zeros(2, 800, device=DEVICE),
        "lengths": torch.tensor([800, 500], device=DEVICE),
        "offsets": torch.zeros(2, device=DEVICE),
        "window": ref.hanning(400, DEVICE),
        "mel_banks": ref.mel_banks(128, 512, 16000, DEVICE),
        "frame_length": p.frame_length,
        "frame_shift": p.frame_shift,
        "n_fft": p.n_fft,
        "num_frames": 3,
        "out_frames": 3,
        "shift": 0.0,
        "scale": 1.0,
        "out_dtype": torch.float32,
    }


BAD = [
    ("waveforms", lambda a: a["waveforms"][0], ValueError),
    ("waveforms", lambda a: a["waveforms"].double(), TypeError),
    ("waveforms", lambda a: a["waveforms"].tolist(), TypeError),
    ("waveforms", lambda a: torch.zeros(800, 2, device=DEVICE).t(), ValueError),  # not contiguous
    ("lengths", lambda a: a["lengths"].int(), TypeError),
    ("lengths", lambda a: a["lengths"][:1], ValueError),
    ("lengths", lambda a: a["lengths"].to("meta"), ValueError),  # another device
    ("offsets", lambda a: a["offsets"][None], ValueError),
    ("offsets", lambda a: a["offsets"].half(), TypeError),
    ("offsets", lambda a: a["offsets"].to("meta"), ValueError),
    ("window", lambda a: a["window"][:399], ValueError),
    ("window", lambda a: torch.zeros(800, device=DEVICE)[::2], ValueError),  # not contiguous
    ("mel_banks", lambda a: a["mel_banks"][:, :256], ValueError),
    ("mel_banks", lambda a: a["mel_banks"].double(), TypeError),
    ("mel_banks", lambda a: a["mel_banks"][:0], ValueError),
    ("frame_length", lambda a: 400.0, TypeError),
    ("frame_length", lambda a: 0, ValueError),
    ("frame_shift", lambda a: -160, ValueError),
    ("n_fft", lambda a: 256, ValueError),  # below frame_length
    ("n_fft", lambda a: 514, ValueError),  # not a multiple of 4
    ("num_frames", lambda a: -1, ValueError),
    ("out_frames", lambda a: 3.0, TypeError),
    ("shift", lambda a: "0", TypeError),
    ("scale", lambda a: float("nan"), ValueError),
    ("scale", lambda a: 1e39, ValueError),  # not finite in float32
    ("out_dtype", lambda a: torch.float64, TypeError),
    ("out_dtype", lambda a: "float32", TypeError),
]


@pytest.mark.parametrize("name,make,exc", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_input_is_named(name, make, exc):
    args = _good_args()
    args[name] = make(args)
    if name == "n_fft":  # keep mel_banks consistent with n_fft, so the error is about n_fft itself
        args["mel_banks"] = torch.zeros(8, args["n_fft"] // 2 + 1, device=DEVICE)
    with pytest.raises(exc, match=name):
        fbank_triton(**args)


def test_good_args_run():
    out = fbank_triton(**_good_args())
    assert out.shape == (2, 3, 128)


@pytest.mark.parametrize("dft_mode", ["direct", "split"], indirect=True)
def test_gpu_block_config(dft_mode, monkeypatch):
    """The module's own (GPU) block sizes: rows with 40, 17, 1 and 0 frames; 80 bins (padded to BLOCK_M 128)."""
    for name, value in GPU_CONFIG.items():
        monkeypatch.setattr(fbk, name, value)
    x, lengths = batch("tones_over_noise")
    got = run_triton(x, lengths, num_mel_bins=80, out_frames=140, shift=0.5, scale=2.0)
    want = run_reference(x, lengths, num_mel_bins=80, out_frames=140, shift=0.5, scale=2.0)
    mask = valid_mask(lengths, 140, 40)
    assert_logmel_close(got, want, mask, "GPU block sizes", 2 * MAX_TOL, 2 * MEAN_TOL)
    assert_padding_exact(got, mask, 0.5, 2.0, "GPU block sizes")
