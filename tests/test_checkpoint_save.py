"""Checkpoint saving (ALGORITHM §8): fairseq-layout pre-training and fine-tuned files written atomically and read
back, per-tensor checksums that catch damaged bytes, one-line state errors, and the package's lazy top-level exports.
The upstream-shaped files come from the builders of ``test_checkpoint.py``."""

import argparse
import dataclasses
import io
import os
import subprocess
import sys

import pytest
import torch
from test_checkpoint import assert_sd_equal, fairseq_pretrain, student_shapes

import sslam_fast
from sslam_fast.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    load_checkpoint,
    load_module_state,
    load_pretrained,
    load_pretraining,
    read_checkpoint_file,
    save_finetuned_checkpoint,
    save_pretraining_checkpoint,
    tensor_checksums,
)
from sslam_fast.models import AudioClassifier, EATEncoder, ModelConfig, PretrainingModel


def _trained_tiny():
    cfg = ModelConfig.tiny()
    model = PretrainingModel(cfg)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.5)  # teacher != student
        for p in model.decoder.parameters():
            p.normal_()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.student.cls_token.grad = torch.ones_like(model.student.cls_token)
    opt.step()
    model.num_updates = 123
    return cfg, model, opt


def test_save_pretraining_roundtrip(tmp_path):
    cfg, model, opt = _trained_tiny()
    path = save_pretraining_checkpoint(tmp_path / "ck.pt", model, opt, extra_state={"best": 0.5})
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert raw["args"] is None and raw["criterion"] is None and raw["task_state"] == {}
    last = raw["optimizer_history"][-1]
    assert last["num_updates"] == 123 and last["optimizer_name"] == "AdamW" and "best" in last["lr_scheduler_state"]
    assert raw["cfg"]["model"]["_name"] == "data2vec_multi" and raw["cfg"]["task"]["_name"] == "mae_image_pretraining"
    m = raw["cfg"]["model"]
    assert (m["clone_batch"], m["average_top_k_layers"], m["depth"], m["num_heads"], m["embed_dim"]) == (4, 2, 2, 4, 64)
    assert m["modalities"]["image"]["decoder"]["decoder_groups"] == 4 and m["modalities"]["image"]["mask_prob"] == 0.8
    assert raw["extra_state"]["best"] == 0.5 and "train_iterator" in raw["extra_state"]
    assert raw["last_optimizer_state"]["param_groups"][0]["lr"] == 1e-3
    sd = raw["model"]
    assert {k: tuple(v.shape) for k, v in sd.items() if k != "_ema"} == student_shapes()
    assert {k: tuple(v.shape) for k, v in sd["_ema"].items()} == student_shapes(decoder=False)
    assert all(v.dtype == torch.float32 for v in sd["_ema"].values())
    assert not any(f.startswith(".ck.pt") for f in os.listdir(tmp_path))

    back = load_pretraining(path)
    assert back.num_updates == 123
    assert dataclasses.replace(back.cfg, mix_window_frames=cfg.mix_window_frames) == cfg
    for a, b in [(back.student, model.student), (back.decoder, model.decoder), (back.teacher, model.teacher)]:
        assert_sd_equal(a.state_dict(), b.state_dict())
    assert not torch.equal(back.teacher.cls_token, back.student.cls_token)


def test_save_finetuned_roundtrip(tmp_path):
    clf = AudioClassifier(ModelConfig.tiny(), num_classes=11)
    with torch.no_grad():
        clf.fc_norm.weight.normal_()
    path = save_finetuned_checkpoint(tmp_path / "ft.pt", clf, num_updates=9)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["cfg"]["model"]["_name"] == "mae_image_classification"
    assert raw["cfg"]["model"]["pretrained_model_args"]["model"]["modalities"]["image"]["num_alibi_heads"] == 4
    assert raw["cfg"]["model"]["pretrained_model_args"]["model"]["modalities"]["image"]["model_depth"] == 2
    assert "head.weight" in raw["model"] and "model.blocks.1.mlp.fc1.weight" in raw["model"]
    assert not any("decoder" in k for k in raw["model"]) and "_ema" not in raw["model"]
    back = load_pretrained(path)
    assert isinstance(back, AudioClassifier) and back.head.out_features == 11
    assert_sd_equal(back.state_dict(), clf.state_dict())


def test_atomic_save_failures_keep_old_file(tmp_path, monkeypatch):
    cfg, model, opt = _trained_tiny()
    path = tmp_path / "ck.pt"
    save_pretraining_checkpoint(path, model)
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("state exploded")

    monkeypatch.setattr(model.decoder, "state_dict", boom)
    with pytest.raises(RuntimeError, match="state exploded"):
        save_pretraining_checkpoint(path, model)
    monkeypatch.undo()

    real_save = torch.save

    def half_save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: buf.tell() // 2])  # half the file reaches the disk, then the write fails
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretraining_checkpoint(path, model)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.pt"]
    assert load_pretraining(path).num_updates == 123
    with pytest.raises(TypeError, match=r"cfg\['model'\]\['bad'\] must hold plain values"):
        save_pretraining_checkpoint(path, model, cfg={"model": {"bad": argparse.Namespace()}})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.pt"]


def _damage(data: bytes, tensor: torch.Tensor, patch: bytes, at: int = 64) -> bytes:
    """``data`` (a whole checkpoint file) with ``patch`` written ``at`` bytes into ``tensor``'s stored bytes: damage
    inside a valid archive, which torch.load does not notice (it does not check the zip's CRCs)."""
    blob = tensor.numpy().tobytes()
    start = data.find(blob)
    assert start > 0 and data.find(blob, start + 1) == -1, "tensor bytes not found once in the file"
    out = bytearray(data)
    out[start + at:start + at + len(patch)] = patch
    assert bytes(out) != data
    return bytes(out)


def test_checksum_catches_damaged_tensor_bytes(tmp_path):
    cfg, model, opt = _trained_tiny()
    path = save_pretraining_checkpoint(tmp_path / "ck.pt", model, opt, extra_state={"best": 0.5})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    record = raw["extra_state"]["sslam_fast_checksum"]
    assert record["algorithm"] == "crc32"
    names = list(record["tensors"])
    assert tensor_checksums(raw) == record and names[0].startswith("model/")  # in the file's key order
    assert {"model/_ema/blocks.1.mlp.fc1.weight", "last_optimizer_state/state/0/exp_avg"} <= set(names)
    assert load_pretraining(path).num_updates == 123  # a good file verifies
    data = path.read_bytes()
    teacher = raw["model"]["_ema"]["blocks.1.mlp.fc1.weight"]
    student = raw["model"]["blocks.0.attn.qkv.weight"]
    cases = {
        "nan.pt": _damage(data, teacher, b"\xff\xff\xc0\x7f" * 4),  # NaNs
        # plausible values: other weights of the same tensor, moved
        "plausible.pt": _damage(data, teacher, teacher.numpy().tobytes()[1024:1040]),
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        torch.load(tmp_path / name, weights_only=True)  # torch alone loads it without a word
        for load in (load_pretraining, load_pretrained, load_checkpoint, read_checkpoint_file):
            with pytest.raises(CorruptCheckpointError,
                               match=rf"{name}: tensor model/_ema/blocks\.1\.mlp\.fc1\.weight \(256, 64\) does not "
                                     "match the checksum"):
                load(tmp_path / name)
        # salvage: the check can be skipped
        assert read_checkpoint_file(tmp_path / name, verify_checksum=False)["model"]["_ema"] is not None
    # two damaged tensors: the error names the first in the file's order (the student comes before _ema)
    (tmp_path / "two.pt").write_bytes(_damage(cases["nan.pt"], student, b"\x00" * 8))
    with pytest.raises(CheckpointError, match=r"tensor model/blocks\.0\.attn\.qkv\.weight "):
        load_checkpoint(tmp_path / "two.pt")
    # files without a checksum (upstream's releases) load: nothing to check
    torch.save(fairseq_pretrain(), tmp_path / "upstream.pt")
    assert load_pretraining(tmp_path / "upstream.pt").num_updates == 4321
    # fine-tuned files written here carry one too
    clf = AudioClassifier(ModelConfig.tiny(), num_classes=3)
    ft = save_finetuned_checkpoint(tmp_path / "ft.pt", clf)
    ft_raw = torch.load(ft, weights_only=True)
    assert "model/head.weight" in ft_raw["extra_state"]["sslam_fast_checksum"]["tensors"]
    (tmp_path / "ft_bad.pt").write_bytes(_damage(ft.read_bytes(), ft_raw["model"]["head.weight"], b"\x01" * 4, at=4))
    with pytest.raises(CorruptCheckpointError, match=r"ft_bad\.pt: tensor model/head\.weight"):
        load_pretrained(tmp_path / "ft_bad.pt")


def test_load_module_state_one_line_errors():
    enc = EATEncoder(ModelConfig.tiny())
    wide = EATEncoder(dataclasses.replace(ModelConfig.tiny(), embed_dim=32, decoder_dim=32)).state_dict()
    with pytest.raises(CheckpointError, match=r"^student does not fit the model: \d+ shape\(s\) differ: .*"
                                              r"patch_embed\.weight \(32, 1, 16, 16\) in the file, \(64, 1, 16, 16\) "
                                              r"in the model") as e:
        load_module_state(enc, wide, "student")
    assert "\n" not in str(e.value)
    sd = enc.state_dict()
    sd.pop("blocks.1.norm1.weight")
    sd["blocks.9.norm1.weight"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=r"1 key\(s\) the model needs are missing: blocks\.1\.norm1\.weight \| "
                                              r"1 key\(s\) the model does not have: blocks\.9\.norm1\.weight"):
        load_module_state(enc, sd, "student")
    load_module_state(enc, EATEncoder(ModelConfig.tiny()).state_dict(), "student")  # a fitting state loads


def test_top_level_lazy_exports():

    code = ("import sys, sslam_fast; assert 'sslam_fast.checkpoint' not in sys.modules; "
            "assert 'sslam_fast.models' not in sys.modules; f = sslam_fast.load_pretrained; "
            "assert 'sslam_fast.checkpoint' in sys.modules; print(sslam_fast.load_pretraining.__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "load_pretraining"
    assert sslam_fast.load_pretrained is load_pretrained
    with pytest.raises(AttributeError):
        sslam_fast.no_such_thing  # noqa: B018
