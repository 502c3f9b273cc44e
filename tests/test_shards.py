"""Tar shards: the writer (``python -m sslam_fast.shard``) and the streaming reader (``ShardDataset``)."""

import io
import json
import tarfile

import numpy as np
import pytest
import soundfile
import torch

from sslam_fast.data import AudioClipDataset, DataError, ShardBatches, ShardCollate, ShardDataset, collate
from sslam_fast.data.shards import MEMBER_BITS, decode_clip, expand_braces, is_shard_source, read_shard
from sslam_fast.shard import main as shard_main
from sslam_fast.shard import write_shards

SR = 16000
CLIP = 3 * SR  # longer than the 2.56 s clips of the set: no crop, the whole clip comes back


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from sslam_fast.data import make_default_dataset

    return make_default_dataset(tmp_path_factory.mktemp("shards") / "set", train_clips=30, heldout_clips=2, seed=5)


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "shards"
    write_shards(source.train_manifest, out, 4, workers=2, shuffle=True, seed=1)
    return out


def _original(source, meta) -> np.ndarray:
    return soundfile.read(str(source.root / meta["path"]), dtype="int16")[0]


def _metas(folder) -> dict:
    """index -> the clip's JSON, from the shards of ``folder`` in shards.json order."""
    names = [s["name"] for s in json.loads((folder / "shards.json").read_text())["shards"]]
    out = {}
    for k, name in enumerate(names):
        for index, _, _, meta, error in read_shard(folder / name, k):
            assert error is None
            out[index] = meta
    return out


def _read_order(ds: ShardDataset, epoch: int = 0) -> list[int]:
    """The indices of one worker's read order (before the shuffle buffer)."""
    return [rec[0] for s in ds.worker_shards(epoch) for rec in read_shard(ds.shards[s], s)]


def _buffered(order: list[int], size: int, seed: int, epoch: int, worker: int = 0) -> list[int]:
    """The documented shuffle buffer, written out independently."""
    rng = np.random.default_rng([seed, epoch, worker])
    buf, out = [], []
    for x in order:
        if size <= 1:
            out.append(x)
        elif len(buf) < size:
            buf.append(x)
        else:
            j = int(rng.integers(size))
            out.append(buf[j])
            buf[j] = x
    return out + [buf[k] for k in rng.permutation(len(buf)).tolist()]


# ---------------------------------------------------------------- writer


def test_writer_index_and_layout(shards, source):
    index = json.loads((shards / "shards.json").read_text())
    assert [s["clips"] for s in index["shards"]] == [4] * 7 + [2]
    assert index["total"] == 30 and index["skipped"] == 0
    with tarfile.open(shards / "shard-000000.tar") as tf:
        names = tf.getnames()
        assert names[:4] == ["000000000.wav", "000000000.json", "000000001.wav", "000000001.json"]
        assert all(m.mtime == 0 and m.uid == 0 for m in tf.getmembers())
    paths = [m["path"] for m in _metas(shards).values()]
    assert sorted(paths) == sorted(f"train/{i:05d}.wav" for i in range(30))
    assert paths != sorted(paths)  # --shuffle
    assert not list(shards.glob(".*"))  # no temporary file left


def test_writer_is_deterministic_and_refuses_to_overwrite(source, shards, tmp_path):
    again = tmp_path / "again"
    write_shards(source.train_manifest, again, 4, workers=1, shuffle=True, seed=1)
    for p in shards.glob("*.tar"):
        assert (again / p.name).read_bytes() == p.read_bytes()
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(source.train_manifest, again, 4)
    write_shards(source.train_manifest, again, 100, overwrite=True)
    assert sorted(p.name for p in again.glob("*.tar")) == ["shard-000000.tar"]


def test_cli_skips_unreadable_files_and_stores_labels(tmp_path, capsys):
    root = tmp_path / "audio"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        soundfile.write(root / f"c{k}.wav", (rng.standard_normal(8000) * 3000).astype(np.int16), SR)
    (root / "bad.wav").write_bytes(b"RIFF not really a wav file")
    names = ["c0.wav", "bad.wav", "c1.wav", "c2.wav"]
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{root}\n" + "".join(f"{n}\t8000\n" for n in names))
    (tmp_path / "train.lbl").write_text("".join(f"id{k}\t/m/a,/m/b{k}\n" for k in range(4)))
    assert shard_main([str(manifest), "--out", str(tmp_path / "sh"), "--shard-size", "2", "--workers", "1",
                       "--format", "flac"]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 clips in 2 shards" in captured.out and "skipped 1 unreadable" in captured.out
    assert "bad.wav" in captured.err and "\r" not in captured.err  # a log gets no progress updates
    assert "bad.wav" in (tmp_path / "sh" / "skipped.tsv").read_text()
    metas = _metas(tmp_path / "sh")
    assert [m["path"] for m in metas.values()] == ["c0.wav", "c1.wav", "c2.wav"]
    assert [m["labels"] for m in metas.values()] == [["/m/a", "/m/b0"], ["/m/a", "/m/b2"], ["/m/a", "/m/b3"]]
    assert metas[0]["num_samples"] == 8000 and metas[0]["sample_rate"] == SR
    assert shard_main([str(manifest), "--out", str(tmp_path / "sh"), "--shard-size", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------- reader


def test_brace_expansion_and_source_detection(shards, tmp_path):
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    with pytest.raises(ValueError, match="brace range"):
        expand_braces("a-{5..2}.tar")
    assert is_shard_source(str(shards)) and is_shard_source("/nowhere/shard-{000000..000009}.tar")
    assert not is_shard_source(str(tmp_path)) and not is_shard_source("train.tsv") and not is_shard_source("")
    ds = ShardDataset(f"{shards}/shard-{{000000..000007}}.tar", CLIP)
    assert [p.name for p in ds.shards] == [f"shard-{k:06d}.tar" for k in range(8)] and ds.num_clips == 30
    with pytest.raises(DataError, match="do not exist"):
        ShardDataset(f"{shards}/shard-{{000000..000008}}.tar", CLIP)
    with pytest.raises(DataError, match="every process needs"):
        ShardDataset(shards / "shard-000000.tar", CLIP, rank=0, world_size=2)


@pytest.mark.parametrize("fmt", ["copy", "flac"])
def test_audio_is_bit_identical_in_the_documented_order(source, tmp_path, fmt):
    out = tmp_path / fmt
    write_shards(source.train_manifest, out, 4, fmt=fmt)
    metas = _metas(out)
    ds = ShardDataset(out, CLIP, seed=7, shuffle_buffer=0)
    items = list(ds)
    perm = np.random.default_rng([7, 0]).permutation(8).tolist()
    assert [it["index"] >> MEMBER_BITS for it in items] == [s for s in perm for _ in range(4 if s < 7 else 2)]
    for it in items:
        want = _original(source, metas[it["index"]])
        assert it["audio"].dtype == torch.int16 and it["length"] == len(want)
        assert torch.equal(it["audio"][:len(want)], torch.from_numpy(want))
        assert not it["audio"][len(want):].any()


def test_shuffle_buffer_order_per_seed(shards):
    ds = ShardDataset(shards, CLIP, seed=3, shuffle_buffer=5)
    got = [it["index"] for it in ds]
    assert got == _buffered(_read_order(ds), 5, 3, 0)
    assert got == [it["index"] for it in ShardDataset(shards, CLIP, seed=3, shuffle_buffer=5)]
    assert got != [it["index"] for it in ShardDataset(shards, CLIP, seed=4, shuffle_buffer=5)]
    ds.set_epoch(1)
    assert [it["index"] for it in ds] == _buffered(_read_order(ds, 1), 5, 3, 1) != got
    assert sorted(got) == sorted(_read_order(ds))


def test_every_clip_once_per_epoch_across_ranks_and_workers(shards):
    seen = []
    for rank in range(2):
        ds = ShardDataset(shards, CLIP, seed=2, rank=rank, world_size=2, shuffle_buffer=3)
        ds.set_epoch(1)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=ShardCollate(ds))
        mine = [i for b in loader for i in b["indices"].tolist()]
        assert {i >> MEMBER_BITS for i in mine} == set(ds.shard_order(1)[rank::2])
        seen += mine
    assert len(seen) == 30 and len(set(seen)) == 30


def test_crop_and_resampling_match_the_file_dataset(tmp_path):
    rng = np.random.default_rng(1)
    files = [tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.flac"]
    soundfile.write(files[0], (rng.standard_normal(5 * SR) * 4000).astype(np.int16), SR)  # crop, int16 fast path
    soundfile.write(files[1], rng.uniform(-0.5, 0.5, (44100 * 2, 2)).astype(np.float32), 44100, subtype="FLOAT")
    soundfile.write(files[2], (rng.standard_normal((3 * SR, 2)) * 3000).astype(np.int16), SR)  # stereo
    ref = AudioClipDataset(files=files, clip_samples=2 * SR, seed=9)
    ref.set_epoch(2)
    for i, f in enumerate(files):
        got = decode_clip(f.read_bytes(), i, clip_samples=2 * SR, sample_rate=SR, seed=9, epoch=2)
        want = ref[i]
        assert torch.equal(got["audio"], want["audio"]) and got["length"] == want["length"]


# ---------------------------------------------------------------- bad data


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _wav(n=8000, seed=0) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, (np.random.default_rng(seed).standard_normal(n) * 3000).astype(np.int16), SR, format="WAV")
    return buf.getvalue()


def test_corrupt_members_are_none_and_reported(tmp_path):
    folder = tmp_path / "sh"
    folder.mkdir()
    _tar(folder / "shard-000000.tar", [
        ("a.wav", _wav(seed=1)), ("a.json", b'{"path": "a.wav"}'),
        ("b.wav", b"RIFF garbage"), ("b.json", b"{}"),
        ("c.wav", _wav(seed=2)), ("c.json", b"{not json"),
        ("d.json", b"{}"),
        ("e.flac", _wav(seed=3)),  # WAV bytes under another audio extension: soundfile reads the header
        ("f.wav", _wav(n=100)),  # too short
    ])
    ds = ShardDataset(folder, SR, shuffle_buffer=0)
    items = list(ds)
    assert [it is None for it in items] == [False, True, True, True, False, True]
    assert [it["index"] for it in items if it is not None] == [0, 4]
    reasons = dict(ds.bad_files)
    assert set(reasons) == {f"{folder}/shard-000000.tar:{k}" for k in "bcdf"}
    assert "cannot decode" in reasons[f"{folder}/shard-000000.tar:b"]
    assert "JSON" in reasons[f"{folder}/shard-000000.tar:c"]
    assert "no audio member" in reasons[f"{folder}/shard-000000.tar:d"]
    assert "too short" in reasons[f"{folder}/shard-000000.tar:f"]
    batch = ShardCollate(ShardDataset(folder, SR, shuffle_buffer=0))(items)
    assert batch["skipped"] == 4 and batch["audio"].shape[0] == 2
    loader_ds = ShardDataset(folder, SR, shuffle_buffer=0)
    loader = torch.utils.data.DataLoader(loader_ds, batch_size=6, num_workers=1, collate_fn=ShardCollate(loader_ds))
    (b,) = list(loader)
    assert sorted(n for n, _ in b["bad_files"]) == sorted(reasons) and b["shards_done"] == [0]
    assert b["skipped"] == 4
    assert collate(items)["skipped"] == 4  # the plain collate counts them too


def test_truncated_shards_do_not_stop_iteration(shards, tmp_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    for p in shards.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    whole = (folder / "shard-000001.tar").read_bytes()
    (folder / "shard-000001.tar").write_bytes(whole[:len(whole) // 2 + 700])  # cut inside a member
    with tarfile.open(shards / "shard-000002.tar") as tf:
        offset = tf.getmembers()[4].offset  # the start of the third clip: a cut at a member boundary
    (folder / "shard-000002.tar").write_bytes((shards / "shard-000002.tar").read_bytes()[:offset])
    ds = ShardDataset(folder, CLIP, shuffle_buffer=4)
    items = list(ds)
    good = [it["index"] for it in items if it is not None]
    by_shard = {s: sum(1 for i in good if i >> MEMBER_BITS == s) for s in range(8)}
    assert by_shard[2] == 2 and 0 < by_shard[1] < 4
    assert by_shard[0] == 4 and by_shard[7] == 2 and len(good) == 30 - 2 - (4 - by_shard[1])
    reasons = dict(ds.bad_files)
    assert len(items) - len(good) == 2 and len(reasons) == 2
    assert "corrupt shard" in reasons[str(folder / "shard-000001.tar")]
    assert "shards.json lists 4" in reasons[str(folder / "shard-000002.tar")]


# ---------------------------------------------------------------- resume


def _loader(ds, workers=2):
    return torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=ShardCollate(ds))


def test_resume_skips_the_completed_shards(shards):
    ds = ShardDataset(shards, CLIP, seed=4, shuffle_buffer=3)
    batches = ShardBatches(ds, _loader(ds), batch_size=2)
    first = []
    for _ in range(7):
        batch, n = batches.next([])
        first += batch["indices"].tolist()
    state = batches.state_dict()
    done = set(state["shards_done"])
    assert state["epoch"] == 0 and state["batches_done"] == 7 and done
    for s in done:  # a shard counts as done only once every one of its clips was handed out
        assert {i for i in first if i >> MEMBER_BITS == s} == {(s << MEMBER_BITS) | m for m in range(ds.expected[s])}
    assert len(done) < 8

    ds2 = ShardDataset(shards, CLIP, seed=4, shuffle_buffer=3)
    resumed = ShardBatches(ds2, _loader(ds2), batch_size=2, state=state)
    rest = []
    while resumed.epoch == 0:
        batch, _ = resumed.next([])
        if resumed.epoch == 0:
            rest += batch["indices"].tolist()
    assert not {i >> MEMBER_BITS for i in rest} & done  # completed shards are not read again
    assert set(first) | set(rest) == set(_read_order(ShardDataset(shards, CLIP)))  # nothing of the epoch is lost
    replayed = set(first) & set(rest)
    assert all((i >> MEMBER_BITS) not in done for i in replayed)
    assert resumed.state_dict()["epoch"] == 1


def test_state_checks(shards):
    ds = ShardDataset(shards, CLIP)
    with pytest.raises(ValueError, match="8 shards on 2"):
        ds.load_state_dict({"epoch": 0, "shards_done": [], "num_shards": 8, "world_size": 2})
    with pytest.raises(ValueError, match="outside"):
        ds.load_state_dict({"epoch": 0, "shards_done": [8], "num_shards": 8, "world_size": 1})
    ds.load_state_dict({"epoch": 3, "shards_done": [1, 2], "num_shards": 8, "world_size": 1})
    ds.set_epoch(3)
    assert ds.state_dict()["shards_done"] == [1, 2]
    ds.set_epoch(4)
    assert ds.state_dict()["shards_done"] == []


def test_resampled_shards_hold_what_the_loader_decodes(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "audio"
    folder.mkdir()
    soundfile.write(folder / "a.wav", rng.uniform(-0.5, 0.5, (44100 * 2, 2)).astype(np.float32), 44100,
                    subtype="FLOAT")
    soundfile.write(folder / "b.flac", (rng.standard_normal(SR) * 3000).astype(np.int16), SR)
    with pytest.raises(ValueError, match="format flac or wav"):
        write_shards(folder, tmp_path / "x", 2, sample_rate=SR)
    write_shards(folder, tmp_path / "sh", 2, fmt="flac", sample_rate=SR)
    metas = list(_metas(tmp_path / "sh").values())
    assert metas[0]["sample_rate"] == SR and metas[0]["source_sample_rate"] == 44100
    assert metas[0]["num_samples"] == 2 * SR
    items = sorted(ShardDataset(tmp_path / "sh", CLIP, shuffle_buffer=0), key=lambda it: it["index"])
    ref = AudioClipDataset(folder, CLIP)
    for i in range(2):
        assert torch.equal(items[i]["audio"], ref[i]["audio"]) and items[i]["length"] == ref[i]["length"]
