"""sslam_fast.manifest: upstream manifests from a folder (sample counts equal soundfile's), the seeded train / valid
split, skipped files, and the label files the fine-tuner reads (class folders and AudioSet's segments CSV)."""

import os

import numpy as np
import pytest
import soundfile

from sslam_fast import manifest
from sslam_fast.data import AudioClipDataset, DataError, read_manifest
from sslam_fast.finetune.data import load_labelled


def write(path, frames, sr=16000, channels=1, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (0.1 * np.random.default_rng(frames).standard_normal((frames, channels))).astype(np.float32)
    soundfile.write(str(path), data, sr, format=fmt)
    return path


@pytest.fixture()
def corpus(tmp_path):
    """A folder with good files of several formats, rates and depths, bad files and a non-audio file."""
    root = tmp_path / "corpus"
    write(root / "a.wav", 16000)
    write(root / "sub" / "b.flac", 44100, sr=44100, channels=2)
    write(root / "sub" / "deeper" / "c.ogg", 8000, sr=8000)
    write(root / "z.WAV", 3210)
    (root / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    (root / "empty.flac").write_bytes(b"")
    write(root / "nosamples.wav", 0)
    (root / "notes.txt").write_text("not audio")
    return root


def test_round_trip_sample_counts(corpus, tmp_path, capsys):
    out = tmp_path / "m" / "train.tsv"
    out.parent.mkdir()
    assert manifest.main([str(corpus), "--out", str(out)]) == 0
    root, entries = read_manifest(out)
    assert root == corpus.resolve()
    assert [rel for rel, _ in entries] == ["a.wav", "sub/b.flac", "sub/deeper/c.ogg", "z.WAV"]
    for rel, n in entries:
        assert n == soundfile.info(str(root / rel)).frames
    assert [n for _, n in entries] == [16000, 44100, 8000, 3210]
    assert out.read_text().splitlines()[0] == os.path.realpath(corpus)
    bad = (tmp_path / "m" / "train.tsv.bad.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in bad] == ["bad.wav", "empty.flac", "nosamples.wav"]
    assert "no audio samples" in bad[2]
    err = capsys.readouterr().err
    assert "4 files" in err and "skipped 3 files" in err and "bad.wav" in err and "train.tsv.bad.txt" in err
    assert not (tmp_path / "m" / "valid.tsv").exists()
    ds = AudioClipDataset(out, clip_samples=16000)  # the trainer's reader takes it
    assert [ds[i] is not None for i in range(len(ds))] == [True] * 4

    # nothing skipped any more: the stale list goes; --ext selects files
    for name in ("bad.wav", "empty.flac", "nosamples.wav"):
        (corpus / name).unlink()
    assert manifest.main([str(corpus), "--out", str(out), "--ext", "wav,.FLAC"]) == 0
    assert [rel for rel, _ in read_manifest(out)[1]] == ["a.wav", "sub/b.flac", "z.WAV"]
    assert not (tmp_path / "m" / "train.tsv.bad.txt").exists()


def test_same_output_with_any_worker_count(corpus, tmp_path):
    outs = []
    for workers in (1, 4):
        out = tmp_path / f"w{workers}" / "train.tsv"
        out.parent.mkdir()
        manifest.write_manifest(corpus, out, workers=workers, valid_percent=0.5, seed=1)
        outs.append([out.read_bytes(), out.with_name("valid.tsv").read_bytes(), (out.parent / "train.tsv.bad.txt")
                     .read_bytes()])
    assert outs[0] == outs[1]


def test_valid_split_reproducible_and_stable(tmp_path):
    root = tmp_path / "many"
    for i in range(60):
        write(root / f"d{i % 3}" / f"{i:03d}.wav", 500 + i)
    out = tmp_path / "train.tsv"

    def split(seed, percent=0.25):
        r = manifest.write_manifest(root, out, valid_percent=percent, seed=seed)
        assert r.valid == tmp_path / "valid.tsv"
        train = [rel for rel, _ in read_manifest(out)[1]]
        valid = [rel for rel, _ in read_manifest(r.valid)[1]]
        return train, valid

    train, valid = split(3)
    assert sorted(train + valid) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.wav"))
    assert not set(train) & set(valid) and 5 <= len(valid) <= 25
    assert split(3) == (train, valid)
    assert split(4)[1] != valid
    write(root / "d0" / "new.wav", 900)  # another file: every old file keeps its side
    train2, valid2 = split(3)
    assert set(valid) <= set(valid2) and set(train) <= set(train2)
    assert manifest.main([str(root), "--out", str(out), "--valid-percent", "30"]) == 2


def test_unusable_paths_and_arguments(tmp_path, capsys):
    root = tmp_path / "odd"
    write(root / "ok.wav", 1000)
    write(root / "tab\there.wav", 1000)
    r = manifest.write_manifest(root, tmp_path / "train.tsv")
    assert [rel for rel, _ in r.train_entries] == ["ok.wav"]
    assert r.bad == [("tab\\there.wav", "the path holds a tab or line break, which a manifest line cannot")]
    read_manifest(tmp_path / "train.tsv")  # still a well-formed manifest
    for args, words in (
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.tsv")], "no such folder"),
        ([str(root), "--out", str(tmp_path / "x.txt")], ".tsv"),
        ([str(root), "--out", str(tmp_path / "valid.tsv"), "--valid-percent", "0.1"], "valid.tsv"),
        ([str(root), "--out", str(tmp_path / "no" / "x.tsv")], "does not exist"),
        ([str(root), "--out", str(tmp_path / "x.tsv"), "--ext", "a/b"], "not a file extension"),
        ([str(root), "--out", str(tmp_path / "x.tsv"), "--workers", "0"], "workers"),
        ([str(root), "--out", str(tmp_path / "x.tsv"), "--class-labels", "c.csv"], "needs --labels"),
    ):
        assert manifest.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err, (args, err)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no audio file below it"):
        manifest.write_manifest(tmp_path / "nothing", tmp_path / "x.tsv")
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.wav").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of its 1 audio files can be used"):
        manifest.write_manifest(tmp_path / "allbad", tmp_path / "x.tsv")


def test_folder_labels_read_by_finetuner(tmp_path):
    root = tmp_path / "classes"
    for label, n in (("dog", 3), ("cat", 2), ("rain drops", 4)):
        for i in range(n):
            write(root / label / f"{label[0]}{i}.wav", 800 + i)
    out = tmp_path / "m" / "train.tsv"
    out.parent.mkdir()
    assert manifest.main([str(root), "--out", str(out), "--labels", "folder", "--valid-percent", "0.3",
                          "--seed", "2"]) == 0
    csv_rows = (out.parent / "label_descriptors.csv").read_text().splitlines()
    assert csv_rows == ["0,cat,cat", "1,dog,dog", "2,rain drops,rain drops"]
    seen = []
    for tsv in (out, out.with_name("valid.tsv")):
        data = load_labelled(tsv)
        root_m, entries = read_manifest(tsv)
        assert data.files == [root_m / rel for rel, _ in entries]
        assert data.class_names == ["cat", "dog", "rain drops"] and not data.multilabel
        for f, row in zip(data.files, data.targets):
            assert data.class_names[int(row.argmax())] == f.parent.name and row.sum() == 1
        lbl = tsv.with_suffix(".lbl").read_text().splitlines()
        assert [line.split("\t")[0] for line in lbl] == [f.stem for f in data.files]
        seen += data.files
    assert len(seen) == 9

    write(root / "loose.wav", 500)  # a file outside any class folder
    with pytest.raises(DataError, match="class folder"):
        manifest.write_manifest(root, out, labels="folder")


SEGMENTS = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=4, num_segs=4, num_unique_labels=3, num_positive_labels=6
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
-0RWZT-miFs, 420.000, 430.000, "/m/03v3yw,/m/0k4j"
YTaaaaaaaaa, 0.000, 10.000, "/m/09x0r"
abc_DEF-123, 10.000, 20.000, "/m/0k4j,/m/09x0r,/m/03v3yw"
"""

CLASS_LABELS = """index,mid,display_name
0,/m/09x0r,"Speech"
1,/t/dd00088,"Gush"
2,/m/0k4j,"Car"
3,/m/03v3yw,"Keys jangling"
4,/m/0aaaa,"Unused"
"""


def test_audioset_segments_labels(tmp_path):
    root = tmp_path / "as"
    write(root / "Y--PJHxphWEs_30.000_40.000.wav", 1600)
    write(root / "-0RWZT-miFs.wav", 1700)
    write(root / "part2" / "YYTaaaaaaaaa.flac", 1800)  # Y + an id that itself starts with Y
    write(root / "abc_DEF-123_10000_20000.wav", 1900)
    write(root / "Yunknown_id_x.wav", 2000)  # no row: skipped
    seg = tmp_path / "balanced_train_segments.csv"
    seg.write_text(SEGMENTS)
    out = tmp_path / "m" / "train.tsv"
    out.parent.mkdir()
    r = manifest.write_manifest(root, out, labels=str(seg))
    assert [rel for rel, _ in r.train_entries] == ["-0RWZT-miFs.wav", "Y--PJHxphWEs_30.000_40.000.wav",
                                                   "abc_DEF-123_10000_20000.wav", "part2/YYTaaaaaaaaa.flac"]
    assert [rel for rel, _ in r.bad] == ["Yunknown_id_x.wav"] and "segments CSV" in r.bad[0][1]
    lbl = out.with_suffix(".lbl").read_text().splitlines()
    assert lbl == ["-0RWZT-miFs\t/m/03v3yw,/m/0k4j", "--PJHxphWEs\t/m/09x0r,/t/dd00088",
                   "abc_DEF-123\t/m/0k4j,/m/09x0r,/m/03v3yw", "YTaaaaaaaaa\t/m/09x0r"]
    mids = ["/m/03v3yw", "/m/09x0r", "/m/0k4j", "/t/dd00088"]
    assert (out.parent / "label_descriptors.csv").read_text().splitlines() == [f"{i},{m},{m}"
                                                                               for i, m in enumerate(mids)]
    data = load_labelled(out)
    assert data.mids == mids and data.multilabel
    assert data.targets.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 0], [0, 1, 0, 0]]

    cls = tmp_path / "class_labels_indices.csv"
    cls.write_text(CLASS_LABELS)
    assert manifest.main([str(root), "--out", str(out), "--labels", str(seg), "--class-labels", str(cls)]) == 0
    data = load_labelled(out)
    assert data.class_names == ["Speech", "Gush", "Car", "Keys jangling", "Unused"]
    assert data.targets.tolist() == [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 0, 0]]

    cls.write_text("index,mid,display_name\n0,/m/09x0r,Speech\n")
    with pytest.raises(DataError, match="is not a mid of"):
        manifest.write_manifest(root, out, labels=str(seg), class_labels=cls)


def test_folder_labels_by_display_name(tmp_path):
    root = tmp_path / "named"
    write(root / "Car" / "x.wav", 700)
    write(root / "/m/09x0r".replace("/", "_") / "y.wav", 700)  # neither a mid nor a name
    cls = tmp_path / "cls.csv"
    cls.write_text(CLASS_LABELS)
    with pytest.raises(DataError, match="neither a mid nor a display name"):
        manifest.write_manifest(root, tmp_path / "t.tsv", labels="folder", class_labels=cls)
    (root / "_m_09x0r" / "y.wav").unlink()
    (root / "_m_09x0r").rmdir()
    write(root / "Speech" / "y.wav", 700)
    manifest.write_manifest(root, tmp_path / "t.tsv", labels="folder", class_labels=cls)
    assert (tmp_path / "t.lbl").read_text().splitlines() == ["x\t/m/0k4j", "y\t/m/09x0r"]
    assert load_labelled(tmp_path / "t.tsv").targets.argmax(1).tolist() == [2, 0]


def test_read_segments_errors(tmp_path):
    bad = tmp_path / "seg.csv"
    bad.write_text("# header\n--PJHxphWEs, 30.000, 40.000\n")
    with pytest.raises(DataError, match="line 2"):
        manifest.read_segments(bad)
    bad.write_text("# only comments\n")
    with pytest.raises(DataError, match="lists no segment"):
        manifest.read_segments(bad)
    bad.write_text('short, 1, 2, "/m/x"\n')
    with pytest.raises(DataError, match="YouTube id"):
        manifest.read_segments(bad)
    with pytest.raises(DataError, match="no such file"):
        manifest.read_segments(tmp_path / "missing.csv")
    bad.write_text('--PJHxphWEs, 0, 10, "/m/a"\n--PJHxphWEs, 10, 20, "/m/b,/m/a"\n')
    assert manifest.read_segments(bad) == {"--PJHxphWEs": ["/m/a", "/m/b"]}
