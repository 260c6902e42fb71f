"""What a training checkpoint holds besides the file format: the run's counters (:class:`Counters`), written by
:func:`checkpoint_payload` and read back by :func:`restore`, so a resumed run continues bitwise-identically."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clipforge.checkpoint.towers import fill_tower_weights, split_tower_weights
from clipforge.config import ConfigError
from clipforge.distributed import DistEnv
from clipforge.train import checkpoint as ckpt
from clipforge.train import fsdp
from clipforge.train.config import TrainConfig

log = logging.getLogger("clipforge.train")


@dataclass
class Counters:
    """Where the run stands: steps done, pairs seen, each data partition's position (samples that left its
    shuffle buffer), skip counts by reason (rank-local until gathered), and non-finite steps so far."""

    step: int = 0
    samples_seen: int = 0
    positions: dict[int, int] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    nonfinite_steps: int = 0


@dataclass
class Optimization:
    """The modules a checkpoint saves and restores besides the model."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optim: Optimization,
    config: TrainConfig,
    env: DistEnv,
    path: Path,
) -> Counters:
    """Load checkpoint ``state`` (read from ``path``) into the model and optimisation; return its counters."""
    data = state["data"]
    if (data["world_size"], data["num_workers"]) != (env.world_size, config.data.num_workers):
        raise ConfigError(
            f"exact resume needs the same ranks x data workers as the saved run ({data['world_size']} x "
            f"{data['num_workers']}), not {env.world_size} x {config.data.num_workers}: the data stream is "
            "split by both. Relaunch with the saved numbers (--set data.num_workers=...)"
        )
    if state.get("sharded"):
        fsdp.load_sharded(path, model, optim.optimizer)
    else:
        model.load_state_dict(fill_tower_weights(model, state["model"], state.get("towers", {}), path))
        optim.optimizer.load_state_dict(state["optimizer"])
    optim.scheduler.load_state_dict(state["scheduler"])
    if optim.scaler is not None and state.get("scaler"):
        optim.scaler.load_state_dict(state["scaler"])
    log.info("resumed from %s at step %d", path, state["step"])
    return Counters(
        step=state["step"],
        samples_seen=state["samples_seen"],
        positions={int(k): int(v) for k, v in data["positions"].items()},
        counts=Counter(state["counts"]) if env.is_main else Counter(),  # saved counts are the global totals
        nonfinite_steps=state["nonfinite_steps"],
    )


def global_counts(counts: Counter, env: DistEnv) -> dict[str, int]:
    """Skip counts summed over ranks (a collective: every rank calls it)."""
    if env.world_size == 1:
        return dict(sorted(counts.items()))
    gathered: list[dict[str, int]] = [{} for _ in range(env.world_size)]
    dist.all_gather_object(gathered, dict(counts))
    total: Counter[str] = Counter()
    for part in gathered:
        total.update(part)
    return dict(sorted(total.items()))


def checkpoint_payload(
    model: nn.Module, optim: Optimization, counters: Counters, config: TrainConfig, env: DistEnv
) -> dict[str, Any] | None:
    """Everything a checkpoint holds, on rank 0 (None on the others). A collective: every rank calls it, since
    positions and counts are gathered from all ranks. A sharded model's weights and optimizer state are left out
    (:func:`clipforge.train.fsdp.save_sharded_checkpoint` writes them)."""
    positions = dict(counters.positions)
    if env.world_size > 1:
        gathered: list[dict[int, int]] = [{} for _ in range(env.world_size)]
        dist.all_gather_object(gathered, counters.positions)
        for part in gathered:
            positions.update(part)
    counts = global_counts(counters.counts, env)
    if not env.is_main:
        return None
    weights: dict[str, Any] = {}
    if not fsdp.is_sharded(model):
        model_state, towers = split_tower_weights(model)  # tensors still equal to a tower package's stay out
        weights = {"model": model_state, "towers": towers, "optimizer": optim.optimizer.state_dict()}
    return {
        "config": config.to_json(),
        "model_config": model.config.to_json(),
        "samples_seen": counters.samples_seen,
        **weights,
        "scheduler": optim.scheduler.state_dict(),
        "scaler": optim.scaler.state_dict() if optim.scaler is not None else None,
        "rng": ckpt.rng_state(),
        "data": {
            "positions": {str(k): v for k, v in sorted(positions.items())},
            "world_size": env.world_size,
            "num_workers": config.data.num_workers,
        },
        "counts": counts,
        "nonfinite_steps": counters.nonfinite_steps,
    }
