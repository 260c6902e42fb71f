"""Training configuration: small frozen dataclasses, layered defaults -> a YAML/JSON file -> dotted overrides.

The resolved config is written to every run directory (``config.yaml``) and into every training checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipforge.config import ConfigError, ModelConfig, apply_overrides, dataclass_from_dict, read_mapping_file
from clipforge.train.loggers import check_reporters


@dataclass(frozen=True)
class DataConfig:
    """Where training pairs come from and how they are batched."""

    train: tuple[str, ...] = ()  # source specs: shard dirs/patterns, CSV/TSV/JSONL tables, captioned folders
    # Sampling weight per source (empty: proportional to the known sizes, else equal).
    weights: tuple[float, ...] = ()
    batch_size: int = 256  # global batch per optimizer step, over all ranks and micro-batches
    num_workers: int = 2  # DataLoader workers per rank (0: load in the training process)
    shuffle_buffer: int = 1000  # samples held for shuffling within each worker's stream
    caption: Literal["first", "random"] = "first"  # which caption of a multi-caption sample to train on
    max_pixels: int = 89_478_485  # larger images are skipped (and counted), never decoded
    # Stop (exit 1, counts by reason) when more than this share of a source's first skip_window samples is
    # skipped; 1.0 turns the rule off. A whole pass without a usable sample always stops the run.
    max_skip_fraction: float = 0.5
    skip_window: int = 1000
    loader_timeout_s: float = 300.0  # a data-loader worker silent this long stops the run (0: wait forever)
    # Tag-list captions ("cat, animal, pet"): drop each item after the first with this probability, and/or
    # shuffle the kept ones after the first (clipforge.data.captions.augment_tags). Other captions are unchanged.
    tag_dropout: float = 0.0
    tag_shuffle: bool = False
    # Remote shards (https://, s3://, gs://): re-opens after a connection error or 5xx, waiting
    # remote_backoff_s x 2^k; then a shard that still fails (or any broken shard) is skipped and counted
    # ("skip") or stops the run ("fail").
    remote_retries: int = 3
    remote_backoff_s: float = 1.0
    shard_failure: Literal["skip", "fail"] = "skip"
    # Draw shards with replacement (open_clip's --dataset-resampled); there are no passes, so with `epochs` an
    # epoch is epoch_samples samples.
    resampled: bool = False
    epoch_samples: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a cosine (or constant) schedule after linear warmup."""

    lr: float = 5e-4
    weight_decay: float = 0.2  # not applied to gains, biases, embeddings and the logit scale
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 0.0  # the cosine schedule's floor
    grad_clip: float | None = 1.0  # max global gradient norm; null disables clipping


@dataclass(frozen=True)
class LossConfig:
    """The contrastive objective's loss; recipes for small data, see docs/recipes.md."""

    # softmax: CLIP's symmetric InfoNCE. sigmoid: SigLIP's pairwise loss, with a learned bias; it starts the
    # model at scale 10 and bias -10 unless model_overrides (or the model config) set init_logit_scale/_bias.
    kind: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = 0.0  # softmax only: as F.cross_entropy(label_smoothing=...) on the logits
    # Pairs with identical captions (token rows) in the global batch are positives of each other, not negatives:
    # sigmoid labels +1 for every same-caption pair; softmax targets spread uniformly over a row's positives
    # (with identical captions' identical embeddings that is exactly the standard loss: see docs/recipes.md).
    multi_positive: bool = False
    learn_temperature: bool = True  # false: the logit scale (and bias) stay at their init values, untrained


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes, and how often it logs, evaluates and checkpoints."""

    output_dir: str = "runs"
    name: str | None = None  # run folder name; default: <model>-<timestamp>
    log_every: int = 10  # steps between metrics lines (JSONL)
    checkpoint_every: int = 500  # steps between training checkpoints (and one at the end)
    keep_last: int = 3  # training checkpoints kept; older ones are deleted after a successful save
    eval_every: int = 0  # steps between evaluation hooks (0: never)
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    time_limit_s: float = (
        0.0  # >0: stop early (with a checkpoint and the final model) once training took this long
    )
    progress: bool = True  # tqdm bar on rank 0
    # Scalars also go to: "tensorboard" (<run>/tensorboard) and/or "wandb" (see clipforge.train.loggers).
    report_to: tuple[str, ...] = ("tensorboard",)
    wandb_project: str = "clipforge"
    wandb_mode: str = "offline"  # offline (nothing uploaded; `wandb sync` later), online, disabled


@dataclass(frozen=True)
class LockConfig:
    """LiT (Zhai et al. 2022): locked towers are frozen (out of the optimizer, in eval mode: no dropout, BatchNorm
    statistics frozen) except their projection into the joint space and their top ``*_unlocked_layers``."""

    text: bool = False
    image: bool = False
    text_unlocked_layers: int = 0  # top layers of a locked text tower that still train
    image_unlocked_layers: int = 0  # top blocks of a locked image tower that still train
    # Features of fully locked pretrained towers are computed once per distinct input and reused (content
    # addressed), in at most this much memory (0: no cache). A cached image tower trains on the deterministic
    # eval transform (the same image must give the same tensor); cache_images=false keeps random crops.
    cache_mb: int = 1024
    cache_images: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """One contrastive pretraining run."""

    model: str = "tiny"  # a registered name or a model config file
    # What the model learns to do: CLIP's contrastive matching, or (for the Fig. 2 comparison) predicting the
    # caption's bag of words or the caption itself from the image. See clipforge.objectives.
    objective: Literal["contrastive", "bag_of_words", "captioning"] = "contrastive"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys, e.g. {"vision.layers": 2}
    init_from: str = ""  # start from these weights (any checkpoint load_checkpoint reads); "" = random init
    lock: LockConfig = field(default_factory=LockConfig)  # LiT: locked towers
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    steps: int = 0  # optimizer steps; 0: derive from epochs and the dataset size
    epochs: float = 0.0
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast (fp16 with a grad scaler, GPU)
    accum_steps: int = 1  # micro-batches per step; the contrastive batch stays whole (features cached)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the training forward/backward (see clipforge.model.compile)
    # ddp: a whole replica per rank. fsdp: parameters, gradients and optimizer state sharded over the ranks
    # (torch FSDP2; checkpoints become folders of shards; see clipforge.train.fsdp).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    fsdp_reshard_after_forward: bool = True  # false: keep gathered weights from forward to backward (faster)
    loss_chunk_size: int = 0  # >0: memory-bounded exact loss over row chunks of this size
    loss: LossConfig = field(default_factory=LossConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch intra-op threads (0: torch's default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(_plain(self.to_dict()), sort_keys=True)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def validate_train_config(config: TrainConfig) -> TrainConfig:
    """Cross-field checks; :class:`ConfigError` names the field and the fix."""
    d, o, r = config.data, config.optim, config.run
    if not d.train:
        raise ConfigError(
            "data.train: no training data given; pass a shard folder, pattern or table (--data PATH)"
        )
    if d.weights and len(d.weights) != len(d.train):
        raise ConfigError(
            f"data.weights: {len(d.weights)} weights for {len(d.train)} sources; give one per source"
        )
    if any(w <= 0 for w in d.weights):
        raise ConfigError("data.weights: every weight must be positive")
    checks = {
        "data.batch_size": d.batch_size > 0,
        "data.num_workers": d.num_workers >= 0,
        "data.shuffle_buffer": d.shuffle_buffer >= 0,
        "data.max_skip_fraction": 0.0 <= d.max_skip_fraction <= 1.0,
        "data.skip_window": d.skip_window > 0,
        "data.loader_timeout_s": d.loader_timeout_s >= 0,
        "data.remote_retries": d.remote_retries >= 0,
        "data.remote_backoff_s": d.remote_backoff_s >= 0,
        "data.epoch_samples": d.epoch_samples >= 0,
        "optim.lr": o.lr > 0,
        "optim.warmup_steps": o.warmup_steps >= 0,
        "run.log_every": r.log_every > 0,
        "run.checkpoint_every": r.checkpoint_every > 0,
        "run.keep_last": r.keep_last > 0,
        "accum_steps": config.accum_steps > 0,
        "steps": config.steps >= 0,
        "epochs": config.epochs >= 0,
        "loss_chunk_size": config.loss_chunk_size >= 0,
        "lock.text_unlocked_layers": config.lock.text_unlocked_layers >= 0,
        "lock.image_unlocked_layers": config.lock.image_unlocked_layers >= 0,
        "lock.cache_mb": config.lock.cache_mb >= 0,
    }
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"{key}: invalid value; see `clipforge train --help` for its meaning")
    _validate_recipes(config)
    check_reporters(r.report_to, r.wandb_mode)
    if config.steps == 0 and config.epochs == 0:
        raise ConfigError("set the run length: steps (optimizer steps) or epochs (passes over the data)")
    if config.steps and config.epochs:
        raise ConfigError("set either steps or epochs, not both")
    for tower in ("text", "image"):
        if getattr(config.lock, f"{tower}_unlocked_layers") and not getattr(config.lock, tower):
            raise ConfigError(
                f"lock.{tower}_unlocked_layers: unlocks layers of a locked tower; set lock.{tower}=true"
            )
    return config


def _validate_recipes(config: TrainConfig) -> None:
    loss, d = config.loss, config.data
    if config.objective != "contrastive" and loss != LossConfig():
        raise ConfigError(
            f"loss: only the contrastive objective has these options, not objective '{config.objective}'; "
            "remove the loss.* settings"
        )
    if not 0.0 <= loss.label_smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing: must be in [0, 1) (e.g. 0.1), got {loss.label_smoothing}")
    if loss.label_smoothing and loss.kind != "softmax":
        raise ConfigError(
            "loss.label_smoothing: applies to the softmax loss only; set it to 0 with loss.kind=sigmoid"
        )
    if not 0.0 <= d.tag_dropout < 1.0:
        raise ConfigError(f"data.tag_dropout: a probability in [0, 1) (e.g. 0.3), got {d.tag_dropout}")
    if d.epoch_samples and not d.resampled:
        raise ConfigError(
            "data.epoch_samples: sets the epoch of resampled data; set data.resampled=true, or remove it (without "
            "resampling an epoch is one pass over the data)"
        )
    if d.resampled and config.epochs and not d.epoch_samples:
        raise ConfigError(
            "data.epoch_samples: resampled data (data.resampled=true) has no passes, so epochs needs the samples "
            "per epoch: set data.epoch_samples (e.g. the dataset's size), or set steps instead of epochs"
        )


# SigLIP's initialisation (Zhai et al. 2023): t' = log 10, b = -10.
SIGMOID_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}


def loss_model_defaults(config: TrainConfig, model_config: ModelConfig) -> dict[str, float]:
    """Model-config values the chosen loss starts from unless the user set them: for the sigmoid loss, SigLIP's
    scale and bias where the model config keeps CLIP's defaults (apply ``model_overrides`` after these)."""
    if config.objective != "contrastive" or config.loss.kind != "sigmoid":
        return {}
    defaults = {}
    if model_config.init_logit_scale == ModelConfig.init_logit_scale:
        defaults["init_logit_scale"] = SIGMOID_INIT["init_logit_scale"]
    if model_config.init_logit_bias is None:
        defaults["init_logit_bias"] = SIGMOID_INIT["init_logit_bias"]
    return defaults


def train_config_from_dict(data: dict[str, Any], where: str = "train config") -> TrainConfig:
    return validate_train_config(dataclass_from_dict(TrainConfig, data, where))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as JSON (numbers, true/false, null, lists),
    else as a YAML scalar/list, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if value is None and raw.strip() not in ("null", "~", ""):
            value = raw
    return key, value


_OPEN_KEYS = ("model_overrides",)


def resolve_train_config(
    file: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then ``file`` (YAML/JSON), then ``overrides`` (``["optim.lr=1e-3", ...]`` or a dict)."""
    data = TrainConfig().to_dict()
    where = "defaults"
    if file is not None:
        apply_overrides(data, read_mapping_file(file), open_keys=_OPEN_KEYS)
        where = str(file)
    if overrides:
        pairs = dict(parse_override(o) for o in overrides) if isinstance(overrides, list) else dict(overrides)
        apply_overrides(data, pairs, open_keys=_OPEN_KEYS)
        where += " + overrides"
    return train_config_from_dict(data, where=where)


__all__ = [
    "ConfigError",
    "DataConfig",
    "LockConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "parse_override",
    "resolve_train_config",
    "train_config_from_dict",
]
