"""Data pipeline: synthetic default set, manifests, clip decoding, bad files, resumable sampler."""

import os

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from sslam_fast.data import (
    CLASS_NAMES,
    AudioClipDataset,
    BadFileMonitor,
    DataError,
    ResumableSampler,
    collate,
    make_default_dataset,
    read_manifest,
)
from sslam_fast.data.synthetic import CLASS_BANDS

SR = 16000


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    return make_default_dataset(tmp_path_factory.mktemp("ds") / "set", train_clips=40, heldout_clips=64, seed=3)


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- synthetic set


def test_default_set_cached(default_set, tmp_path):
    root = default_set.root
    before = _mtimes(root)
    assert len([p for p in before if p.suffix == ".wav"]) == 104
    again = make_default_dataset(root, train_clips=40, heldout_clips=64, seed=3)
    assert again == default_set
    assert _mtimes(root) == before  # nothing rewritten
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".set.")]  # no temp folder left behind


def test_default_set_regenerates_on_other_args(tmp_path):
    root = tmp_path / "set"
    make_default_dataset(root, train_clips=3, heldout_clips=2, seed=0)
    first = soundfile.read(str(root / "train/00000.wav"))[0]
    ds = make_default_dataset(root, train_clips=4, heldout_clips=2, seed=1)
    assert ds.labels("train").shape == (4, 10)
    assert not np.array_equal(first, soundfile.read(str(root / "train/00000.wav"))[0])
    other = tmp_path / "user_data"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="user_data"):
        make_default_dataset(other, train_clips=1, heldout_clips=1)
    assert (other / "keep.txt").read_text() == "x"


def test_default_set_files(default_set):
    for split, count in (("train", 40), ("heldout", 64)):
        root, entries = read_manifest(default_set.manifest(split))
        assert root == default_set.root and len(entries) == count
        for rel, size in entries[:5]:
            info = soundfile.info(str(root / rel))
            assert (info.samplerate, info.channels, info.subtype, info.frames) == (SR, 1, "PCM_16", 40960)
            assert size == 40960


def test_default_set_labels(default_set):
    lab = default_set.labels("heldout")
    assert lab.shape == (64, len(CLASS_NAMES)) and lab.dtype == torch.float32
    assert set(lab.unique().tolist()) == {0.0, 1.0}
    per_clip = lab.sum(1)
    assert per_clip.min() >= 2 and per_clip.max() <= 4  # polyphonic: 2-4 distinct events on every clip
    assert (per_clip >= 3).any()
    assert (lab.sum(0) > 0).all()  # every class occurs
    # aligned with labels.tsv rows
    table = dict(line.split("\t") for line in default_set.labels_path.read_text().splitlines())
    _, entries = read_manifest(default_set.heldout_manifest)
    for row, (rel, _) in enumerate(entries):
        assert lab[row].nonzero().flatten().tolist() == [int(c) for c in table[rel].split(",")]
    with pytest.raises(ValueError, match="split"):
        default_set.labels("test")


def _band_energy(default_set):
    root, entries = read_manifest(default_set.heldout_manifest)
    x = torch.stack([torch.from_numpy(soundfile.read(str(root / r), dtype="float32")[0]) for r, _ in entries])
    win = torch.hann_window(512)
    spec = torch.stft(x, 512, 256, window=win, return_complex=True).abs() ** 2  # (B, F, T)
    freqs = torch.fft.rfftfreq(512, 1 / SR)
    floor = 10 ** (-50 / 10) * float((win**2).sum())  # expected bin energy of the -50 dBFS white background
    return spec, freqs, floor


def test_default_set_events_audible(default_set):
    spec, freqs, floor = _band_energy(default_set)
    lab = default_set.labels("heldout").bool()
    for c, name in enumerate(CLASS_NAMES):
        lo, hi = CLASS_BANDS[name]
        band = spec[:, (freqs >= lo) & (freqs <= hi)].mean(1).amax(1)  # (B,) loudest frame in the class band
        assert lab[:, c].any()
        # every labelled event rises at least 20 dB above the background in its band
        assert band[lab[:, c]].min() > 100 * floor, name
        if name in ("noise_high", "sine_sweep"):  # bands other classes barely reach: the label decides
            assert band[lab[:, c]].min() > 10 * band[~lab[:, c]].median(), name


# ---------------------------------------------------------------- manifests


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_manifest(tmp_path / "missing.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_manifest(empty)
    only_root = tmp_path / "root_only.tsv"
    only_root.write_text(f"{tmp_path}\n\n")
    with pytest.raises(DataError, match="lists no audio"):
        read_manifest(only_root)
    nowhere = tmp_path / "nowhere.tsv"
    nowhere.write_text(f"{tmp_path / 'gone'}\na.wav\t100\n")
    with pytest.raises(DataError, match="manifest points nowhere: .*gone"):
        read_manifest(nowhere)
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"{tmp_path}\na.wav\t100\nb.wav\tlots\n")
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"\x80\xff\x00RIFF")
    with pytest.raises(DataError, match="not a text file"):
        read_manifest(binary)
    with pytest.raises(DataError, match="line 3"):
        read_manifest(bad)
    good = tmp_path / "good.tsv"
    good.write_text(f"{tmp_path}\nsub/a.wav\t100\nb.wav\t32000\n")
    assert read_manifest(good) == (tmp_path, [("sub/a.wav", 100), ("b.wav", 32000)])


# ---------------------------------------------------------------- decoding


def _write(path, data, sr):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), data, sr, subtype="PCM_16")
    return path


def _tone(n, sr, f=440.0, amp=0.5):
    return (amp * np.sin(2 * np.pi * f * np.arange(n) / sr)).astype(np.float32)


@pytest.fixture
def audio_dir(tmp_path):
    d = tmp_path / "audio"
    _write(d / "a16k.wav", _tone(12000, SR), SR)  # 0.75 s
    _write(d / "b32k.wav", _tone(24000, 32000, 1000.0), 32000)  # 0.75 s at 32 kHz
    stereo = np.stack([_tone(30000, 32000, 300.0), 0.4 * _tone(30000, 32000, 2000.0)], 1)
    _write(d / "c_stereo32k.wav", stereo, 32000)
    _write(d / "d_short.wav", _tone(3000, SR), SR)
    return d


def _float_ref(path, sr_out=SR):
    data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = torch.from_numpy(data.mean(1))  # channel average BEFORE resampling (ALGORITHM §11.8)
    return mono if sr == sr_out else torchaudio.functional.resample(mono, sr, sr_out)


@pytest.mark.parametrize("clip", [400, 4001, 16000], ids=lambda c: f"N{c}")
def test_dataset_decode_crop_pad(audio_dir, clip):
    ds = AudioClipDataset(audio_dir, clip, as_int16=False, random_crop=False)
    assert [p.name for p in ds.files] == ["a16k.wav", "b32k.wav", "c_stereo32k.wav", "d_short.wav"]
    for i, p in enumerate(ds.files):
        ref = _float_ref(p)
        item = ds[i]
        assert item["index"] == i and item["audio"].dtype == torch.float32 and item["audio"].shape == (clip,)
        n = ref.shape[0]
        assert n == {0: 12000, 1: 12000, 2: 15000, 3: 3000}[i]  # 32 kHz files resampled to 16 kHz
        assert item["length"] == min(n, clip)
        torch.testing.assert_close(item["audio"][: item["length"]], ref[: item["length"]], rtol=0, atol=1e-6)
        assert (item["audio"][item["length"]:] == 0).all()
    assert ds.bad_files == []


def test_dataset_stereo_mixed_before_resample(audio_dir):
    ds = AudioClipDataset(audio_dir / "c_stereo32k.wav", 16000, as_int16=False)
    item = ds[0]
    data, _ = soundfile.read(str(audio_dir / "c_stereo32k.wav"), dtype="float32")
    left = torchaudio.functional.resample(torch.from_numpy(data[:, 0].copy()), 32000, SR)
    right = torchaudio.functional.resample(torch.from_numpy(data[:, 1].copy()), 32000, SR)
    torch.testing.assert_close(item["audio"][:15000], 0.5 * (left + right), rtol=0, atol=1e-5)
    spec = torch.fft.rfft(item["audio"][:15000]).abs()
    freqs = torch.fft.rfftfreq(15000, 1 / SR)
    assert spec[(freqs - 300).abs().argmin()] > 2 * spec[(freqs - 2000).abs().argmin()] > 0  # both channels in


def test_dataset_int16_scaling(audio_dir):
    f = AudioClipDataset(audio_dir, 8000, as_int16=False, seed=5)
    q = AudioClipDataset(audio_dir, 8000, as_int16=True, seed=5)
    for i in range(len(f)):
        a, b = f[i], q[i]
        assert b["audio"].dtype == torch.int16 and b["length"] == a["length"]
        expected = (a["audio"] * 32768).round().clamp(-32768, 32767).to(torch.int16)
        assert torch.equal(b["audio"], expected)
        assert b["audio"].abs().max() > 8000  # a 0.5-amplitude tone
    loud = _write(audio_dir.parent / "loud" / "x.wav", np.full(1000, 0.99999, np.float32), SR)
    out = AudioClipDataset(loud, 1000)[0]["audio"]
    assert out.min() >= 32700 and out.max() <= 32767  # near full scale, no int16 wrap-around


def test_dataset_int16_is_exact_for_16_bit_files(tmp_path):
    """A PCM_16 file's samples come back unchanged (soundfile reads k / 32768; the dataset multiplies by 32768)."""
    pcm = np.array([0, 1, -1, 16385, -16385, 32767, -32768, 12345, -30000] * 200, dtype=np.int16)
    soundfile.write(str(tmp_path / "pcm.wav"), pcm, SR, subtype="PCM_16")
    item = AudioClipDataset(tmp_path, len(pcm), random_crop=False)[0]
    assert item["audio"].dtype == torch.int16 and torch.equal(item["audio"], torch.from_numpy(pcm))


def test_dataset_crop_reproducible(tmp_path):
    path = _write(tmp_path / "long.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 48000).astype(np.float32), SR)
    full = _float_ref(path)

    def starts(ds, idx=0):
        a = ds[idx]["audio"]
        hits = [s for s in range(48000 - 400 + 1) if torch.equal(full[s:s + 400], a)]
        assert len(hits) == 1
        return hits[0]

    ds1 = AudioClipDataset(path, 400, as_int16=False, seed=7)
    ds2 = AudioClipDataset(path, 400, as_int16=False, seed=7)
    by_epoch = []
    for epoch in range(4):
        ds1.set_epoch(epoch)
        ds2.set_epoch(epoch)
        s = starts(ds1)
        assert s == starts(ds2) == starts(ds1)  # same (seed, epoch, index): same crop
        by_epoch.append(s)
    assert len(set(by_epoch)) == 4  # a new crop every epoch
    ds3 = AudioClipDataset(path, 400, as_int16=False, seed=8)
    ds3.set_epoch(3)
    assert starts(ds3) != by_epoch[3]
    assert starts(AudioClipDataset(path, 400, as_int16=False, random_crop=False)) == 0


# ---------------------------------------------------------------- bad files


def test_bad_files_skipped_and_recorded(audio_dir):
    (audio_dir / "e_random.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (audio_dir / "f_empty.wav").write_bytes(b"")
    _write(audio_dir / "g_100.wav", _tone(100, SR), SR)
    _write(audio_dir / "h_250_at_32k.wav", _tone(700, 32000), 32000)  # 350 samples after resampling: too short
    ds = AudioClipDataset(audio_dir, 4000)
    items = [ds[i] for i in range(len(ds))]
    names = [p.name for p in ds.files]
    bad = {"e_random.wav", "f_empty.wav", "g_100.wav", "h_250_at_32k.wav"}
    assert [names[i] for i, it in enumerate(items) if it is None] == sorted(bad)
    assert sorted(os.path.basename(p) for p, _ in ds.bad_files) == sorted(bad)
    reasons = dict((os.path.basename(p), r) for p, r in ds.bad_files)
    assert "too short: 100 samples" in reasons["g_100.wav"]
    assert "too short: 350 samples" in reasons["h_250_at_32k.wav"]
    assert "decode" in reasons["e_random.wav"] or "samples" in reasons["e_random.wav"]
    batch = collate(items)
    assert batch["skipped"] == 4
    assert batch["audio"].shape == (4, 4000) and batch["audio"].dtype == torch.int16
    assert batch["lengths"].tolist() == [4000, 4000, 4000, 3000] and batch["lengths"].dtype == torch.int64
    assert batch["indices"].tolist() == [0, 1, 2, 3]
    none = collate([None, None])
    assert none["skipped"] == 2 and none["audio"].shape[0] == 0


def test_dataloader_with_sampler(default_set):
    ds = AudioClipDataset(default_set.train_manifest, 8000)
    sampler = ResumableSampler(len(ds), batch_size=8, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    seen = []
    for batch in loader:
        assert batch["audio"].shape == (8, 8000) and batch["skipped"] == 0
        assert (batch["lengths"] == 8000).all()
        seen += batch["indices"].tolist()
    assert sorted(seen) == list(range(40)) and sampler.epoch == 1


def test_bad_file_monitor():
    m = BadFileMonitor(threshold=0.05, min_seen=20)
    m.update(5, 5, [("a.wav", "x")])  # 50 % bad but only 10 seen: no verdict yet
    m.update(200, 0)
    ok = BadFileMonitor()
    ok.update(95, 5, ["x.wav"])  # exactly 5 %: allowed
    files = [f"/data/bad{i}.wav" for i in range(8)]
    m2 = BadFileMonitor(threshold=0.05, min_seen=20)
    m2.update(10, 0)
    with pytest.raises(DataError, match=r"8 of 20 \(40.0 %") as exc:
        m2.update(2, 8, [(f, "cannot decode") for f in files])
    msg = str(exc.value)
    assert all(f in msg for f in files[:5]) and files[5] not in msg
    with pytest.raises(ValueError, match="threshold"):
        BadFileMonitor(threshold=1.5)


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("n,bs,world", [(1, 1, 1), (17, 4, 1), (64, 5, 2), (97, 3, 4)], ids=lambda v: str(v))
def test_sampler_shards_disjoint_cover(n, bs, world):
    samplers = [ResumableSampler(n, batch_size=bs, seed=11, rank=r, world_size=world) for r in range(world)]
    per_rank = [[i for b in s.batches(0) for i in b] for s in samplers]
    assert all(len(b) == bs for s in samplers for b in s.batches(0))
    assert len({len(s.batches(0)) for s in samplers}) == 1 and len(samplers[0]) == n // world // bs
    flat = [i for p in per_rank for i in p]
    assert len(flat) == len(set(flat))  # disjoint
    full = [ResumableSampler(n, batch_size=1, seed=11, rank=r, world_size=world) for r in range(world)]
    cover = sorted(i for s in full for b in s.batches(0) for i in b)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(11)).tolist()
    assert cover == sorted(perm[: n // world * world])
    if world > 1:
        assert samplers[0].batches(0) != samplers[1].batches(0)


def test_sampler_no_drop_last_wraps():
    s = [ResumableSampler(10, batch_size=3, rank=r, world_size=3, drop_last=False) for r in range(3)]
    lists = [[i for b in x.batches(0) for i in b] for x in s]
    assert [len(x) for x in s] == [2, 2, 2] and [len(v) for v in lists] == [4, 4, 4]
    assert set(i for v in lists for i in v) == set(range(10))


def test_sampler_epochs_and_resume():
    s = ResumableSampler(50, batch_size=4, seed=2, rank=1, world_size=2)
    e0 = list(s)
    e1 = list(s)
    assert len(e0) == len(e1) == 6 and e0 != e1 and s.state_dict() == {"epoch": 2, "batches_done": 0}
    assert e0 == s.batches(0) and e1 == s.batches(1)
    s.set_epoch(1)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    sd = s.state_dict()
    assert sd == {"epoch": 1, "batches_done": 4} and head == e1[:4]
    r = ResumableSampler(50, batch_size=4, seed=2, rank=1, world_size=2)
    r.load_state_dict(sd)
    assert list(r) == e1[4:]  # exactly the remaining batches
    assert list(r) == r.batches(2) and r.state_dict() == {"epoch": 3, "batches_done": 0}
    with pytest.raises(ValueError, match="batches_done"):
        r.load_state_dict({"epoch": 0, "batches_done": 7})


def test_sampler_bad_args():
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableSampler(10, batch_size=0)
    with pytest.raises(ValueError, match="num_items"):
        ResumableSampler(0, batch_size=1)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        ResumableSampler(10, batch_size=6, world_size=2)


def test_dataset_bad_args(tmp_path):
    with pytest.raises(DataError, match="no such manifest or folder"):
        AudioClipDataset(tmp_path / "nope", 1000)
    with pytest.raises(DataError, match="no audio files"):
        AudioClipDataset(tmp_path, 1000)
    with pytest.raises(ValueError, match="clip_samples"):
        AudioClipDataset(tmp_path, 100)
