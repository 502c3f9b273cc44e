"""Inference tools (ALGORITHM §1, §8): audio decoding, ``python -m sslam_fast.extract / predict / evaluate`` run
in-process on generated wav / flac files with a tiny model saved through the checkpoint writers (the metrics
themselves: tests/test_metrics.py)."""

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sslam_fast import evaluate as ev
from sslam_fast import extract, predict
from sslam_fast.audio import AudioError, clip_frames, default_target_length, list_audio, load_audio
from sslam_fast.checkpoint import save_finetuned_checkpoint, save_pretraining_checkpoint
from sslam_fast.metrics import mean_average_precision
from sslam_fast.models import AudioClassifier, ModelConfig, PretrainingModel
from sslam_fast.ops import eat_features

NUM_CLASSES = 6
MIDS = [f"/m/c{i}" for i in range(NUM_CLASSES)]


def _tone(n, sr, freq, channels, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / sr
    cols = [0.3 * torch.sin(2 * math.pi * freq * (c + 1) * t) + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
            for c in range(channels)]
    return torch.stack(cols, 1).numpy().astype(np.float32)


# name: (sample rate, seconds, channels)
CLIPS = {
    "a.wav": (16000, 1, 1),
    "sub/b.wav": (16000, 1, 2),
    "c.flac": (32000, 3, 2),
    "sub/deep/d.wav": (32000, 3, 1),
}
BAD = ("corrupt.wav", "empty.wav", "sub/notes.txt")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    for i, (name, (sr, sec, ch)) in enumerate(CLIPS.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, _tone(sr * sec, sr, 220.0 * (i + 1), ch, i), sr,
                 subtype="PCM_16" if name.endswith(".flac") else "FLOAT")
    (root / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "empty.wav").write_bytes(b"")
    (root / "sub/notes.txt").write_text("not audio\n")
    return root


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    pre = PretrainingModel(ModelConfig.tiny())
    save_pretraining_checkpoint(d / "pre.pt", pre)
    clf = AudioClassifier(ModelConfig.tiny(), num_classes=NUM_CLASSES)
    with torch.no_grad():
        clf.head.bias.copy_(torch.linspace(-1, 1, NUM_CLASSES))
        clf.head.weight.mul_(20)  # spread the scores so that the ranking is data dependent
    save_finetuned_checkpoint(d / "ft.pt", clf)
    labels = d / "labels.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f'{i},{m},"Class {i}, x"\n' for i, m in enumerate(MIDS)))
    return {"pre": d / "pre.pt", "ft": d / "ft.pt", "encoder": pre.student.eval(), "clf": clf.eval(),
            "labels": labels}


def _direct(model, path, T, cls_only=False):
    wave, sr = load_audio(path)
    with torch.no_grad():
        x = eat_features(wave[None], sample_rate=sr, target_length=T)
        return model(x) if cls_only else model.extract_features(x)[0]


# --- audio helpers ----------------------------------------------------------------------------------------------------


def test_load_audio_mono_and_stereo(data):
    w, sr = load_audio(data / "a.wav")
    assert sr == 16000 and w.dtype == torch.float32 and w.shape == (16000,)
    np.testing.assert_array_equal(w.numpy(), sf.read(data / "a.wav", dtype="float32")[0])
    w, sr = load_audio(data / "c.flac")
    raw, _ = sf.read(data / "c.flac", dtype="float32", always_2d=True)
    assert sr == 32000 and w.shape == (96000,) and raw.shape == (96000, 2)
    np.testing.assert_allclose(w.numpy(), raw.mean(1), rtol=0, atol=1e-7)
    assert not np.allclose(raw[:, 0], raw[:, 1])  # a real stereo file


@pytest.mark.parametrize("name", ["corrupt.wav", "empty.wav", "missing.wav"])
def test_load_audio_bad_file_raises_naming_it(data, name):
    with pytest.raises(AudioError, match=re.escape(name)) as e:
        load_audio(data / name)
    assert isinstance(e.value, ValueError)


def test_load_audio_header_only_wav(tmp_path):
    p = tmp_path / "zero.wav"
    sf.write(p, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioError, match="zero.wav.*no audio samples"):
        load_audio(p)


def test_list_audio(data):
    files, others = list_audio(data, return_skipped=True)
    rel = [f.relative_to(data).as_posix() for f in files]
    assert rel == sorted(list(CLIPS) + ["corrupt.wav", "empty.wav"])
    assert [f.relative_to(data).as_posix() for f in others] == ["sub/notes.txt"]
    assert list_audio(data / "sub/notes.txt") == [data / "sub/notes.txt"]  # an explicit file is always tried
    with pytest.raises(FileNotFoundError):
        list_audio(data / "nope")


def test_target_length_rule():
    # 1 s @16k: 1 + (16000-400)//160 = 98 frames -> 112; 3 s @32k -> 48000 samples @16k -> 298 -> 304
    assert clip_frames(16000, 16000) == 98 and default_target_length(16000, 16000) == 112
    assert clip_frames(96000, 32000) == 298 and default_target_length(96000, 32000) == 304
    assert default_target_length(160000, 16000) == 1008  # 10 s: 998 frames
    assert default_target_length(16000 * 30, 16000) == 1024  # capped
    assert clip_frames(399, 16000) == 0 and default_target_length(400, 16000) == 16
    assert clip_frames(11025, 44100) == 1 + (4000 - 400) // 160  # 0.25 s resampled to 4000 samples


# --- extract ----------------------------------------------------------------------------------------------------------


def test_extract_single_file_utterance(data, ckpts, tmp_path):
    out = tmp_path / "u.npy"
    rc = extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(data / "c.flac"), "--out", str(out),
                       "--granularity", "utterance"])
    assert rc == 0
    got = np.load(out)
    want = _direct(ckpts["encoder"], data / "c.flac", 1024)[0]  # padded to upstream's 1024 frames by default
    assert got.shape == (64,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_extract_directory_reports_bad_files(data, ckpts, tmp_path, capsys):
    out = tmp_path / "feats"
    rc = extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(data), "--out", str(out),
                       "--granularity", "all", "--batch-size", "2"])
    assert rc == 0
    err = capsys.readouterr().err
    for bad in BAD:
        assert re.search(rf"^skipped .*{re.escape(bad)}: ", err, re.M), err
    assert "3 file(s) skipped, 4 processed" in err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert written == sorted(n.rsplit(".", 1)[0] + ".npy" for n in CLIPS)
    for name in CLIPS:
        got = np.load(out / (name.rsplit(".", 1)[0] + ".npy"))
        assert got.shape == (1 + 64 * 8, 64)  # every clip padded to 1024 frames
        # batched with its same-rate neighbour == the file alone
        np.testing.assert_allclose(got, _direct(ckpts["encoder"], data / name, 1024).numpy(), rtol=1e-5, atol=1e-5)


def test_extract_auto_keeps_each_clips_length(data, ckpts, tmp_path):
    out = tmp_path / "feats"
    rc = extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(data), "--out", str(out),
                       "--granularity", "all", "--batch-size", "2", "--target-length", "auto"])
    assert rc == 0
    for name, (sr, sec, _) in CLIPS.items():
        T = default_target_length(sr * sec, sr)
        assert T < 1024
        got = np.load(out / (name.rsplit(".", 1)[0] + ".npy"))
        assert got.shape == (1 + T // 16 * 8, 64)
        # batched with its equal-T neighbour == the file alone
        np.testing.assert_allclose(got, _direct(ckpts["encoder"], data / name, T).numpy(), rtol=1e-5, atol=1e-5)


def test_extract_ten_seconds_gives_upstreams_513_tokens(ckpts, tmp_path):
    sf.write(tmp_path / "ten.wav", _tone(160000, 16000, 440.0, 1, 5), 16000, subtype="FLOAT")
    shapes = {}
    for mode in ("default", "1024", "auto"):
        o = tmp_path / f"{mode}.npy"
        extra = [] if mode == "default" else ["--target_length", mode]  # upstream's spelling of the option
        assert extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(tmp_path / "ten.wav"), "--out", str(o),
                             "--granularity", "all"] + extra) == 0
        shapes[mode] = np.load(o).shape
    # 998 frames padded to 1024: 1 + 64 * 8 tokens, the (513, 768) of the base model; auto: 1008 frames, 63 patches
    assert shapes == {"default": (513, 64), "1024": (513, 64), "auto": (1 + 63 * 8, 64)}
    np.testing.assert_allclose(np.load(tmp_path / "default.npy"),
                               _direct(ckpts["encoder"], tmp_path / "ten.wav", 1024).numpy(), rtol=1e-5, atol=1e-5)


def test_extract_crops_long_clips_as_upstream(ckpts, tmp_path):
    from sslam_fast.demo import upstream_features

    wave = _tone(12 * 32000, 32000, 330.0, 1, 6)[:, 0]  # 12 s at 32 kHz: 1198 frames at 16 kHz, more than 1024
    sf.write(tmp_path / "long.wav", wave, 32000, subtype="FLOAT")
    o = tmp_path / "long.npy"
    assert extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(tmp_path / "long.wav"), "--out", str(o),
                         "--granularity", "all"]) == 0
    got = np.load(o)
    # upstream: resample, mean removal and fbank of the whole clip, then its first 1024 frames (no random crop)
    x = upstream_features(torch.from_numpy(wave)[None], 32000, 1024)
    with torch.no_grad():
        want = ckpts["encoder"].extract_features(x)[0]
    assert got.shape == (513, 64)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and not the features of the whole clip's 1200 frames
        whole = ckpts["encoder"].extract_features(upstream_features(torch.from_numpy(wave)[None], 32000, 1200))[0]
    assert not np.allclose(got, whole[:513].numpy(), atol=1e-3)


def test_target_length_help_names_upstreams_choice(capsys):
    with pytest.raises(SystemExit):
        extract.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default 1024" in text and "(matches upstream)" in text and "'auto'" in text


def test_extract_frame_fixed_length_and_classifier_checkpoint(data, ckpts, tmp_path):
    out = tmp_path / "f"
    rc = extract.main(["--checkpoint", str(ckpts["ft"]), "--audio", str(data / "sub"), "--out", str(out),
                       "--target-length", "160"])
    assert rc == 0
    got = np.load(out / "deep/d.npy")
    assert got.shape == (80, 64)  # 10 time patches x 8 freq patches, n = 8t + f, no CLS
    want = _direct(ckpts["clf"], data / "sub/deep/d.wav", 160)[1:]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert np.load(out / "b.npy").shape == (80, 64)


def test_extract_name_collisions(tmp_path, ckpts):
    for ext in ("wav", "flac"):
        sf.write(tmp_path / f"x.{ext}", _tone(8000, 16000, 300, 1, 3), 16000)
    rc = extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--granularity", "utterance"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x.flac.npy", "x.wav.npy"]


def test_extract_nothing_readable_fails(data, ckpts, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("corrupt.wav", "empty.wav"):
        (bad / name).write_bytes((data / name).read_bytes())
    sf.write(bad / "short.wav", np.zeros(300, np.float32), 16000)  # less than one 25 ms frame
    rc = extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "error: no audio file could be processed" in err and "short.wav: too short" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,msg", [
    (["--target-length", "100"], "multiple of 16"),
    (["--target_length", "0"], "multiple of 16"),
    (["--target-length", "long"], "'auto' or a positive multiple of 16"),
    (["--granularity", "tokens"], "invalid choice"),
    (["--batch-size", "0"], "positive"),
])
def test_extract_bad_arguments(data, ckpts, tmp_path, capsys, args, msg):
    with pytest.raises(SystemExit) as e:
        extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(data / "a.wav"), "--out", str(tmp_path)] + args)
    assert e.value.code != 0 and msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_extract_cuda_unavailable(data, ckpts, tmp_path, capsys):
    with pytest.raises(SystemExit):
        extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(data), "--out", str(tmp_path),
                      "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


# --- predict ----------------------------------------------------------------------------------------------------------


def _parse(lines):
    return [(int(r), float(s), int(i), n) for r, s, i, n in (ln.split("\t") for ln in lines)]


def test_predict_single_file_top_k_with_labels(data, ckpts, capsys):
    rc = predict.main(["--checkpoint", str(ckpts["ft"]), "--audio", str(data / "c.flac"), "--labels",
                       str(ckpts["labels"]), "--top-k", "4"])
    assert rc == 0
    rows = _parse(capsys.readouterr().out.strip().splitlines())
    scores = torch.sigmoid(_direct(ckpts["clf"], data / "c.flac", 1024, cls_only=True))[0]
    order = torch.argsort(scores, descending=True)[:4].tolist()
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert [r[2] for r in rows] == order
    assert [r[3] for r in rows] == [f"Class {i}, x" for i in order]
    np.testing.assert_allclose([r[1] for r in rows], scores[order].numpy(), atol=2e-6)


def test_predict_directory_without_labels(data, ckpts, capsys):
    rc = predict.main(["--checkpoint", str(ckpts["ft"]), "--audio", str(data / "sub"), "--top-k", "100",
                       "--target_length", "auto"])
    captured = capsys.readouterr()
    assert rc == 0 and "skipped" in captured.err and "notes.txt" in captured.err
    blocks = captured.out.strip().split("# ")[1:]
    assert len(blocks) == 2
    for block in blocks:
        head, *lines = block.strip().splitlines()
        rows = _parse(lines)
        assert len(rows) == NUM_CLASSES and all(r[3] == str(r[2]) for r in rows)
        T = 112 if head.endswith("b.wav") else 304
        scores = torch.sigmoid(_direct(ckpts["clf"], head, T, cls_only=True))[0]
        np.testing.assert_allclose([r[1] for r in rows], scores[[r[2] for r in rows]].numpy(), atol=2e-6)


def test_predict_needs_classifier(data, ckpts, capsys):
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(data / "a.wav")])
    assert "fine-tuned classifier" in capsys.readouterr().err


def test_read_class_labels_rejects_bad_header(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("id,name\n0,x\n")
    with pytest.raises(ValueError, match="l.csv.*index,mid,display_name"):
        predict.read_class_labels(p)


# --- evaluate ---------------------------------------------------------------------------------------------------------


def _clf_scores(ckpts, data, names):
    return np.stack([torch.sigmoid(_direct(ckpts["clf"], data / n, 1024, cls_only=True))[0].numpy() for n in names])


@pytest.mark.parametrize("style", ["column", "targets_csv"])
def test_evaluate_main(data, ckpts, tmp_path, capsys, style):
    names = list(CLIPS)
    mids = {"a.wav": [MIDS[0], MIDS[2]], "sub/b.wav": [MIDS[2]], "c.flac": [MIDS[0], MIDS[5]],
            "sub/deep/d.wav": [], "corrupt.wav": [MIDS[1]]}
    man = tmp_path / "eval.tsv"
    if style == "column":
        man.write_text(f"{data}\n" + "".join(f"{n}\t32000\t{','.join(m)}\n" for n, m in mids.items()))
        extra = []
    else:
        man.write_text(f"{data}\n" + "".join(f"{n}\t32000\n" for n in mids))
        tgt = tmp_path / "targets.csv"
        tgt.write_text("relative_path,mids\n" + "".join(f"{n},{';'.join(m + ['/m/unknown'])}\n"
                                                        for n, m in mids.items()))
        extra = ["--targets", str(tgt)]
    rc = ev.main(["--checkpoint", str(ckpts["ft"]), "--manifest", str(man), "--labels", str(ckpts["labels"]),
                  "--batch-size", "3"] + extra)
    out = capsys.readouterr()
    assert rc == 0 and "corrupt.wav" in out.err and "1 clip(s) skipped, 4 processed" in out.err
    if style == "targets_csv":
        assert out.err.count("unknown label mid '/m/unknown'") == 1
    got = float(re.search(r"mAP (\S+) over 3 classes with positives, 4 clips", out.out).group(1))
    y = np.array([[int(m in mids[n]) for m in MIDS] for n in names])
    want, ap = mean_average_precision(_clf_scores(ckpts, data, names), y)
    assert got == pytest.approx(want, abs=2e-6)
    assert np.isnan(ap).sum() == 3


def test_evaluate_manifest_without_mids_needs_targets(data, ckpts, tmp_path, capsys):
    man = tmp_path / "m.tsv"
    man.write_text(f"{data}\na.wav\t16000\n")
    with pytest.raises(SystemExit):
        ev.main(["--checkpoint", str(ckpts["ft"]), "--manifest", str(man), "--labels", str(ckpts["labels"])])
    assert "--targets" in capsys.readouterr().err


# --- user errors: one "error:" line and exit 2, never a traceback -----------------------------------------------------


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("tool", ["extract", "predict", "evaluate"])
@pytest.mark.parametrize("what", ["text", "random-bytes", "missing", "folder"])
def test_not_a_checkpoint_is_one_error_line(data, ckpts, tmp_path, capsys, tool, what):
    bad = {"text": tmp_path / "notes.pt", "random-bytes": tmp_path / "noise.pt", "missing": tmp_path / "gone.pt",
           "folder": tmp_path / "a_folder"}[what]
    if what == "text":
        bad.write_text("not a checkpoint\n")
    elif what == "random-bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(5000))
    elif what == "folder":
        bad.mkdir()
    man = tmp_path / "eval.tsv"
    man.write_text(f"{data}\na.wav\t16000\t{MIDS[0]}\n")
    args = {"extract": ["--audio", str(data / "a.wav"), "--out", str(tmp_path / "o")],
            "predict": ["--audio", str(data / "a.wav")],
            "evaluate": ["--manifest", str(man), "--labels", str(ckpts["labels"])]}[tool]
    main = {"extract": extract.main, "predict": predict.main, "evaluate": ev.main}[tool]
    capsys.readouterr()
    assert main(["--checkpoint", str(bad), *args]) == 2
    _one_error_line(capsys.readouterr().err, "--checkpoint", str(bad))
    assert not (tmp_path / "o").exists()


def test_extract_unwritable_out_is_one_error_line(data, ckpts, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir.npy"
    a_dir.mkdir()
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    cases = [
        (data, a_file, "is a file, not a folder"),  # a folder of inputs into a file
        (data / "a.wav", a_file / "x.npy", f"is under {a_file}, which is a file"),
        (data / "a.wav", a_file / "sub" / "out", f"is under {a_file}, which is a file"),
        (data / "a.wav", a_dir, "is a folder; name a .npy file"),
        (data, read_only / "feats", "cannot"),
    ]
    if os.access(read_only, os.W_OK):  # root writes where the mode says no: take a place the kernel refuses
        cases[-1] = (data, Path("/proc/self/feats"), "cannot")
    try:
        for audio, out, message in cases:
            capsys.readouterr()
            assert extract.main(["--checkpoint", str(ckpts["pre"]), "--audio", str(audio), "--out", str(out)]) == 2
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("error: ")]
            assert len(lines) == 1 and message in lines[0] and str(out) in lines[0], err
    finally:
        read_only.chmod(0o755)


def _eval(ckpts, data, tmp_path, labels_text: str, mids: dict):
    labels = tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n" + labels_text)
    man = tmp_path / "eval.tsv"
    man.write_text(f"{data}\n" + "".join(f"{n}\t32000\t{','.join(m)}\n" for n, m in mids.items()))
    return ev.main(["--checkpoint", str(ckpts["ft"]), "--manifest", str(man), "--labels", str(labels)])


def test_evaluate_labels_of_no_model_class_is_an_error(data, ckpts, tmp_path, capsys):
    """Targets named in mids the labels file does not hold: every clip would be all-negative (an mAP of NaN over 0
    classes), so evaluate exits 2 before the model runs, with one line saying why."""
    labels = "".join(f"{i},/m/other{i},Other {i}\n" for i in range(NUM_CLASSES))
    rc = _eval(ckpts, data, tmp_path, labels, {"a.wav": [MIDS[0]], "c.flac": [MIDS[2], MIDS[3]]})
    err = capsys.readouterr().err
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "none of the 3 target labels" in errors[0] and "is a class of --labels" in errors[0]
    assert "Traceback" not in err
    rc = _eval(ckpts, data, tmp_path, "".join(f"{i},{m},C{i}\n" for i, m in enumerate(MIDS)), {"a.wav": []})
    assert rc == 2 and "no clip has a target label" in capsys.readouterr().err


def test_evaluate_more_labels_than_model_classes_is_an_error(data, ckpts, tmp_path, capsys):
    """A labels file with classes beyond the model's outputs is another model's: its indices would name the wrong
    outputs."""
    labels = "".join(f"{i},/m/c{i},C{i}\n" for i in range(NUM_CLASSES + 4))
    rc = _eval(ckpts, data, tmp_path, labels, {"a.wav": [MIDS[0]]})
    err = capsys.readouterr().err
    assert rc == 2
    _one_error_line(err, f"has {NUM_CLASSES + 4} classes with indices up to {NUM_CLASSES + 3}",
                    f"the model {NUM_CLASSES} (0-{NUM_CLASSES - 1})")


def test_evaluate_fewer_labels_than_model_classes_warns(data, ckpts, tmp_path, capsys):
    """A labels file naming some of the model's classes is legitimate (the classes one cares about): scored, with a
    warning saying how many are left out."""
    labels = "".join(f"{i},{MIDS[i]},C{i}\n" for i in (0, 2))
    rc = _eval(ckpts, data, tmp_path, labels, {"a.wav": [MIDS[0]], "sub/b.wav": [MIDS[2]], "c.flac": []})
    out = capsys.readouterr()
    assert rc == 0
    assert f"warning: --labels {tmp_path / 'labels.csv'} names 2 of the model's {NUM_CLASSES} classes; the other " \
           f"{NUM_CLASSES - 2} are not scored" in out.err
    assert re.search(r"mAP \S+ over 2 classes with positives, 3 clips", out.out), out.out


# --- GPU, at the real SSLAM shapes --------------------------------------------------------------------------------


@pytest.mark.cuda
def test_extract_cuda_matches_cpu_base_model(tmp_path):
    torch.manual_seed(0)
    clf = AudioClassifier(ModelConfig.base()).eval()
    ck = tmp_path / "ft.pt"
    save_finetuned_checkpoint(ck, clf)
    sf.write(tmp_path / "ten.wav", _tone(320000, 32000, 440.0, 2, 7), 32000)  # 10 s, 32 kHz stereo
    outs = {}
    for dev in ("cpu", "cuda"):
        o = tmp_path / f"{dev}.npy"
        assert extract.main(["--checkpoint", str(ck), "--audio", str(tmp_path / "ten.wav"), "--out", str(o),
                             "--granularity", "all", "--device", dev]) == 0
        outs[dev] = np.load(o)
    assert outs["cpu"].shape == (513, 768)  # 10 s padded to upstream's 1024 frames
    np.testing.assert_allclose(outs["cuda"], outs["cpu"], rtol=0, atol=2e-3)
