"""HDF5 audio in upstream's ``h5_format`` layout (``[E] data/raw_audio_dataset.py : FileAudioDataset.__getitem__``)."""

import numpy as np
import pytest
import torch
import torchaudio

from sslam_fast.data import DataError, HDF5ClipDataset, collate, is_hdf5_source

h5py = pytest.importorskip("h5py", reason="h5py is not installed (pip install h5py): HDF5 input is optional")

SR = 16000


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A manifest over two HDF5 files as upstream lays them out: ``<file>.h5/<clip name>``, 1-D datasets at the top
    level; float32 at 32 kHz without attributes (upstream's fixed rate), int16 at 16 kHz with a sample_rate
    attribute, a stereo clip, and an entry naming a dataset that is not there."""
    root = tmp_path_factory.mktemp("h5")
    rng = np.random.default_rng(0)
    data = {
        "0.h5/a.wav": rng.uniform(-0.5, 0.5, 2 * 32000).astype(np.float32),
        "0.h5/b.wav": rng.uniform(-0.5, 0.5, 32000).astype(np.float32),
        "1.h5/c.wav": (rng.standard_normal(3 * SR) * 3000).astype(np.int16),
        "1.h5/d.wav": (rng.standard_normal((SR, 2)) * 3000).astype(np.int16),
    }
    for name in ("0.h5", "1.h5"):
        with h5py.File(root / name, "w") as f:
            for key, x in data.items():
                if key.startswith(name):
                    ds = f.create_dataset(key.split("/")[1], data=x)
                    if x.dtype == np.int16:
                        ds.attrs["sample_rate"] = SR
    entries = list(data) + ["1.h5/missing.wav"]
    manifest = root / "train.tsv"
    manifest.write_text(f"{root}\n" + "".join(f"{e}\t{len(data.get(e, [0]))}\n" for e in entries))
    return root, manifest, data


def _int16(x: torch.Tensor) -> torch.Tensor:
    return (x * 32768.0).round().clamp(-32768, 32767).to(torch.int16)


def test_reads_the_written_audio(upstream):
    root, manifest, data = upstream
    assert is_hdf5_source(str(manifest)) and is_hdf5_source(str(root)) and is_hdf5_source(str(root / "0.h5"))
    ds = HDF5ClipDataset(manifest, 3 * SR, random_crop=False)
    assert len(ds) == 5 and ds.path(0) == f"{root / '0.h5'}/a.wav"
    a = ds[0]
    want = _int16(torchaudio.functional.resample(torch.from_numpy(data["0.h5/a.wav"]), 32000, SR))
    assert a["length"] == 2 * SR and torch.equal(a["audio"][:2 * SR], want) and not a["audio"][2 * SR:].any()
    c = ds[2]
    assert c["length"] == 3 * SR and torch.equal(c["audio"], torch.from_numpy(data["1.h5/c.wav"]))  # bit-exact
    d = ds[3]
    stereo = data["1.h5/d.wav"].astype(np.float32) / 32768
    assert torch.equal(d["audio"][:SR], _int16(torch.from_numpy(stereo.mean(axis=1, dtype=np.float32))))
    assert ds[4] is None and "no dataset 'missing.wav'" in ds.bad_files[-1][1]
    batch = collate([ds[i] for i in range(5)])
    assert batch["skipped"] == 1 and batch["indices"].tolist() == [0, 1, 2, 3]


def test_crop_reads_the_same_span_as_the_whole_clip(upstream):
    root, manifest, data = upstream
    ds = HDF5ClipDataset(manifest, SR, seed=3)
    ds.set_epoch(1)
    c = ds[2]  # 16 kHz int16: only the cropped span is read
    start = int(np.random.default_rng([3, 1, 2]).integers(0, 3 * SR - SR + 1))
    assert torch.equal(c["audio"], torch.from_numpy(data["1.h5/c.wav"][start:start + SR]))
    f32 = HDF5ClipDataset(manifest, SR, seed=3, as_int16=False)
    f32.set_epoch(1)
    assert torch.equal(f32[2]["audio"], torch.from_numpy(data["1.h5/c.wav"][start:start + SR]) / 32768)


def test_folders_files_and_workers(upstream):
    root, manifest, data = upstream
    by_file = HDF5ClipDataset(root / "1.h5", 3 * SR, random_crop=False)
    assert [by_file.path(i).rsplit("/", 1)[1] for i in range(len(by_file))] == ["c.wav", "d.wav"]
    assert len(HDF5ClipDataset(root, 3 * SR)) == 4
    ds = HDF5ClipDataset(manifest, 3 * SR, random_crop=False)
    ds[0]  # a file opened in the parent before the workers start
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate)
    (batch,) = list(loader)
    assert batch["indices"].tolist() == [0, 1, 2, 3] and batch["skipped"] == 1
    assert torch.equal(batch["audio"][2], torch.from_numpy(data["1.h5/c.wav"]))


def test_bad_sources(upstream, tmp_path):
    root, manifest, _ = upstream
    plain = tmp_path / "plain.tsv"
    plain.write_text(f"{root}\nclip.wav\t100\n")
    assert not is_hdf5_source(str(plain))
    with pytest.raises(DataError, match="upstream h5_format"):
        HDF5ClipDataset(plain, SR)
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        HDF5ClipDataset(tmp_path / "broken.h5", SR)
    with pytest.raises(ValueError, match="h5_sample_rate"):
        HDF5ClipDataset(manifest, SR, h5_sample_rate=0)
