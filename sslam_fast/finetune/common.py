"""What the fine-tuning loop (:mod:`sslam_fast.finetune.loop`) and the cached linear evaluation
(:mod:`sslam_fast.finetune.linear`) share: the labelled train / valid sets, the classifier (from a pretrained file, a
run's own checkpoint or random), batched scoring of a set over the ranks, the metric, the loss statistics kept on the
device between log lines, and the fairseq fields of a saved fine-tuned checkpoint."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from sslam_fast.finetune.config import FinetuneConfig
from sslam_fast.metrics import accuracy, mean_average_precision
from sslam_fast.train.config import ConfigError
from sslam_fast.train.distributed import DistEnv
from sslam_fast.train.runtime import gather, prepare_run

__all__ = [
    "Data",
    "Stats",
    "build_classifier",
    "clip_outputs",
    "fairseq_overrides",
    "fmt_metric",
    "load_data",
    "prepare",
    "read_state",
    "score",
    "train_sampler",
]

#: Evaluation manifests looked for beside a training manifest when ``valid_data`` is empty (upstream's
#: ``valid_subset: eval`` first).
VALID_MANIFESTS = ("eval.tsv", "valid.tsv", "test.tsv")


def prepare(cfg: FinetuneConfig, env: DistEnv, synthetic_root: Path) -> None:
    """Rank 0's start-up work (:func:`sslam_fast.train.runtime.prepare_run`): check ``run_dir`` (without creating it)
    and generate the built-in set when it is used; every rank learns whether that failed."""
    prepare_run(env, Path(cfg.run_dir), synthetic_root if cfg.data == "" else None)


@dataclasses.dataclass
class Data:
    """The labelled train and valid sets and their clip datasets (train: random crops; valid: the first
    ``clip_seconds`` of each clip)."""

    train: object  # LabelledData
    valid: object
    train_ds: object  # AudioClipDataset
    valid_ds: object

    @property
    def num_classes(self) -> int:
        return int(self.train.targets.shape[1])


def _valid_source(cfg: FinetuneConfig) -> tuple[str, int]:
    """(source, fold) of the valid set: ``valid_data`` when given; else the built-in held-out set, the ``fold`` of a
    class folder, or the evaluation manifest beside a training manifest."""
    if cfg.valid_data:
        return cfg.valid_data, cfg.fold if Path(cfg.valid_data).is_dir() else 0
    if cfg.data == "":
        return "", 0
    data = Path(cfg.data)
    if data.is_dir():
        if not cfg.fold:
            raise ConfigError(f"valid_data is empty and data={cfg.data} is a class folder without fold: give "
                              "--valid_data (a manifest or folder) or --fold=k to hold out fold k")
        return cfg.data, cfg.fold
    found = [data.parent / n for n in VALID_MANIFESTS if (data.parent / n).is_file() and data.parent / n != data]
    if not found:
        raise ConfigError(f"valid_data is empty and no {' / '.join(VALID_MANIFESTS)} lies beside {cfg.data}: give "
                          "--valid_data")
    return str(found[0]), 0


def load_data(cfg: FinetuneConfig, env: DistEnv, synthetic_root: Path) -> Data:
    """The train and valid sets of ``cfg`` (:func:`sslam_fast.finetune.data.load_labelled`), checked against each
    other and the config: the same classes, ``num_classes`` (when set) matching them, single-label data for a
    single-label recipe, and at least one batch per rank."""
    from sslam_fast.data import AudioClipDataset, DataError
    from sslam_fast.finetune.data import load_labelled

    vsource, vfold = _valid_source(cfg)
    try:
        train = load_labelled(cfg.data, labels=cfg.labels, fold=cfg.fold, split="train",
                              synthetic_root=synthetic_root)
        valid = load_labelled(vsource, labels=cfg.labels, fold=vfold, split="valid", synthetic_root=synthetic_root)
    except DataError:
        raise
    except ValueError as e:  # a fold given for a manifest or the built-in set
        raise ConfigError(str(e)) from None
    if list(train.mids) != list(valid.mids):
        raise DataError(f"the train set ({cfg.data or 'built-in'}) has {train.num_classes} classes, the valid set "
                        f"({vsource or 'built-in'}) {valid.num_classes}, or the same number in another order: give "
                        "both the same labels CSV (--labels)")
    if cfg.num_classes and cfg.num_classes != train.num_classes:
        raise ConfigError(f"num_classes={cfg.num_classes} but the labels of {cfg.data or 'the built-in set'} name "
                          f"{train.num_classes} classes (num_classes=0 takes them from the labels)")
    if not cfg.multilabel and train.multilabel:
        raise ConfigError(f"multilabel=false (a single-label recipe) but {cfg.data or 'the built-in set'} has clips "
                          "with no label or several: use a multi-label preset or --multilabel=true")
    common = dict(clip_samples=cfg.clip_samples, sample_rate=cfg.sample_rate, seed=cfg.seed)
    train_ds = AudioClipDataset(files=train.files, **common)
    valid_ds = AudioClipDataset(files=valid.files, random_crop=False, **common)
    need = cfg.batch_size * env.world
    if cfg.linear != "cached" and not cfg.weighted_sampling and len(train_ds) < need:
        raise DataError(f"{cfg.data or 'the built-in set'} holds {len(train_ds)} training clip(s), fewer than one "
                        f"batch: batch_size={cfg.batch_size} on each of {env.world} process(es) needs {need}; lower "
                        "--batch_size or add data")
    return Data(train, valid, train_ds, valid_ds)


class _WeightedBatches:
    """Batches of ``batch_size`` from each epoch's draws of a ``WeightedEpochSampler`` (AS-2M's sampling), with the
    interface of ``sslam_fast.data.ResumableSampler`` that the loop's ``Batches`` reads (``batches(epoch)``,
    ``load_state_dict``, iteration from the saved position on). The last incomplete batch of an epoch is dropped."""

    def __init__(self, sampler, batch_size: int):
        self.sampler, self.batch_size = sampler, int(batch_size)
        if len(sampler) < self.batch_size:
            raise ConfigError(f"epoch_draws gives {len(sampler)} draws per process, fewer than batch_size="
                              f"{self.batch_size}")
        self.epoch, self.batches_done = 0, 0

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(0)
        idx, b = [int(i) for i in self.sampler], self.batch_size
        return [idx[k:k + b] for k in range(0, len(idx) // b * b, b)]

    def __iter__(self):
        for batch in self.batches(self.epoch)[self.batches_done:]:
            self.batches_done += 1
            yield batch
        self.epoch, self.batches_done = self.epoch + 1, 0

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.batches_done = int(sd["epoch"]), int(sd["batches_done"])


def train_sampler(cfg: FinetuneConfig, data: Data, env: DistEnv):
    """The batch sampler of the train set: a shuffled pass per epoch (``ResumableSampler``), or with
    ``weighted_sampling`` ``epoch_draws`` weighted draws without replacement per epoch (weights from
    ``weights_file``, else from the labels: ``sslam_fast.finetune.sampler``)."""
    from sslam_fast.data import ResumableSampler

    if not cfg.weighted_sampling:
        return ResumableSampler(len(data.train_ds), batch_size=cfg.batch_size, seed=cfg.seed, rank=env.rank,
                                world_size=env.world)
    from sslam_fast.finetune.sampler import WeightedEpochSampler, label_weights, read_weights

    n = len(data.train_ds)
    weights = read_weights(cfg.weights_file, n) if cfg.weights_file else label_weights(data.train.targets)
    if cfg.epoch_draws > n:
        raise ConfigError(f"epoch_draws={cfg.epoch_draws} exceeds the {n} training clips (draws are without "
                          "replacement)")
    sampler = WeightedEpochSampler(weights, cfg.epoch_draws, seed=cfg.seed, rank=env.rank, world_size=env.world)
    return _WeightedBatches(sampler, cfg.batch_size)


def read_state(obj, path, key: str) -> dict:
    """The fine-tuner's state (``extra_state[key]``) of a checkpoint read from ``path``, or a one-line
    ``CheckpointError`` saying what the file is instead."""
    from sslam_fast.checkpoint import CheckpointError

    extra = obj.get("extra_state") if isinstance(obj, Mapping) else None
    st = extra.get(key) if isinstance(extra, Mapping) else None
    if isinstance(st, Mapping) and isinstance(obj.get("last_optimizer_state"), Mapping):
        return dict(st)
    raise CheckpointError(f"{path}: not a checkpoint of finetune.py with its optimizer state (no {key} state): move "
                          "it out of the run folder or start a new --run_dir; to start from its weights, pass it as "
                          "--init_checkpoint")


def build_classifier(cfg: FinetuneConfig, num_classes: int, env: DistEnv, ckpt=None):
    """The ``AudioClassifier`` to train: from ``ckpt`` (the run's own ``checkpoint_last.pt``, as loaded by
    ``find_latest_checkpoint``: its size and every weight), else the encoder of ``cfg.init_checkpoint`` with a fresh
    ``fc_norm`` and head (the size from the file), else a random one of ``cfg.model_config()``. ``drop_path`` and the
    input length (``target_length``) come from ``cfg`` in every case. The fresh parts are drawn from ``cfg.seed``, the
    same on every rank."""
    from sslam_fast.checkpoint import CheckpointError, infer_config, load_checkpoint, load_module_state
    from sslam_fast.models import AudioClassifier

    over = dict(drop_path_rate=cfg.drop_path, grid=cfg.grid)
    torch.manual_seed(cfg.seed)
    try:
        if ckpt is not None:
            _, fmt, maps = load_checkpoint(ckpt.obj)
            if "classifier" not in maps:
                raise CheckpointError(f"{ckpt}: a {fmt} checkpoint, not a fine-tuned classifier")
            model = AudioClassifier(infer_config(ckpt.obj, maps, **over), num_classes=num_classes)
            load_module_state(model, maps["classifier"], f"{ckpt}")
            return model
        if cfg.init_checkpoint:
            model = AudioClassifier.from_pretrained(cfg.init_checkpoint, num_classes,
                                                    trust_checkpoint=cfg.trust_checkpoint, **over)
            m, own = model.cfg, cfg.model_config()
            differ = [k for k in ("embed_dim", "depth", "num_heads") if getattr(m, k) != getattr(own, k)]
            if differ and env.is_main:
                print(f"note: the model size comes from {cfg.init_checkpoint}: "
                      + ", ".join(f"{k}={getattr(m, k)}" for k in differ) + " (the config's "
                      + ", ".join(f"{k}={getattr(own, k)}" for k in differ) + " do not apply)", flush=True)
            return model
    except ValueError as e:  # ModelConfig refusing the file's size with cfg's grid
        if isinstance(e, CheckpointError):
            raise
        raise ConfigError(f"target_length={cfg.target_length} does not fit the checkpoint's model: {e}") from None
    return AudioClassifier(cfg.model_config(), num_classes=num_classes)


def fairseq_overrides(cfg: FinetuneConfig) -> dict:
    """The recipe as fields of upstream's ``MaeImageClassificationConfig`` and task config, merged into a saved
    checkpoint's ``cfg`` (``[E] models/EAT_audio_classification.py``, ``tasks/finetuning.py``)."""
    model = dict(mixup=float(cfg.mixup), mixup_prob=float(cfg.mixup_prob), label_smoothing=float(cfg.label_smoothing),
                 drop_path_rate=float(cfg.drop_path), layer_decay=float(cfg.layer_decay), audio_mae=True,
                 specaug=cfg.mask_ratio > 0, mask_ratio=float(cfg.mask_ratio), target_length=int(cfg.target_length),
                 linear_classifier=cfg.linear != "false", esc50_eval=cfg.preset == "esc50",
                 spcv2_eval=cfg.preset == "spc2")
    task = dict(target_length=int(cfg.target_length), roll_aug=bool(cfg.roll_aug), noise=bool(cfg.noise_aug))
    return {"model": model, "task": task, "common": {"seed": int(cfg.seed)}}


@torch.no_grad()
def clip_outputs(fn, dataset, cfg: FinetuneConfig, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``fn(fbank)`` (a (B, K) output) of every readable clip of ``dataset``, without augmentation: each rank runs
    the clips ``rank::world``, and every rank gets all of them back, ordered by clip index. Returns ``(outputs (n, K)
    float32 on the CPU, clip indices (n,), unreadable files)``."""
    from sslam_fast.data import collate
    from sslam_fast.ops import eat_features

    mine = list(range(env.rank, len(dataset), env.world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=cfg.batch_size,
                                         collate_fn=collate, num_workers=cfg.num_workers, pin_memory=env.cuda,
                                         generator=torch.Generator())
    autocast = cfg.precision == "bf16" or (env.cuda and cfg.precision == "auto")
    outs, got = [], []
    for batch in loader:
        if batch["audio"].shape[0] == 0:
            continue
        audio = batch["audio"].to(env.device, non_blocking=True)
        lengths = batch["lengths"].to(env.device, non_blocking=True)
        fb = eat_features(audio, lengths, sample_rate=cfg.sample_rate, target_length=cfg.target_length,
                          norm_mean=cfg.norm_mean, norm_std=cfg.norm_std)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
            outs.append(fn(fb).float().cpu())
        got.append(batch["indices"])
    ind = torch.cat(got) if got else torch.zeros(0, dtype=torch.int64)
    missing = sorted(set(mine) - set(ind.tolist()))
    parts = gather(env, (torch.cat(outs) if outs else None, ind, [str(dataset.path(i)) for i in missing]))
    out = torch.cat([p[0] for p in parts if p[0] is not None]) if any(p[0] is not None for p in parts) else None
    ind = torch.cat([p[1] for p in parts])
    if out is None:
        from sslam_fast.data import DataError

        raise DataError(f"no clip of the {len(dataset)} to score could be read")
    order = torch.argsort(ind)
    return out[order], ind[order], [name for p in parts for name in p[2]]


def score(scores: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> tuple[str, float]:
    """``("mAP", nanmean of per-class AP)`` for a multi-label set, ``("accuracy", top-1)`` for a single-label one
    (``[E] tasks/finetuning.py : calculate_stats``; ``sslam_fast.metrics``). Non-finite scores count as 0, as
    upstream's ``nan_to_num`` on the logits makes them."""
    s = torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0).numpy()
    if multilabel:
        return "mAP", float(mean_average_precision(s, targets.numpy())[0])
    return "accuracy", float(accuracy(s, targets.argmax(1).numpy()))


class Stats:
    """The training loss between two log lines, kept on the device: the sum of the finite losses, the count of finite
    and non-finite updates, the current run of non-finite ones in a row and its maximum; read once per log line
    (:meth:`summary`, after one all-reduce of the sums over the ranks)."""

    def __init__(self, env: DistEnv):
        self.env = env
        self.values = torch.zeros(5, dtype=torch.float64, device=env.device)
        self.clips = self.clips_seen = self.steps = 0
        self.data_s = self.excluded = 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, finite: torch.Tensor, clips: int) -> None:
        """One update's loss (0-dim) and whether it was applied (0-dim bool): device ops only."""
        v, f = self.values, finite.to(torch.float64)
        v[0] += torch.where(finite, loss.to(torch.float64), 0.0)
        v[1] += f
        v[2] += 1.0 - f
        v[3] = (v[3] + 1.0) * (1.0 - f)
        v[4] = torch.maximum(v[4], v[3])
        self.steps += 1
        self.clips += clips
        self.clips_seen += clips

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation) out of the interval's clips/s."""
        self.excluded += seconds

    def summary(self, step: int, lr: float) -> dict:
        v = self.values.clone()
        self.env.all_reduce_(v[:2])  # the loss sums of every rank; the non-finite counts are the same on each
        total, finite, nonfinite, _, max_row = v.tolist()  # the one read of the interval
        wall = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        rec = {"step": step, "loss": total / finite if finite > 0 else None, "lr": lr,
               "clips_per_s": self.clips / wall, "nonfinite_steps": int(nonfinite), "max_nonfinite_in_row":
               int(max_row), "time": {"data": round(self.data_s, 4)}}
        row = self.values[3].clone()
        self.values.zero_()
        self.values[3] = row
        self.clips = self.steps = 0
        self.data_s = self.excluded = 0.0
        self.t0 = time.perf_counter()
        if rec["loss"] is not None and not math.isfinite(rec["loss"]):
            rec["loss"] = None
        return rec


def fmt_metric(v: float | None, digits: int = 4) -> str:
    """A metric for the closing lines: ``n/a`` for none (no evaluation ran), else ``digits`` decimals."""
    return "n/a" if v is None else f"{v:.{digits}f}"
