"""Building sslam_fast models from checkpoints and writing fairseq-layout checkpoints (ALGORITHM §8).

Files written here load in upstream fairseq (``checkpoint_utils.load_model_ensemble_and_task``) as far as ALGORITHM §8
describes what that loader needs: ``optimizer_history[-1]`` with ``optimizer_name`` / ``lr_scheduler_state`` /
``num_updates``, a plain ``cfg`` with resolved ``model`` and ``task`` groups, student + decoder under ``model`` and the
fp32 teacher under ``model['_ema']``. Everything in them is plain data, so they also load with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import numbers
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sslam_fast.checkpoint._io import (
    CHECKSUM_KEY,
    CheckpointError,
    atomic_torch_save,
    read_checkpoint_file,
    tensor_checksums,
)
from sslam_fast.checkpoint._keys import (
    _HEAD,
    _depth_of,
    _listing,
    decoder_to_fairseq,
    detect_format_of,
    encoder_to_fairseq,
    map_state_dict,
)

PathLike = str | os.PathLike


def _read(obj_or_path: Any, trust_checkpoint: bool) -> Any:
    if isinstance(obj_or_path, (str, os.PathLike)):
        return read_checkpoint_file(obj_or_path, trust_checkpoint)
    return obj_or_path


def _naming_file(e: CheckpointError, obj_or_path: Any) -> CheckpointError:
    """``e`` with the file name in front when it came from a path and does not name it yet: the detection and key
    mapping work on dicts and cannot know which file a message is about."""
    if isinstance(obj_or_path, (str, os.PathLike)) and str(obj_or_path) not in str(e):
        return type(e)(f"{obj_or_path}: {e}")
    return e


def detect_format(obj_or_path: Any, trust_checkpoint: bool = False) -> str:
    """``"fairseq_pretrain" | "fairseq_finetune" | "hf_safetensors"`` for a checkpoint file path or loaded object.

    Raises :class:`CheckpointError` for anything else: not a dict, another model's state dict, a corrupt, truncated
    or unsafe file.
    """
    obj = _read(obj_or_path, trust_checkpoint)
    try:
        return detect_format_of(obj)
    except CheckpointError as e:
        raise _naming_file(e, obj_or_path) from None


def load_checkpoint(obj_or_path: Any, trust_checkpoint: bool = False) -> tuple[Any, str, dict[str, dict]]:
    """Read (if a path), detect and map a checkpoint: returns ``(raw object, format, mapped state dicts)``.

    A file read here has its tensors checked against the checksum it was written with (when it has one): damaged bytes
    raise :class:`~sslam_fast.checkpoint.CorruptCheckpointError` naming the file and the first bad tensor."""
    obj = _read(obj_or_path, trust_checkpoint)
    try:
        fmt = detect_format_of(obj)
        return obj, fmt, map_state_dict(obj, fmt)
    except CheckpointError as e:
        raise _naming_file(e, obj_or_path) from None


# --------------------------------------------------------------------------------------------------------------------
# configuration inferred from tensor shapes (and the fairseq cfg where there is one)


def _get(d: Any, *path: str, default=None):
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return default
        d = d[p]
    return default if d is None else d


def _pretrain_cfg(obj: Any) -> dict:
    """The pre-training ``cfg`` (``{'model': ..., 'task': ...}``) of a fairseq file; fine-tuned files embed it."""
    cfg = obj.get("cfg") if isinstance(obj, Mapping) else None
    if not isinstance(cfg, Mapping):
        return {}
    inner = _get(cfg, "model", "pretrained_model_args")
    return dict(inner) if isinstance(inner, Mapping) else dict(cfg)


def infer_config(obj: Any, maps: Mapping[str, Mapping[str, torch.Tensor]], **overrides):
    """A ``ModelConfig`` that fits the mapped tensors: embed_dim, depth, mlp_ratio, max_time_patches and the decoder
    from shapes; num_heads, clones, masking and target settings from the fairseq cfg when present (heads default to
    D / 64, the EAT head width). ``overrides`` win over everything."""
    from sslam_fast.models import ModelConfig

    if "encoder" in maps:
        enc = maps["encoder"]
    else:
        enc = {k[len("encoder."):]: v for k, v in maps["classifier"].items() if k.startswith("encoder.")}
    cfg = _pretrain_cfg(obj)
    m = _get(cfg, "model", default={})
    img = _get(m, "modalities", "image", default={})
    D = int(enc["patch_embed.weight"].shape[0])
    kw: dict[str, Any] = dict(
        embed_dim=D,
        decoder_dim=D,
        depth=_depth_of(enc),
        num_heads=int(_get(m, "num_heads", default=max(D // 64, 1))),
        mlp_ratio=enc["blocks.0.mlp.fc1.weight"].shape[0] / D,
        patch_size=int(enc["patch_embed.weight"].shape[-1]),
        max_time_patches=int(enc["pos_embed"].shape[1]) // 8,
        norm_eps=float(_get(m, "norm_eps", default=1e-6)),
    )
    target_length = _get(cfg, "task", "target_length", default=_get(img, "target_length"))
    if target_length:
        kw["grid"] = (int(target_length) // kw["patch_size"], 8)
    else:
        kw["grid"] = (min(64, kw["max_time_patches"]), 8)
    if "decoder" in maps:
        dec = maps["decoder"]
        w = dec["blocks.0.0.weight"]
        kw.update(decoder_layers=sum(1 for k in dec if k.endswith(".0.weight")), decoder_groups=D // int(w.shape[1]),
                  decoder_kernel=int(w.shape[-1]))
    for ours, *theirs in (("clones", "clone_batch"), ("average_top_k_layers", "average_top_k_layers"),
                          ("cls_loss_weight", "cls_loss")):
        v = _get(m, *theirs)
        if v is not None:
            kw[ours] = type(getattr(ModelConfig, ours))(v)
    for name in ("mask_prob", "mask_length", "mask_prob_adjust", "mask_noise_std"):
        v = _get(img, name)
        if v is not None:
            kw[name] = type(getattr(ModelConfig, name))(v)
    kw["average_top_k_layers"] = min(kw.get("average_top_k_layers", kw["depth"]), kw["depth"])
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build a model config from this checkpoint: {e}") from None


_MAX_SHAPES = 6


def load_module_state(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(sd)`` (strict), but a state that does not fit raises a one-line
    :class:`CheckpointError` starting with ``what`` and naming the missing and unexpected keys and the shapes that
    differ (``load_state_dict``'s own error is a multi-line ``RuntimeError``). Checked before anything is copied."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    parts = []
    if shapes:
        more = f" ... and {len(shapes) - _MAX_SHAPES} more" if len(shapes) > _MAX_SHAPES else ""
        parts.append(f"{len(shapes)} shape(s) differ: " + "; ".join(shapes[:_MAX_SHAPES]) + more)
    if missing:
        parts.append(f"{len(missing)} key(s) the model needs are missing: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) the model does not have: {_listing(unexpected)}")
    if parts:
        raise CheckpointError(f"{what} does not fit the model: " + " | ".join(parts))
    module.load_state_dict(dict(sd))


def _load_into(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    load_module_state(module, sd, what)


# --------------------------------------------------------------------------------------------------------------------
# loading


def load_pretrained(path: PathLike, trust_checkpoint: bool = False, **overrides) -> torch.nn.Module:
    """An ``EATEncoder`` (student weights of a pre-training file, or an HF pre-trained port) or an ``AudioClassifier``
    (fine-tuned file), in eval mode on the CPU; both have ``extract_features(fbank) -> (B, 1 + N, D)``.
    ``overrides`` are ``ModelConfig`` fields (e.g. ``grid``)."""
    from sslam_fast.models import AudioClassifier, EATEncoder

    obj, fmt, maps = load_checkpoint(path, trust_checkpoint)
    cfg = infer_config(obj, maps, **overrides)
    if "classifier" in maps:
        model = AudioClassifier(cfg, num_classes=int(maps["classifier"]["head.weight"].shape[0]))
        _load_into(model, maps["classifier"], fmt)
    else:
        model = EATEncoder(cfg)
        _load_into(model, maps["encoder"], fmt)
    return model.eval()


def load_pretraining(path: PathLike, stage: str = "eat", clones: int | None = None, trust_checkpoint: bool = False,
                     **overrides) -> torch.nn.Module:
    """A ``PretrainingModel`` to continue pre-training from a fairseq pre-training file: student and decoder from
    ``model``, teacher from ``model['_ema']``, ``num_updates`` from ``optimizer_history[-1]``.

    ``clones`` defaults to the file's ``clone_batch``, else 16 for ``stage="eat"`` and 8 for ``"sslam"`` (ALGORITHM §7).
    Starting SSLAM stage 2 from an EAT checkpoint: upstream keeps the file's update count on the model (so the first
    EMA step is skipped, ALGORITHM §11.9) and restarts the optimizer and schedule; set ``model.num_updates`` yourself to
    deviate.
    """
    from sslam_fast.models import PretrainingModel

    if stage not in ("eat", "sslam"):
        raise ValueError(f"stage must be 'eat' or 'sslam', got {stage!r}")
    obj, fmt, maps = load_checkpoint(path, trust_checkpoint)
    if fmt != "fairseq_pretrain":
        raise CheckpointError(f"load_pretraining needs a fairseq pre-training checkpoint (student, decoder and _ema "
                              f"teacher); {path} is {fmt}")
    if clones is None:
        file_clones = _get(_pretrain_cfg(obj), "model", "clone_batch")
        clones = int(file_clones) if file_clones and stage == "eat" else (16 if stage == "eat" else 8)
    cfg = infer_config(obj, maps, stage=stage, clones=clones, **overrides)
    model = PretrainingModel(cfg)
    _load_into(model.student, maps["encoder"], "student")
    _load_into(model.decoder, maps["decoder"], "decoder")
    _load_into(model.teacher, maps["teacher"], "_ema teacher")
    history = _get(obj, "optimizer_history", default=[])
    last = history[-1] if isinstance(history, list) and history and isinstance(history[-1], Mapping) else {}
    model.num_updates = int(last.get("num_updates") or 0)
    return model


# --------------------------------------------------------------------------------------------------------------------
# saving


def fairseq_pretrain_cfg(cfg) -> dict:
    """The plain ``cfg`` (``model`` = ``data2vec_multi``, ``task`` = ``mae_image_pretraining``) of a ModelConfig,
    with the values of ``[E] config/pretraining_AS2M.yaml`` for everything the ModelConfig does not hold."""
    D = cfg.embed_dim
    image = dict(
        type="IMAGE", prenet_depth=0, prenet_layerdrop=0.0, prenet_dropout=0.0, start_drop_path_rate=0.0,
        end_drop_path_rate=0.0, num_extra_tokens=1, init_extra_token_zero=False, mask_noise_std=cfg.mask_noise_std,
        mask_prob_min=None, mask_prob=cfg.mask_prob, inverse_mask=True, mask_prob_adjust=cfg.mask_prob_adjust,
        keep_masked_pct=0.0, mask_length=cfg.mask_length, add_masks=False, remove_masks=False, mask_dropout=0.0,
        encoder_zero_mask=True, mask_channel_prob=0.0, mask_channel_length=64, ema_local_encoder=True,
        local_grad_mult=1.0, use_alibi_encoder=False, alibi_scale=1.0, learned_alibi=False, alibi_max_pos=None,
        learned_alibi_scale=False, learned_alibi_scale_per_head=False, learned_alibi_scale_per_layer=False,
        num_alibi_heads=cfg.num_heads, model_depth=cfg.depth,
        decoder=dict(decoder_dim=cfg.decoder_dim, decoder_groups=cfg.decoder_groups, decoder_kernel=cfg.decoder_kernel,
                     decoder_layers=cfg.decoder_layers, input_dropout=0.0, add_positions_masked=False,
                     add_positions_all=False, decoder_residual=True, projection_layers=1, projection_ratio=2.0),
        in_chans=cfg.in_chans, patch_size=cfg.patch_size, embed_dim=D, fixed_positions=True,
    )
    model = dict(
        _name="data2vec_multi", loss_beta=0.0, loss_scale=None, depth=cfg.depth, start_drop_path_rate=0.0,
        end_drop_path_rate=0.0, num_heads=cfg.num_heads, norm_eps=cfg.norm_eps, norm_affine=True, encoder_dropout=0.0,
        post_mlp_drop=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0, layerdrop=0.0,
        embed_dim=D, mlp_ratio=float(cfg.mlp_ratio), layer_norm_first=False,
        average_top_k_layers=cfg.average_top_k_layers, end_of_block_targets=False, clone_batch=cfg.clones,
        layer_norm_target_layer=False, batch_norm_target_layer=False, instance_norm_target_layer=True,
        instance_norm_targets=False, layer_norm_targets=True, ema_decay=0.9998, ema_same_dtype=True, log_norms=True,
        ema_end_decay=0.99999, ema_anneal_end_step=100000, ema_encoder_only=False,
        modalities=dict(_name=None, image=image), shared_decoder=None, min_target_var=0.0, min_pred_var=0.0,
        supported_modality="IMAGE", mae_init=False, seed=1, skip_ema=False, cls_loss=float(cfg.cls_loss_weight),
        recon_loss=0.0, d2v_loss=1.0, decoder_group=False,
    )
    # only fields ALGORITHM §1/§3 names: fairseq merges this into the task dataclass, where an unknown field is an error
    task = dict(_name="mae_image_pretraining", data="", precompute_mask_config={}, h5_format=False, downsr_16hz=True,
                target_length=cfg.num_frames, roll_aug=False, noise=False)
    return dict(_name=None, common=dict(fp16=True, seed=1), model=model, task=task,
                criterion=dict(_name="model", log_keys=[]), optimization=dict(clip_norm=4.0))


def _merge(base: dict, over: Mapping | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _check_plain(x: Any, where: str = "cfg") -> None:
    """Everything in a saved ``cfg`` / ``extra_state`` must unpickle under ``weights_only=True``."""
    if x is None or isinstance(x, (str, bool, int, float, torch.Tensor)):
        return
    if isinstance(x, Mapping):
        for k, v in x.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a non-plain key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(x, numbers.Number):
        return
    raise TypeError(f"{where} must hold plain values (dict, list, str, number, bool, None, tensor), got "
                    f"{type(x).__name__}")


def _cpu(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> OrderedDict:
    return OrderedDict((k, v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else None))
                       for k, v in sd.items())


def _fairseq_file(model_sd: dict, cfg: dict, optimizer, num_updates: int, extra_state, lr_scheduler_state) -> dict:
    _check_plain(cfg)
    extra = _merge({"metrics": {}, "previous_training_time": 0.0,
                    "train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True}}, extra_state)
    _check_plain(extra, "extra_state")
    ckpt = {
        "args": None,
        "cfg": cfg,
        "model": model_sd,
        "criterion": None,
        "optimizer_history": [{
            "criterion_name": "ModelCriterion",
            "optimizer_name": type(optimizer).__name__ if optimizer is not None else "FP16Optimizer",
            "lr_scheduler_state": dict(lr_scheduler_state) if lr_scheduler_state else {"best": None},
            "num_updates": int(num_updates),
        }],
        "task_state": {},
        "extra_state": extra,
    }
    if optimizer is not None:
        ckpt["last_optimizer_state"] = optimizer.state_dict()
    # last, over everything above (model, teacher, optimizer moments, the trainer's RNG states): torch.load does not
    # check the zip's CRCs, so this is what tells damaged tensor bytes from a good file when it is read back
    extra[CHECKSUM_KEY] = tensor_checksums(ckpt)
    return ckpt


def save_pretraining_checkpoint(path: PathLike, model, optimizer=None, num_updates: int | None = None,
                                cfg: Mapping | None = None, extra_state: Mapping | None = None,
                                lr_scheduler_state: Mapping | None = None) -> Path:
    """Write a ``PretrainingModel`` as a fairseq pre-training checkpoint, atomically.

    ``model`` = student + decoder in upstream names, ``model['_ema']`` = the teacher in fp32. ``num_updates`` defaults
    to ``model.num_updates``. ``cfg`` is merged over :func:`fairseq_pretrain_cfg`; everything must be plain values.
    """
    if num_updates is None:
        num_updates = int(getattr(model, "num_updates", 0))

    def build():
        sd = OrderedDict(encoder_to_fairseq(_cpu(model.student.state_dict())))
        sd.update(decoder_to_fairseq(_cpu(model.decoder.state_dict())))
        sd["_ema"] = OrderedDict(encoder_to_fairseq(_cpu(model.teacher.state_dict(), torch.float32)))
        return _fairseq_file(sd, _merge(fairseq_pretrain_cfg(model.cfg), cfg), optimizer, num_updates, extra_state,
                             lr_scheduler_state)

    return atomic_torch_save(build, path)


def save_finetuned_checkpoint(path: PathLike, model, optimizer=None, num_updates: int = 0, cfg: Mapping | None = None,
                              extra_state: Mapping | None = None, lr_scheduler_state: Mapping | None = None) -> Path:
    """Write an ``AudioClassifier`` as a fairseq fine-tuned checkpoint (``mae_image_classification``), atomically:
    ``model.<student keys>`` (no decoder, no ``_ema``), ``fc_norm.*``, ``head.*``; the pre-training cfg is embedded
    as ``cfg.model.pretrained_model_args`` with resolved values."""

    def build():
        sd = OrderedDict(("model." + k, v) for k, v in encoder_to_fairseq(_cpu(model.encoder.state_dict())).items())
        sd.update(_cpu({k: v for k, v in model.state_dict().items() if k in _HEAD}))
        pre = fairseq_pretrain_cfg(model.cfg)
        head = dict(_name="mae_image_classification", model_path="", num_classes=int(model.head.out_features),
                    prediction_mode="CLS_TOKEN", pretrained_model_args={"model": pre["model"], "task": pre["task"]})
        base = dict(_name=None, common=pre["common"], model=head,
                    task=dict(pre["task"], _name="mae_image_classification"))
        return _fairseq_file(sd, _merge(base, cfg), optimizer, num_updates, extra_state, lr_scheduler_state)

    return atomic_torch_save(build, path)
