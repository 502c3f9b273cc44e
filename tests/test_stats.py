"""sslam_fast.stats: the normalisation statistics equal a direct torchaudio computation on the built-in set, follow
the upstream script's batch averaging, are reproducible per seed, and skip and count bad files."""

import json
import shutil

import numpy as np
import pytest
import soundfile
import torch

from sslam_fast import stats
from sslam_fast.data import DataError, make_default_dataset, read_manifest

KALDI = dict(htk_compat=True, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)


def direct_fbank(path, target_length=1024) -> torch.Tensor:
    """One clip as the statistics script computes it, with torchaudio: mono, 16 kHz, minus its mean, Kaldi fbank,
    first target_length frames, zero rows to target_length. Returns (target_length, 128) float64 and the valid
    frame count."""
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as AF

    data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    x = torch.from_numpy(data.mean(axis=1, dtype=np.float32))
    if sr != 16000:
        x = AF.resample(x, sr, 16000)
    x = x - x.mean()
    fb = kaldi.fbank(x[None], sample_frequency=16000, **KALDI)[:target_length]
    frames = fb.shape[0]
    return torch.nn.functional.pad(fb, (0, 0, 0, target_length - frames)).double(), frames


@pytest.fixture(scope="module")
def builtin(make_run_base):
    """The built-in set (default arguments, generated once per session) and the direct per-clip features of its
    training part."""
    ds = make_default_dataset(make_run_base("stats") / "default_data")
    root, entries = read_manifest(ds.train_manifest)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchaudio's per-clip loop: small ops, faster on one thread
    try:
        direct = [direct_fbank(root / rel) for rel, _ in entries]
    finally:
        torch.set_num_threads(threads)
    return ds, direct


def test_equals_direct_computation_on_builtin_set(builtin):
    ds, direct = builtin
    s = stats.compute_stats(ds.train_manifest)  # 256 clips < the default 2000: all of them
    assert s.clips == s.files == len(direct) == 256 and s.bad == []
    every = torch.cat([fb for fb, _ in direct])  # concatenated, the padding rows included
    assert s.norm_mean == pytest.approx(every.mean().item(), abs=1e-5)
    assert s.norm_std == pytest.approx(every.std().item(), abs=1e-5)
    assert (s.pooled_mean, s.pooled_std) == (s.norm_mean, s.norm_std)  # one upstream batch: the same figures
    valid = torch.cat([fb[:n] for fb, n in direct])
    assert s.valid_mean == pytest.approx(valid.mean().item(), abs=1e-5)
    assert s.valid_std == pytest.approx(valid.std().item(), abs=1e-5)
    assert s.padded_share == pytest.approx(1 - valid.numel() / every.numel())
    assert s.valid_mean < s.norm_mean  # the zero rows pull the mean up, towards 0


def test_batches_averaged_like_the_upstream_script(builtin, monkeypatch):
    """Per batch of UPSTREAM_BATCH clips the mean and the unbiased std; the result is their plain average."""
    ds, direct = builtin
    monkeypatch.setattr(stats, "UPSTREAM_BATCH", 100)  # 256 clips: batches of 100, 100 and 56
    s = stats.compute_stats(ds.train_manifest, batch_size=24)
    groups = [torch.cat([fb for fb, _ in direct[k:k + 100]]) for k in range(0, 256, 100)]
    assert s.norm_mean == pytest.approx(np.mean([g.mean().item() for g in groups]), abs=1e-5)
    assert s.norm_std == pytest.approx(np.mean([g.std().item() for g in groups]), abs=1e-5)
    every = torch.cat(groups)
    assert s.pooled_mean == pytest.approx(every.mean().item(), abs=1e-5)
    assert s.pooled_std == pytest.approx(every.std().item(), abs=1e-5)
    assert abs(s.norm_std - s.pooled_std) > 1e-4  # the batch average is a different figure from the pooled one


def test_seeded_sample(builtin):
    ds, direct = builtin
    a = stats.compute_stats(ds.train_manifest, clips=40, seed=7)
    b = stats.compute_stats(ds.train_manifest, clips=40, seed=7, workers=1, batch_size=5)
    assert (a.norm_mean, a.norm_std) == pytest.approx((b.norm_mean, b.norm_std), abs=1e-9)
    assert a.clips == 40 and a.requested == 40
    other_seed = stats.compute_stats(ds.train_manifest, clips=40, seed=8)
    more = stats.compute_stats(ds.train_manifest, clips=80, seed=7)
    for c in (other_seed, more):
        assert abs(c.norm_mean - a.norm_mean) > 1e-4 and abs(c.norm_std - a.norm_std) > 1e-4
    idx = stats.sample_files(256, 40, 7)
    assert idx == sorted(set(idx)) and len(idx) == 40 and idx != list(range(40))
    every = torch.cat([direct[i][0] for i in idx])
    assert a.norm_mean == pytest.approx(every.mean().item(), abs=1e-5)
    assert stats.sample_files(5, 9, 0) == [0, 1, 2, 3, 4]


@pytest.fixture()
def mixed_folder(builtin, tmp_path):
    """Three usable clips (16 kHz mono, 22.05 kHz stereo, 32 kHz) and four bad files."""
    ds, _ = builtin
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    shutil.copy(ds.root / "train" / "00000.wav", root / "a.wav")
    g = np.random.default_rng(0)
    stereo = (0.1 * g.standard_normal((22050 * 2, 2))).astype(np.float32)
    soundfile.write(root / "sub" / "b.flac", stereo, 22050)
    soundfile.write(root / "sub" / "c.wav", (0.2 * np.sin(np.arange(48000) * 0.05)).astype(np.float32), 32000)
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    (root / "empty.wav").write_bytes(b"")
    soundfile.write(root / "short.wav", np.zeros(100, np.float32), 16000)  # under one 25 ms frame
    soundfile.write(root / "silent_header.wav", np.zeros((0, 1), np.float32), 16000)  # no samples
    return root, [root / "a.wav", root / "sub" / "b.flac", root / "sub" / "c.wav"]


def test_bad_files_skipped_and_counted(mixed_folder, capsys):
    root, good = mixed_folder
    s = stats.compute_stats(root, target_length=512)
    assert s.clips == 3 and s.files == 7 and len(s.bad) == 4
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in s.bad) == ["corrupt.wav", "empty.wav", "short.wav",
                                                              "silent_header.wav"]
    every = torch.cat([direct_fbank(f, 512)[0] for f in good])
    assert s.norm_mean == pytest.approx(every.mean().item(), abs=1e-5)
    assert s.norm_std == pytest.approx(every.std().item(), abs=1e-5)

    assert stats.main([str(root), "--target-length", "512", "--json"]) == 0
    out, err = capsys.readouterr()
    flags, line = out.strip().splitlines()
    assert flags == f"--norm_mean={s.norm_mean:.3f} --norm_std={s.norm_std:.3f}"
    record = json.loads(line)
    assert record["bad"] == 4 and record["clips"] == 3 and record["norm_mean"] == pytest.approx(s.norm_mean)
    assert "skipped 4 unusable files" in err and "corrupt.wav" in err


def test_printed_flags_are_what_the_trainer_takes(builtin, capsys):
    from sslam_fast.train.config import load_config

    ds, _ = builtin
    assert stats.main([str(ds.train_manifest), "--clips", "16"]) == 0
    flags = capsys.readouterr().out.split()
    assert len(flags) == 2
    cfg = load_config(["--preset=tiny", *flags])
    s = stats.compute_stats(ds.train_manifest, clips=16)
    assert (cfg.norm_mean, cfg.norm_std) == (round(s.norm_mean, 3), round(s.norm_std, 3))


def test_errors(mixed_folder, tmp_path, capsys):
    root, good = mixed_folder
    for args, words in (
        ([str(tmp_path / "missing.tsv")], "no such manifest or folder"),
        ([str(good[0])], "one audio file"),
        ([str(root), "--clips", "0"], "clips must be an int >= 1"),
        ([str(root), "--target-length", "0"], "target_length"),
    ):
        assert stats.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err, (args, err)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.wav").write_bytes(b"not audio")
    with pytest.raises(DataError, match="none of the 1 sampled files could be used"):
        stats.compute_stats(only_bad)
    with pytest.raises(ValueError, match="workers"):
        stats.compute_stats(root, workers=0)
