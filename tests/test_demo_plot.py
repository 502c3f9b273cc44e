"""``python -m sslam_fast.demo --plot DIR``: the pictures are written at their figure size, and what they show is the
ops' output: the masks are ``inverse_block_mask``'s for the seed, the mix is ``partial_max_mix``'s, the fbank panels
are each backend's and torchaudio's log-mel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_plot import png_size

from sslam_fast import demo
from sslam_fast.ops import inverse_block_mask, kaldi_fbank, partial_max_mix


@pytest.fixture(scope="module")
def batch():
    return demo.demo_batch(seed=3)


def images_by_gid(fig) -> dict:
    return {im.get_gid(): im for ax in fig.axes for im in ax.images if im.get_gid()}


def test_demo_batch_is_the_model_input(batch):
    clips, feats = batch
    assert clips.shape == (2, int(demo.PLOT_SECONDS * 16000)) and feats.shape == (2, 1, 1024, 128)
    again = demo.demo_batch(seed=3)[0]
    assert torch.equal(clips, again) and not torch.equal(clips[0], clips[1])


def test_plotted_masks_are_the_op_output_for_the_seed(batch):
    _, feats = batch
    data = demo.mask_data(feats, clones=3, seed=11, clip=1)
    want = inverse_block_mask(1, 3, seed=11).view(3, 64, 8)
    assert torch.equal(data["masks"], want)
    assert not torch.equal(data["masks"], inverse_block_mask(1, 3, seed=12).view(3, 64, 8))
    assert torch.equal(data["spec"], feats[1, 0])
    assert ((~data["masks"]).sum((1, 2)) == 102).all()  # ALGORITHM §3: 102 of 512 kept a row

    images = images_by_gid(demo.masks_figure(data, dpi=30))
    for k in range(3):
        shown = images[f"mask:{k}"].get_array()
        grid = want[k].T.numpy()  # (8 frequency patches, 64 time patches)
        assert np.array_equal(shown.filled(0.0), grid.astype(np.float32))
        assert np.array_equal(np.ma.getmaskarray(shown), ~grid)  # the kept patches are transparent


def test_plotted_mix_is_partial_max_mix(batch):
    _, feats = batch
    s1, s2 = 64, 512
    data = demo.mixing_data(feats, (s1, s2), clip=0)
    want = partial_max_mix(feats, (s1, s2))[0, 0]
    assert torch.equal(data["mix"], want)
    assert torch.equal(data["partner"], feats[1, 0])  # clip 0's partner is the last clip (cyclic)
    inside = torch.zeros(1024, dtype=torch.bool)
    inside[s1:s1 + 240] = inside[s2:s2 + 240] = True
    assert torch.equal(want[inside], feats[0, 0][inside])
    assert torch.equal(want[~inside], torch.maximum(feats[0, 0], feats[1, 0])[~inside])

    images = images_by_gid(demo.mixing_figure(data, dpi=30))
    assert np.array_equal(images["mix"].get_array(), want.T.numpy())
    assert np.array_equal(images["partner"].get_array(), feats[1, 0].T.numpy())
    assert np.array_equal(images["added"].get_array(), (want - feats[0, 0]).T.numpy())


def test_plotted_fbank_is_each_backend_and_torchaudio(batch):
    clips, _ = batch
    data = demo.fbank_data(clips[0])
    assert {"reference", "cpp"} <= set(data["backends"]) or set(data["backends"]) == {"reference"}
    assert "triton" not in data["backends"]  # the CPU interpreter is not shown
    want = data["torchaudio"]
    assert want.shape == (1022, 128)
    for label, out in data["backends"].items():
        if "(cuda)" not in label:
            assert torch.equal(out, kaldi_fbank(clips[:1], backend=label)[0]), label
        assert (out - want).abs().max() <= 1e-4, label
    images = images_by_gid(demo.fbank_figure(data, dpi=30))
    for label, out in data["backends"].items():
        assert np.array_equal(images[f"{label}:out"].get_array(), out.T.numpy())
        assert np.array_equal(images[f"{label}:diff"].get_array(), (out - want).T.numpy())


def test_demo_plot_writes_three_pngs(tmp_path, capsys, batch):
    out = tmp_path / "pictures"
    demo.main(["--plot", str(out), "--clones", "2", "--dpi", "50", "--seed", "3"])
    printed = capsys.readouterr().out
    rows = len(demo.fbank_data(batch[0][0])["backends"])
    sizes = {  # figure inches x dpi
        "masks.png": (10.0 * 50, (1.3 * 3 + 0.3) * 50),
        "mixing.png": (10.0 * 50, 6.0 * 50),
        "fbank.png": (12.0 * 50, (2.2 * rows + 0.4) * 50),
    }
    for name, (w, h) in sizes.items():
        assert f"wrote {out / name}" in printed
        assert png_size(out / name) == (round(w), round(h)), name


@pytest.mark.parametrize("args, message", [(["--clones", "0"], "--clones"), (["--dpi", "5"], "--dpi"),
                                           (["--seed", "-1"], "--seed")])
def test_demo_plot_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        demo.main(["--plot", str(tmp_path / "p"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
