"""Labelled fine-tuning data: upstream manifests (.tsv + .lbl + labels CSV), class folders with ESC-50 folds, the
built-in synthetic set, and ``AudioClipDataset(files=...)``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile as sf
import torch

from sslam_fast.data import CLASS_NAMES, AudioClipDataset, DataError, collate
from sslam_fast.finetune.data import LabelledData, load_labelled, read_label_csv, read_lbl


def _wav(path, n=800, value=0.1):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.full(n, value, np.float32), 16000, subtype="PCM_16")
    return path


# --- upstream manifests ----------------------------------------------------------------------------------------------

SPASS_CSV = "0,music,music\n1,dog,dog\n2,bus_idling,bus_idling\n3,wind,wind\n"


def _manifest(tmp_path, lbl_lines, csv_text=SPASS_CSV, csv_name="label_descriptors.csv", names=None):
    """``train.tsv`` over clips ``a/0.wav ...`` (one per .lbl line unless ``names``), ``train.lbl`` and the CSV."""
    audio = tmp_path / "audio"
    names = names or [f"a/{i}.wav" for i in range(len(lbl_lines))]
    for n in names:
        _wav(audio / n)
    d = tmp_path / "manifest"
    d.mkdir(exist_ok=True)
    (d / "train.tsv").write_text(f"{audio}\n" + "".join(f"{n}\t800\n" for n in names))
    (d / "train.lbl").write_text("".join(line + "\n" for line in lbl_lines))
    if csv_text is not None:
        (d / csv_name).write_text(csv_text)
    return d / "train.tsv", audio, names


def test_manifest_lbl_and_label_descriptors(tmp_path):
    tsv, audio, names = _manifest(tmp_path, ["a/0\tdog,wind", "a/1\tmusic", "a/2", "a/3\twind,dog,wind"])
    data = load_labelled(str(tsv))
    assert isinstance(data, LabelledData) and len(data) == 4 and data.num_classes == 4
    assert data.files == [audio / n for n in names]
    assert data.mids == ["music", "dog", "bus_idling", "wind"] == data.class_names
    want = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]], dtype=torch.float32)
    assert data.targets.dtype == torch.float32 and torch.equal(data.targets, want)
    assert data.multilabel is True
    # the split argument does not apply to a manifest: it names its split itself
    assert torch.equal(load_labelled(tsv, split="valid").targets, want)


def test_manifest_whitespace_separated_lbl_single_label(tmp_path):
    """Upstream splits a .lbl line on any whitespace; every clip with one label -> single-label data."""
    tsv, _, _ = _manifest(tmp_path, ["id0 bus_idling", "id1   music"])
    data = load_labelled(tsv)
    assert torch.equal(data.targets, torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0]])) and data.multilabel is False


def test_audioset_class_labels_indices_csv(tmp_path):
    """AudioSet's CSV: a header, quoted display names with commas, the index column giving the output column."""
    csv_text = ('index,mid,display_name\n2,/m/03,"Speech, loud"\n0,/m/01,Music\n1,/m/02,"Dog, bark"\n')
    tsv, _, _ = _manifest(tmp_path, ["x\t/m/03", "y\t/m/01,/m/02"], csv_text=csv_text,
                          csv_name="class_labels_indices.csv")
    data = load_labelled(tsv)
    assert data.mids == ["/m/01", "/m/02", "/m/03"]
    assert data.class_names == ["Music", "Dog, bark", "Speech, loud"]
    assert torch.equal(data.targets, torch.tensor([[0.0, 0, 1], [1, 1, 0]]))
    # labels= wins over the CSV beside the manifest
    other = tmp_path / "other.csv"
    other.write_text("0,/m/03,S\n1,/m/02,D\n2,/m/01,M\n")
    data = load_labelled(tsv, labels=str(other))
    assert data.class_names == ["S", "D", "M"] and torch.equal(data.targets, torch.tensor([[1.0, 0, 0], [0, 1, 1]]))


def test_read_label_csv_header_columns_and_defaults(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("index,display_name,mid\n1,Bee,/m/b\n0,Ant,/m/a\n")
    assert read_label_csv(p) == (["/m/a", "/m/b"], ["Ant", "Bee"])
    p.write_text("0,cat\n1,dog\n")  # no display name: the mid names the class
    assert read_label_csv(p) == (["cat", "dog"], ["cat", "dog"])


@pytest.mark.parametrize("text, needle", [
    ("0,a,A\n0,b,B\n", "line 2: class index 0 appears twice"),
    ("0,a,A\n1,a,B\n", "line 2: mid 'a' appears twice"),
    ("0,a,A\nx,b,B\n", "line 2: the index 'x' is not a non-negative integer"),
    ("0,a,A\n2,b,B\n", "the class indices must be 0..1, each once; 1 is missing"),
    ("0,a,A\n1\n", "line 2: expected 'index,mid,display_name'"),
    ("index,display_name\n0,A\n", "line 1: the header"),
    ("\n\n", "lists no classes"),
])
def test_read_label_csv_errors_name_file_and_line(tmp_path, text, needle):
    p = tmp_path / "labels.csv"
    p.write_text(text)
    with pytest.raises(DataError, match=re.escape(needle)) as e:
        read_label_csv(p)
    assert str(p) in str(e.value)


def test_read_lbl_unknown_mid_names_file_and_line(tmp_path):
    p = tmp_path / "x.lbl"
    p.write_text("a\tdog\n\nb\tdog,cat\n")
    with pytest.raises(DataError, match=re.escape(f"label file {p} line 3: label 'cat' is not a class")):
        read_lbl(p, ["dog"])
    p.write_text("a\tdog\tcat\n")
    with pytest.raises(DataError, match="line 1: expected 'clip_id<TAB>mid,mid,...'"):
        read_lbl(p, ["dog", "cat"])
    p.write_text("a\tdog,,dog\nb\t\n")  # repeats count once; an empty label list is a clip without labels
    assert read_lbl(p, ["dog"]) == [[0], []]


def test_manifest_errors(tmp_path):
    tsv, _, _ = _manifest(tmp_path, ["a\tdog", "b\tcow"])
    with pytest.raises(DataError, match=re.escape(f"{tsv.with_suffix('.lbl')} line 2: label 'cow'")):
        load_labelled(tsv)
    tsv.with_suffix(".lbl").write_text("a\tdog\n")
    with pytest.raises(DataError, match="has 1 clip lines, its manifest .* 2 clips"):
        load_labelled(tsv)
    tsv.with_suffix(".lbl").unlink()
    with pytest.raises(DataError, match=re.escape(f"its label file {tsv.with_suffix('.lbl')}")):
        load_labelled(tsv)
    (tsv.parent / "label_descriptors.csv").unlink()
    with pytest.raises(DataError, match="no labels CSV; put label_descriptors.csv or class_labels_indices.csv"):
        load_labelled(tsv)
    with pytest.raises(DataError, match="labels CSV .*gone.csv: no such file"):
        load_labelled(tsv, labels=str(tmp_path / "gone.csv"))
    with pytest.raises(DataError, match="no such manifest or folder"):
        load_labelled(str(tmp_path / "missing.tsv"))
    with pytest.raises(DataError, match="is one audio file"):
        load_labelled(str(tmp_path / "audio" / "a" / "0.wav"))
    with pytest.raises(ValueError, match="fold=2 applies to a class folder"):
        load_labelled(tsv, fold=2)


# --- class folders and folds -----------------------------------------------------------------------------------------


def _esc_folder(tmp_path, with_prefix=True):
    """root/<class>/*.wav with classes 'dog' and 'cat', two files per fold 1..3 spread over them."""
    root = tmp_path / "esc"
    files = {}
    for fold in (1, 2, 3):
        for k, cls in enumerate(("dog", "cat")):
            name = f"{fold}-{100 + k}-A-{k}.wav" if with_prefix else f"clip{fold}{k}.wav"
            files[_wav(root / cls / name)] = fold
    return root, files


def test_folder_classes_sorted_one_hot(tmp_path):
    root, files = _esc_folder(tmp_path)
    data = load_labelled(str(root))
    assert data.class_names == ["cat", "dog"] == data.mids and data.multilabel is False
    assert len(data) == 6 and set(data.files) == set(files)
    assert data.files == sorted(data.files, key=lambda f: (f.parent.name, f.name))
    want = torch.tensor([[1.0, 0.0] if f.parent.name == "cat" else [0.0, 1.0] for f in data.files])
    assert torch.equal(data.targets, want)
    assert load_labelled(root, split="valid").files == data.files  # no fold: every file for either split


@pytest.mark.parametrize("fold", [1, 2, 3])
def test_folder_fold_by_name_prefix(tmp_path, fold):
    root, files = _esc_folder(tmp_path)
    train = load_labelled(str(root), fold=fold, split="train")
    valid = load_labelled(str(root), fold=fold, split="valid")
    assert {files[f] for f in valid.files} == {fold} and len(valid) == 2
    assert fold not in {files[f] for f in train.files} and len(train) == 4
    assert set(train.files) | set(valid.files) == set(files)
    assert train.class_names == valid.class_names == ["cat", "dog"]
    for d in (train, valid):
        assert torch.equal(d.targets.argmax(1), torch.tensor([int(f.parent.name == "dog") for f in d.files]))


def test_folder_fold_from_esc50_meta(tmp_path):
    """meta/esc50.csv's fold column decides, whatever the names say (here they disagree on purpose)."""
    root, files = _esc_folder(tmp_path)
    (root / "meta").mkdir()
    rows = "".join(f"{f.name},{4 - fold},0,{f.parent.name},False,x,A\n" for f, fold in files.items())
    (root / "meta" / "esc50.csv").write_text("filename,fold,target,category,esc10,src_file,take\n" + rows)
    valid = load_labelled(root, fold=1, split="valid")
    assert {files[f] for f in valid.files} == {3}
    assert load_labelled(root).class_names == ["cat", "dog"]  # meta/ holds no audio: not a class
    (root / "meta" / "esc50.csv").write_text("filename,fold\n" + rows.splitlines()[0].split(",")[0] + ",1\n")
    with pytest.raises(DataError, match="not listed in .*esc50.csv, so its fold is unknown"):
        load_labelled(root, fold=1)
    (root / "meta" / "esc50.csv").write_text("filename,fold\nx.wav,one\n")
    with pytest.raises(DataError, match="esc50.csv line 2: the fold 'one' is not an integer"):
        load_labelled(root, fold=1)


def test_folder_fold_errors(tmp_path):
    root, files = _esc_folder(tmp_path, with_prefix=False)
    with pytest.raises(DataError, match=r"cat/clip11.wav: cannot tell its fold.*has no meta/esc50.csv"):
        load_labelled(root, fold=1)
    assert len(load_labelled(root)) == 6  # unfolded use needs no fold
    root, _ = _esc_folder(tmp_path / "b")
    with pytest.raises(DataError, match=r"fold 5 holds no file \(the folds found: \[1, 2, 3\]\)"):
        load_labelled(root, fold=5, split="valid")
    with pytest.raises(ValueError, match="split must be 'train' or 'valid'"):
        load_labelled(root, split="test")
    with pytest.raises(ValueError, match="fold must be a non-negative int"):
        load_labelled(root, fold=-1)
    _wav(root / "loose.wav")
    with pytest.raises(DataError, match="loose.wav: an audio file directly in"):
        load_labelled(root)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folder with audio files"):
        load_labelled(empty)


def test_folder_with_labels_csv(tmp_path):
    root, _ = _esc_folder(tmp_path)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("index,mid,display_name\n0,/m/dog,dog\n1,/m/bird,bird\n2,/m/cat,cat\n")
    data = load_labelled(root, labels=str(csv_path))
    assert data.num_classes == 3 and data.class_names == ["dog", "bird", "cat"]
    assert torch.equal(data.targets.argmax(1), torch.tensor([2 if f.parent.name == "cat" else 0 for f in data.files]))
    csv_path.write_text("0,/m/dog,dog\n")
    with pytest.raises(DataError, match="class folder 'cat' is neither a mid nor a display name"):
        load_labelled(root, labels=str(csv_path))


# --- the built-in synthetic set --------------------------------------------------------------------------------------


def test_synthetic_train_and_heldout(make_run_base, monkeypatch):
    base = make_run_base("ft_data")
    root = base / "default_data"
    train = load_labelled("", synthetic_root=root)
    valid = load_labelled("", synthetic_root=root, split="valid")
    assert train.class_names == list(CLASS_NAMES) == valid.mids and train.multilabel and valid.multilabel
    assert len(train) == 256 and len(valid) == 128
    assert all(f.parent.name == "train" for f in train.files) and all(f.parent.name == "heldout" for f in valid.files)
    labels = {}
    for line in (root / "labels.tsv").read_text().splitlines():
        rel, _, classes = line.partition("\t")
        labels[rel] = sorted(int(c) for c in classes.split(","))
    for d in (train, valid):
        for f, row in zip(d.files, d.targets):
            assert torch.nonzero(row).flatten().tolist() == labels[f"{f.parent.name}/{f.name}"]
    # the default root: <cwd>/runs/default_data, where train.py's and finetune.py's default run_dirs put it
    (base / "runs").mkdir()
    (base / "runs" / "default_data").symlink_to(root.resolve(), target_is_directory=True)
    monkeypatch.chdir(base)
    import sslam_fast.data

    seen, real = [], sslam_fast.data.make_default_dataset
    monkeypatch.setattr(sslam_fast.data, "make_default_dataset", lambda r: seen.append(r) or real(r))
    assert load_labelled("", split="valid").files == valid.files
    assert seen == [base / "runs" / "default_data"]
    with pytest.raises(ValueError, match="not the built-in set"):
        load_labelled("", fold=1, synthetic_root=root)


# --- AudioClipDataset(files=...) -------------------------------------------------------------------------------------


def test_audio_clip_dataset_from_files_feeds_targets(tmp_path):
    tsv, audio, names = _manifest(tmp_path, ["a\tdog", "b\tmusic,wind", "c\tbus_idling"])
    (audio / names[1]).write_bytes(b"not audio")  # a bad file: skipped, its index missing from the batch
    data = load_labelled(tsv)
    ds = AudioClipDataset(files=data.files, clip_samples=1000, random_crop=False)
    assert len(ds) == 3 and ds.path(2) == audio / names[2]
    batch = collate([ds[i] for i in range(3)])
    assert batch["indices"].tolist() == [0, 2] and batch["skipped"] == 1
    assert torch.equal(data.targets[batch["indices"]], torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0]]))
    assert batch["audio"].shape == (2, 1000) and batch["lengths"].tolist() == [800, 800]
    assert ds.bad_files and ds.bad_files[0][0] == str(audio / names[1])
    # the positional form is unchanged
    assert AudioClipDataset(tsv, 1000).files == data.files


def test_audio_clip_dataset_files_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of source"):
        AudioClipDataset(clip_samples=1000)
    with pytest.raises(ValueError, match="exactly one of source"):
        AudioClipDataset(tmp_path, 1000, files=[tmp_path / "a.wav"])
    with pytest.raises(DataError, match="files= is empty"):
        AudioClipDataset(files=[], clip_samples=1000)
    with pytest.raises(ValueError, match="files must be a list of paths"):
        AudioClipDataset(files=str(tmp_path / "a.wav"), clip_samples=1000)
