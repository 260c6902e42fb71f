"""Building a run from its config, before the first step: the device, the model (with ``init_from``, locked
towers and a fixed temperature applied), the run length, the micro-batch size, mixed precision and the run
folder. Each function reads the config and returns one thing; :mod:`clipforge.train.loop` calls them in order."""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clipforge.config import ConfigError, apply_overrides, get_model_config, merge
from clipforge.data.sources import Source
from clipforge.device import autocast_context, resolve_device
from clipforge.distributed import DistEnv
from clipforge.objectives.base import Objective
from clipforge.train import checkpoint as ckpt
from clipforge.train.config import TrainConfig, loss_model_defaults, train_config_from_dict
from clipforge.train.feature_cache import FeatureCache
from clipforge.train.lock import apply_locks
from clipforge.train.step import freeze_temperature

_RESUME_CHANGEABLE = ("steps", "epochs", "run.")


def resumed_config(state: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """The saved config with the allowed ``overrides`` (run length and run.* settings) applied."""
    saved = json.loads(state["config"])
    for key in overrides:
        if not key.startswith(_RESUME_CHANGEABLE):
            raise ConfigError(
                f"cannot change '{key}' when resuming: an exact continuation needs the saved model, data and "
                "optimiser settings; only steps, epochs and run.* may change"
            )
    if "steps" in overrides or "epochs" in overrides:
        saved["steps"], saved["epochs"] = 0, 0.0
    return train_config_from_dict(apply_overrides(saved, overrides), where="resumed config")


def training_device(requested: str, env: DistEnv) -> torch.device:
    """``device`` ("auto", "cpu", "cuda") resolved; on a GPU, this rank's GPU under torchrun."""
    device = resolve_device(requested)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no GPU is available; use device=auto or cpu")
    return env.device if env.device.type == "cuda" else device


def build_model(
    config: TrainConfig, objective: Objective, device: torch.device
) -> tuple[nn.Module, dict[str, FeatureCache]]:
    """The model to train, on ``device`` in train mode, and the feature caches of its locked towers."""
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model_config = get_model_config(config.model)
    model_overrides = {**loss_model_defaults(config, model_config), **_nested(config.model_overrides)}
    if model_overrides:
        model_config = merge(model_config, model_overrides)
    model = objective.build_model(model_config)
    if config.init_from:
        objective.init_from(model, config.init_from)
    caches = apply_locks(model, config.lock)
    if not config.loss.learn_temperature:
        freeze_temperature(model)
    model.set_grad_checkpointing(config.grad_checkpointing)
    model.to(device).train()
    return model, caches


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted model overrides ({"vision.layers": 2}) as create_model keyword arguments."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    return nested


def dataset_size(sources: Sequence[Source], config: TrainConfig | None = None) -> int | None:
    """Pairs per epoch: ``data.epoch_samples`` when resampling, else the sources' sizes when every source
    records its size, else None."""
    if config is not None and config.data.resampled and config.data.epoch_samples:
        return config.data.epoch_samples
    sizes = [s.num_samples() for s in sources]
    return sum(sizes) if all(sizes) else None


def total_steps(config: TrainConfig, size: int | None) -> int:
    if config.steps:
        return config.steps
    if config.data.resampled:  # no passes: an epoch is data.epoch_samples samples (validated as set)
        size = config.data.epoch_samples
    if not size:
        raise ConfigError(
            "epochs needs the dataset size, which these sources do not record (no manifest.json); set steps"
        )
    return max(1, math.ceil(config.epochs * size / config.data.batch_size))


def micro_batch_size(config: TrainConfig, env: DistEnv) -> int:
    per_step = env.world_size * config.accum_steps
    if config.data.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size {config.data.batch_size} must be divisible by ranks x accum_steps = {per_step}"
        )
    return config.data.batch_size // per_step


def grad_scaler(config: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    if config.precision != "fp16":
        return None
    if device.type != "cuda":
        raise ConfigError("precision: fp16 needs a GPU (it uses a grad scaler); on the CPU use bf16 or fp32")
    return torch.amp.GradScaler("cuda")


def autocast_for(config: TrainConfig, device: torch.device) -> Callable[[], Any] | None:
    if config.precision == "fp32":
        return None
    return functools.partial(autocast_context, device, config.precision)


def run_folder(config: TrainConfig, env: DistEnv, resume_path: Path | None) -> Path:
    """The run's folder: the resumed checkpoint's run, or ``run.output_dir / run.name`` (default: the model and a
    timestamp, agreed by all ranks), which must not already hold checkpoints."""
    if resume_path is not None:
        return resume_path.parent.parent
    name = config.run.name or f"{Path(config.model).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if env.world_size > 1:  # every rank must agree on the (timestamped) name
        holder = [name]
        dist.broadcast_object_list(holder, src=0)
        name = holder[0]
    folder = Path(config.run.output_dir) / name
    if env.is_main and ckpt.list_checkpoints(folder):
        raise ConfigError(
            f"{folder} already holds checkpoints of a run; resume it with --resume latest, or choose another "
            "run.name / run.output_dir"
        )
    return folder
