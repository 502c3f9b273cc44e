"""The trainer on tar shards and HDF5 input: a 2-process torchrun over shards trains, resumes at shard granularity and
counts a corrupt member as a bad file; HDF5 in upstream's layout trains; a resume with other data is refused."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from test_train import SHORT, _metrics, _run


@pytest.fixture(scope="module")
def base(make_run_base) -> Path:
    return make_run_base("train_shards")


@pytest.fixture(scope="module")
def shards(base) -> Path:
    """The built-in training set in 16 shards of 16 clips; one member of rank 0's first shard is corrupt."""
    from sslam_fast.data import ShardDataset, make_default_dataset
    from sslam_fast.shard import write_shards

    out = base / "shards"
    write_shards(make_default_dataset(base / "default_data").train_manifest, out, 16, shuffle=True, seed=3)
    first = ShardDataset(out, 256 * 160, seed=1, rank=0, world_size=2).worker_shards(0)[0]
    path = sorted(out.glob("shard-*.tar"))[first]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    audio = next(k for k, (m, _) in enumerate(members) if not m.name.endswith(".json"))
    members[audio] = (members[audio][0], b"this is not audio" * 64)
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return out


def _torchrun(args, timeout=200):
    return _run(["--standalone", "--nproc_per_node=2", "train.py", *args], python_module="torch.distributed.run",
                timeout=timeout)


def _state(run_dir: Path, name: str = "checkpoint_last.pt") -> dict:
    return torch.load(run_dir / name, weights_only=True)["extra_state"]["sslam_fast_train"]


def test_two_processes_train_and_resume_over_shards(base, shards):
    from sslam_fast.data import ShardDataset

    run_dir = base / "run"
    # read order (no shuffle buffer, whose order tests/test_shards.py checks), so that the shards finished at a stop
    # are known: 8 items a batch (the corrupt one among them), 16 a shard
    data = f"--data={shards}/shard-{{000000..000015}}.tar"
    args = [*SHORT, "--max_updates=8", "--num_workers=1", "--shuffle_buffer=0", data, f"--run_dir={run_dir}"]
    first = _torchrun([*args, "--stop_after=4"])
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    part, summary = _metrics(run_dir)
    assert [r["step"] for r in part] == [1, 2, 3, 4] and summary[0]["stopped_early"] is True
    mid = _state(run_dir)
    assert mid["world_size"] == 2 and len(mid["positions"]) == 2
    for pos in mid["positions"]:
        assert pos["epoch"] == 0 and pos["num_shards"] == 16 and pos["world_size"] == 2
    # 4 updates of 8 items per rank: each rank has finished its first two shards
    done = [set(p["shards_done"]) for p in mid["positions"]]
    order = [ShardDataset(shards, 256 * 160, seed=1, rank=r, world_size=2).worker_shards(0) for r in (0, 1)]
    assert done == [set(order[0][:2]), set(order[1][:2])]

    second = _torchrun([*args, "--resume"])
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "resumed from" in second.stderr
    steps, summary = _metrics(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    end = _state(run_dir)
    # the resumed run read each rank's next shards, not the finished ones again
    assert [set(p["shards_done"]) for p in end["positions"]] == [set(order[0][:4]), set(order[1][:4])]
    # the corrupt member sits in rank 0's first shard, read before the first stop: skipped and counted once
    assert end["counters"]["bad_files"] == 1 and summary[0]["bad_files"] == 1
    bad = (run_dir / "bad_files.txt").read_text()
    assert ".tar:" in bad and "1 bad files" in first.stdout


@pytest.mark.parametrize("first, then", [("built-in", "shards"), ("shards", "built-in")])
def test_resume_that_switches_between_shards_and_other_data_is_refused(base, shards, first, then):
    run_dir = base / f"switch_{first}"
    data = {"built-in": [], "shards": [f"--data={shards}"]}
    res = _run(["train.py", *SHORT, "--max_updates=4", "--stop_after=2", *data[first], f"--run_dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(["train.py", *SHORT, "--max_updates=4", *data[then], f"--run_dir={run_dir}", "--resume"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert "data position" in res.stderr and "resume with the data" in res.stderr


def test_hdf5_input_trains(base):
    """Upstream's h5_format layout (one int16 dataset per clip under its file name) through the trainer."""
    import h5py
    import soundfile

    from sslam_fast.data import make_default_dataset

    ds = make_default_dataset(base / "default_data")
    lines = Path(ds.train_manifest).read_text().splitlines()
    root = Path(lines[0])
    h5 = base / "clips.h5"
    with h5py.File(h5, "w") as f:
        for line in lines[1:33]:
            rel = line.split("\t")[0]
            wav, sr = soundfile.read(str(root / rel), dtype="int16")
            d = f.create_dataset(Path(rel).name, data=wav)
            d.attrs["sample_rate"] = sr
    run_dir = base / "h5run"
    res = _run(["train.py", *SHORT, "--max_updates=3", f"--data={h5}", f"--run_dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-3000:]
    steps, summary = _metrics(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3] and summary[0]["bad_files"] == 0
    assert _state(run_dir)["position"] == {"epoch": 0, "batches_done": 3}
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
