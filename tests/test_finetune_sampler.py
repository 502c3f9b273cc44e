"""AS-2M weighted sampling (sslam_fast.finetune.sampler): the label-weight formula, the weights file, and the
per-epoch draws without replacement: reproducible per (seed, epoch), split over ranks, resumable."""

from __future__ import annotations

import pytest
import torch

from sslam_fast.data import DataError
from sslam_fast.finetune.sampler import WeightedEpochSampler, label_weights, read_weights

LABELS = torch.tensor(
    [
        [1, 0, 1, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],  # no label: never drawn
    ],
    dtype=torch.bool,
)


def test_label_weights_formula_on_a_hand_made_matrix():
    # counts per label: 3, 1, 2, 0 -> label weights 1000 / (count + 0.01)
    w0, w1, w2 = 1000 / 3.01, 1000 / 1.01, 1000 / 2.01
    want = torch.tensor([w0 + w2, w0 + w1, w2, w0, 0.0], dtype=torch.float64)
    got = label_weights(LABELS)
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert torch.allclose(got, want, rtol=1e-12)
    assert torch.allclose(label_weights(LABELS.float()), want, rtol=1e-12)  # multi-hot floats read the same
    assert torch.allclose(label_weights(LABELS.float() * 0.7), want, rtol=1e-12)  # presence, not the value
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        label_weights(LABELS[0])
    with pytest.raises(ValueError, match="non-finite"):
        label_weights(torch.tensor([[float("nan"), 1.0]]))


def test_read_weights_plain_and_csv(tmp_path):
    plain = tmp_path / "w.csv"
    plain.write_text("1.5\n2\n\n0.25\n")  # np.loadtxt's format; blank lines ignored
    assert torch.equal(read_weights(plain, 3), torch.tensor([1.5, 2.0, 0.25], dtype=torch.float64))
    csv = tmp_path / "w2.csv"
    csv.write_text("id,weight\nclip_a,3.0\nclip_b,1e-3\n")
    assert torch.equal(read_weights(csv, 2), torch.tensor([3.0, 1e-3], dtype=torch.float64))


@pytest.mark.parametrize(
    "text, n, needle",
    [
        ("1\n2\n", 3, "holds 2 weights but the training set has 3"),
        ("1\nx\n", 2, "line 2: expected a number"),
        ("1\n-2\n", 2, "negative"),
        ("0\n0\n", 2, "only zero"),
        ("1\nnan\n", 2, "non-finite"),
    ],
)
def test_read_weights_errors(tmp_path, text, n, needle):
    f = tmp_path / "w.csv"
    f.write_text(text)
    with pytest.raises(DataError, match=needle):
        read_weights(f, n)


def test_read_weights_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_weights(tmp_path / "nope.csv", 3)


def epoch(s: WeightedEpochSampler, e: int) -> list[int]:
    s.set_epoch(e)
    return list(s)


def test_draws_without_replacement_reproducible_and_new_each_epoch():
    w = torch.rand(1000, dtype=torch.float64) + 0.01
    w[:100] = 0.0  # zero weight: never drawn
    s = WeightedEpochSampler(w, 300, seed=3)
    e0, e1 = epoch(s, 0), epoch(s, 1)
    for draws in (e0, e1):
        assert len(draws) == len(set(draws)) == 300 == len(s)
        assert min(draws) >= 100 and max(draws) < 1000
    assert e0 != e1 and set(e0) != set(e1)
    again = WeightedEpochSampler(w.clone(), 300, seed=3)
    assert epoch(again, 1) == e1 and epoch(again, 0) == e0  # identical per (seed, epoch), in any order
    assert epoch(WeightedEpochSampler(w, 300, seed=4), 0) != e0


def test_draws_follow_torch_multinomial_with_the_epoch_generator():
    """Each epoch is torch.multinomial(weights, num_draws, replacement=False) on a generator seeded for (seed,
    epoch): the same law as upstream's ordered_indices."""
    from sslam_fast.finetune.sampler import _epoch_seed

    w = torch.rand(50, dtype=torch.float64)
    s = WeightedEpochSampler(w, 20, seed=9)
    g = torch.Generator().manual_seed(_epoch_seed(9, 2))
    assert epoch(s, 2) == torch.multinomial(w, 20, replacement=False, generator=g).tolist()


def test_heavier_clips_are_drawn_more_often():
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0, 10.0, 10.0, 10.0], dtype=torch.float64)
    s = WeightedEpochSampler(w, 2, seed=0)
    hits = torch.zeros(8)
    for e in range(2000):
        hits[epoch(s, e)] += 1
    light, heavy = hits[:4].mean(), hits[4:].mean()
    assert heavy > 5 * light  # first-draw odds 10:1, diluted by the second draw without replacement
    assert hits.sum() == 4000


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_one_epoch_without_overlap(world_size):
    w = torch.rand(400, dtype=torch.float64) + 0.1
    n = 100
    ranks = [WeightedEpochSampler(w, n, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    parts = [epoch(s, 5) for s in ranks]
    assert all(len(p) == n // world_size for p in parts)
    union = [i for p in parts for i in p]
    assert len(union) == len(set(union))  # no clip on two ranks
    single = epoch(WeightedEpochSampler(w, n, seed=1), 5)
    assert set(union) == set(single[: n // world_size * world_size])  # the same draws, dealt out


def test_set_start_resumes_exactly():
    w = torch.rand(200, dtype=torch.float64)
    s = WeightedEpochSampler(w, 60, seed=2, rank=1, world_size=2)
    full = epoch(s, 3)
    resumed = WeightedEpochSampler(w, 60, seed=2, rank=1, world_size=2)
    resumed.set_epoch(3)
    resumed.set_start(17)
    assert len(resumed) == 30 - 17
    assert list(resumed) == full[17:]
    resumed.set_epoch(4)  # a new epoch starts from its beginning
    assert len(resumed) == 30 and list(resumed) == epoch(s, 4)
    resumed.set_start(30)
    assert list(resumed) == [] and len(resumed) == 0


def test_works_as_a_dataloader_sampler():
    w = torch.rand(40, dtype=torch.float64)
    s = WeightedEpochSampler(w, 12, seed=0)
    loader = torch.utils.data.DataLoader(list(range(40)), batch_size=4, sampler=s)
    s.set_epoch(1)
    got = torch.cat(list(loader)).tolist()
    assert got == epoch(WeightedEpochSampler(w, 12, seed=0), 1)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_draws=5), "num_draws"),  # only 4 clips have weight
        (dict(num_draws=0), "num_draws"),
        (dict(num_draws=2, rank=2, world_size=2), "rank"),
        (dict(num_draws=3, world_size=4), "num_draws"),
        (dict(num_draws=2, seed=-1), "seed"),
    ],
)
def test_bad_arguments(kwargs, needle):
    w = label_weights(LABELS)
    args = dict(seed=0) | kwargs
    with pytest.raises(ValueError, match=needle):
        WeightedEpochSampler(w, args.pop("num_draws"), **args)


def test_bad_weights_and_positions():
    with pytest.raises(ValueError, match="1-D"):
        WeightedEpochSampler(torch.ones(2, 2), 1, seed=0)
    with pytest.raises(ValueError, match="negative"):
        WeightedEpochSampler(torch.tensor([1.0, -1.0]), 1, seed=0)
    with pytest.raises(ValueError, match="only zero"):
        WeightedEpochSampler(torch.zeros(3), 1, seed=0)
    s = WeightedEpochSampler([1.0, 2.0, 3.0], 2, seed=0)
    with pytest.raises(ValueError, match="start"):
        s.set_start(3)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
