"""Checkpoint formats and the key mapping between upstream names and the sslam_fast module names (ALGORITHM §8).

Upstream names come from ``[E] models/EAT_pretraining.py : Data2VecMultiModel`` (``state_dict`` adds the fp32 EMA
teacher as ``_ema``), ``models/images.py : ImageEncoder``, ``models/modules.py : AltBlock, Decoder2d``,
``models/EAT_audio_classification.py : MaeImageClassificationModel`` (fine-tuned: ``model.`` + student, ``fc_norm``,
``head``) and the HF port's ``eat_model.py : EAT`` (``model.local_encoder``, ``model.pre_norm``, ...).

Contract names: ``EATEncoder`` (``patch_embed``, ``pos_embed``, ``cls_token``, ``input_norm``, ``blocks.{i}.*``),
``CNNDecoder`` (``blocks.{i}.0``, ``proj``), ``AudioClassifier`` (``encoder.*``, ``fc_norm``, ``head``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from sslam_fast.checkpoint._io import CheckpointError

FORMATS = ("fairseq_pretrain", "fairseq_finetune", "hf_safetensors")

IMG = "modality_encoders.IMAGE."
BLOCK_PARTS = tuple(
    f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")
)
# upstream (relative to the fairseq model root) -> EATEncoder name, for the non-block keys
_FAIRSEQ_ENCODER = {
    IMG + "local_encoder.proj.weight": "patch_embed.weight",
    IMG + "local_encoder.proj.bias": "patch_embed.bias",
    IMG + "fixed_positional_encoder.positions": "pos_embed",
    IMG + "extra_tokens": "cls_token",
    IMG + "context_encoder.norm.weight": "input_norm.weight",
    IMG + "context_encoder.norm.bias": "input_norm.bias",
}
_HF_ENCODER = {
    "model.local_encoder.proj.weight": "patch_embed.weight",
    "model.local_encoder.proj.bias": "patch_embed.bias",
    "model.fixed_positional_encoder.positions": "pos_embed",
    "model.extra_tokens": "cls_token",
    "model.pre_norm.weight": "input_norm.weight",
    "model.pre_norm.bias": "input_norm.bias",
}
_ENCODER_FIXED = tuple(_FAIRSEQ_ENCODER.values())
_HEAD = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DEC_BLOCK_RE = re.compile(r"^" + re.escape(IMG) + r"decoder\.blocks\.(\d+)\.0\.(weight|bias)$")
_DEC_PROJ = {IMG + "decoder.proj.weight": "proj.weight", IMG + "decoder.proj.bias": "proj.bias"}
_MAX_LISTED = 20


def _listing(keys) -> str:
    keys = sorted(keys, key=_natural)
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _first_keys(d: Mapping, n: int = 8) -> str:
    keys = [str(k) for k in list(d.keys())[:n]]
    return ", ".join(keys) + (" ..." if len(d) > n else "")


# --------------------------------------------------------------------------------------------------------------------
# detection


def _model_dict(obj: Mapping) -> Mapping:
    """A fairseq checkpoint's state dict (``obj['model']``), or ``obj`` itself when it is already one."""
    inner = obj.get("model") if isinstance(obj, Mapping) else None
    return inner if isinstance(inner, Mapping) else obj


def detect_format_of(obj: Any) -> str:
    """Format of an in-memory checkpoint (see :func:`sslam_fast.checkpoint.detect_format`)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"not a checkpoint: expected a dict (fairseq checkpoint or state dict), got {type(obj).__name__}"
        )
    sd = _model_dict(obj)
    keys = [k for k in sd.keys() if isinstance(k, str)]
    if any(k.startswith(IMG) for k in keys):
        return "fairseq_pretrain"
    if any(k.startswith("model." + IMG) for k in keys):
        return "fairseq_finetune"
    if any(k.startswith("model.local_encoder.") or k.startswith("model.pre_norm.") for k in keys):
        return "hf_safetensors"
    what = "a fairseq-style checkpoint whose model" if sd is not obj else "a dict whose"
    raise CheckpointError(
        f"not an EAT/SSLAM checkpoint: {what} keys match none of the known layouts "
        f"(fairseq pre-training, fairseq fine-tuned, HF safetensors port); first keys: {_first_keys(sd) or '(none)'}"
    )


# --------------------------------------------------------------------------------------------------------------------
# upstream -> contract


def _depth_of(names, prefix: str = "") -> int:
    idx = []
    for k in names:
        if isinstance(k, str) and k.startswith(prefix):
            m = _BLOCK_RE.match(k[len(prefix):])
            if m:
                idx.append(int(m.group(1)))
    return max(idx) + 1 if idx else 0


def _encoder_names(fixed: Mapping[str, str], prefix: str, depth: int) -> dict[str, str]:
    """upstream name -> EATEncoder name for an encoder of ``depth`` blocks."""
    names = dict(fixed)
    names.update({f"{prefix}blocks.{i}.{p}": f"blocks.{i}.{p}" for i in range(depth) for p in BLOCK_PARTS})
    return names


def _check_keys(what: str, keys, required, optional=()) -> None:
    keys, required = set(keys), set(required)
    missing = required - keys
    unexpected = keys - required - set(optional)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(map(str, unexpected))}")
        raise CheckpointError(f"{what}: " + "; ".join(parts))


def _check_encoder_shapes(what: str, sd: Mapping[str, torch.Tensor]) -> None:
    D = sd["patch_embed.weight"].shape[0]
    expect = {"patch_embed.weight": (D, 1, 16, 16), "patch_embed.bias": (D,), "cls_token": (1, 1, D),
              "input_norm.weight": (D,), "input_norm.bias": (D,)}
    for i in range(_depth_of(sd)):
        b = f"blocks.{i}."
        expect.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,)})
        expect[b + "attn.proj.weight"] = (D, D)
        for p in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias"):
            expect[b + p] = (D,)
        hidden = sd[b + "mlp.fc1.weight"].shape[0]
        expect.update({b + "mlp.fc1.weight": (hidden, D), b + "mlp.fc1.bias": (hidden,)})
        expect[b + "mlp.fc2.weight"] = (D, hidden)
    bad = [f"{k} {tuple(sd[k].shape)} (expected {s})" for k, s in expect.items() if tuple(sd[k].shape) != s]
    pos = sd["pos_embed"]
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != D or pos.shape[1] % 8:
        bad.append(f"pos_embed {tuple(pos.shape)} (expected (1, 8 * time patches, {D}))")
    if bad:
        raise CheckpointError(f"{what}: tensor shapes inconsistent with embed_dim {D}: {_listing(bad)}")


def _default_pos(enc: dict[str, torch.Tensor]) -> None:
    if "pos_embed" not in enc:
        from sslam_fast.models.encoder import sincos_pos_table

        # ALGORITHM §8: the HF port may not store the table; it is the fixed sin-cos table (max_length 768 time patches)
        enc["pos_embed"] = sincos_pos_table(enc["patch_embed.weight"].shape[0], 768, 8).unsqueeze(0)


def _rename(sd: Mapping, names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {names[k]: v for k, v in sd.items() if k in names}


def _map_fairseq_pretrain(sd: Mapping) -> dict[str, dict[str, torch.Tensor]]:
    what = "fairseq pre-training checkpoint"
    ema = sd.get("_ema")
    depth = max(_depth_of(sd), 1)  # no block at all: report blocks.0.* missing
    enc_names = _encoder_names(_FAIRSEQ_ENCODER, "", depth)
    n_dec = max((int(m.group(1)) + 1 for m in map(_DEC_BLOCK_RE.match, sd) if m), default=1)
    dec_names = {
        f"{IMG}decoder.blocks.{i}.0.{p}": f"blocks.{i}.0.{p}" for i in range(n_dec) for p in ("weight", "bias")
    }
    dec_names.update(_DEC_PROJ)
    ema_keys = [f"_ema.{k}" for k in ema] if isinstance(ema, Mapping) else []
    if any(not isinstance(v, torch.Tensor) for v in (ema or {}).values()):
        raise CheckpointError(f"{what}: _ema holds entries that are not tensors")
    # the teacher has the student's encoder keys (upstream's make_target_model drops the decoder only)
    # a file without the teacher at all reports the one entry ``_ema`` missing, not each teacher key
    teacher_req = {f"_ema.{k}" for k in enc_names} if isinstance(ema, Mapping) else {"_ema"}
    required = set(enc_names) | set(dec_names) | teacher_req
    keys = [k for k in sd if k != "_ema"] + ema_keys
    _check_keys(what, keys, required)
    student, decoder, teacher = _rename(sd, enc_names), _rename(sd, dec_names), _rename(ema, enc_names)
    _check_encoder_shapes(what + " (student)", student)
    _check_encoder_shapes(what + " (_ema teacher)", teacher)
    return {"encoder": student, "decoder": decoder, "teacher": teacher}


def _map_fairseq_finetune(sd: Mapping) -> dict[str, dict[str, torch.Tensor]]:
    what = "fairseq fine-tuned checkpoint"
    names = {"model." + k: v for k, v in _encoder_names(_FAIRSEQ_ENCODER, "", max(_depth_of(sd, "model."), 1)).items()}
    _check_keys(what, sd, set(names) | set(_HEAD))
    return {"classifier": _classifier(what, _rename(sd, names), {k: sd[k] for k in _HEAD})}


def _map_hf(sd: Mapping) -> dict[str, dict[str, torch.Tensor]]:
    what = "HF safetensors port"
    names = _encoder_names(_HF_ENCODER, "model.", max(_depth_of(sd, "model."), 1))
    head_names: dict[str, str] = {}
    for k in _HEAD:  # fc_norm / head, with or without the ``model.`` prefix (ALGORITHM §8: unverified names)
        name = "model." + k if "model." + k in sd or k not in sd else k
        head_names[name] = k
    has_head = any(k in sd for k in head_names)
    required = set(names) - {"model.fixed_positional_encoder.positions"} | (set(head_names) if has_head else set())
    _check_keys(what, sd, required, optional=("model.fixed_positional_encoder.positions",))
    enc = _rename(sd, names)
    _default_pos(enc)
    if has_head:
        return {"classifier": _classifier(what, enc, _rename(sd, head_names))}
    _check_encoder_shapes(what, enc)
    return {"encoder": enc}


def _classifier(what: str, enc: dict, head: dict) -> dict[str, torch.Tensor]:
    _check_encoder_shapes(what, enc)
    D = enc["patch_embed.weight"].shape[0]
    hw = head["head.weight"]
    if hw.dim() != 2 or hw.shape[1] != D or tuple(head["head.bias"].shape) != (hw.shape[0],) or any(
        tuple(head[k].shape) != (D,) for k in ("fc_norm.weight", "fc_norm.bias")
    ):
        raise CheckpointError(f"{what}: classifier head shapes {[tuple(head[k].shape) for k in _HEAD]} do not fit "
                              f"embed_dim {D}")
    out = {"encoder." + k: v for k, v in enc.items()}
    out.update(head)
    return out


def map_state_dict(sd: Mapping, fmt: str) -> dict[str, dict[str, torch.Tensor]]:
    """Map an upstream state dict to the sslam_fast module names, checking it is complete.

    ``sd`` is the state dict (``checkpoint['model']`` for fairseq files, the safetensors dict for HF ports) or the
    whole fairseq checkpoint. Returns a dict with some of these entries, each a state dict for the named module:
    ``"encoder"`` (EATEncoder: the student), ``"decoder"`` (CNNDecoder), ``"teacher"`` (EATEncoder, from ``_ema``),
    ``"classifier"`` (AudioClassifier). Raises :class:`CheckpointError` listing missing and unexpected keys.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"not a checkpoint: expected a dict, got {type(sd).__name__}")
    sd = _model_dict(sd)
    bad = [k for k, v in sd.items() if not (isinstance(v, torch.Tensor) or (k == "_ema" and isinstance(v, Mapping)))]
    if bad:
        raise CheckpointError(f"{fmt}: entries that are not tensors: {_listing(map(str, bad))}")
    return {"fairseq_pretrain": _map_fairseq_pretrain, "fairseq_finetune": _map_fairseq_finetune,
            "hf_safetensors": _map_hf}[fmt](sd)


# --------------------------------------------------------------------------------------------------------------------
# contract -> upstream (saving)


def encoder_to_fairseq(enc: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inv = {v: k for k, v in _FAIRSEQ_ENCODER.items()}
    out = {}
    for k, v in enc.items():
        if k in inv:
            out[inv[k]] = v
        elif _BLOCK_RE.match(k):
            out[k] = v
        else:
            raise CheckpointError(f"encoder key {k!r} has no upstream name")
    return out


def decoder_to_fairseq(dec: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in dec.items():
        if re.match(r"^blocks\.\d+\.0\.(weight|bias)$", k) or k in ("proj.weight", "proj.bias"):
            out[IMG + "decoder." + k] = v
        else:
            raise CheckpointError(f"decoder key {k!r} has no upstream name")
    return out
