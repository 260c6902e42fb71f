"""FSDP (torch's FSDP2, ``fully_shard``) beside DDP: ``train.parallel=fsdp`` shards parameters, gradients and
optimizer state over the ranks, each transformer block / residual stage / tower layer its own unit, then the root.

The scalar temperature parameters (``logit_scale``, ``logit_bias``) are not sharded (``fully_shard`` refuses
0-dimensional parameters, and their shape is fixed by the OpenAI/open_clip checkpoint formats): they stay
replicated, and :func:`sync_replicated_gradients` averages their gradients over the ranks, as DDP would.

Checkpoints are folders written with ``torch.distributed.checkpoint`` (every rank writes its shards), beside the
run's counters (:func:`save_sharded_checkpoint`); :func:`consolidate` turns one into the single-file model format
offline, and :func:`export_model` gathers the full weights for ``model.safetensors`` and the evaluation hooks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from clipforge.config import ConfigError, config_from_dict
from clipforge.distributed import DistEnv
from clipforge.files import atomic_directory
from clipforge.objectives import objective_for, save_model
from clipforge.objectives.base import Objective
from clipforge.train import checkpoint as ckpt
from clipforge.train.config import TrainConfig, train_config_from_dict

log = logging.getLogger("clipforge.train")


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: parameters all-gathered and computed in bf16, gradients reduced in fp32; fp32 (and fp16, which keeps
    its grad scaler and autocast): no casts."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The 0-dimensional parameters (the temperature), which stay whole on every rank."""
    return [param for param in model.parameters() if param.dim() == 0]


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded before the root, innermost first: every child of a ``ModuleList`` (transformer
    blocks, ResNet stages, BERT layers, EfficientNet blocks) that holds parameters."""
    units = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            units += [child for child in module if any(True for _ in child.parameters())]
    return units


def shard_model(
    model: nn.Module, config: TrainConfig, env: DistEnv, caches: dict[str, Any], device: torch.device
) -> nn.Module:
    """Shard ``model`` in place (build the optimizer afterwards: it must hold the sharded parameters)."""
    if env.world_size < 2:
        raise ConfigError(
            "parallel: fsdp shards the model over several processes, and this run has one; launch with "
            "torchrun --nproc-per-node N (N >= 2), or set parallel=ddp"
        )
    if caches:
        raise ConfigError(
            f"parallel: fsdp cannot cache the locked {' and '.join(sorted(caches))} tower's features (a cache hit "
            "on one rank skips the forward the others all-gather for); set lock.cache_mb=0, or parallel=ddp"
        )
    mesh = init_device_mesh(device.type, (env.world_size,))
    options: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mixed_precision(config.precision),
        "reshard_after_forward": config.fsdp_reshard_after_forward,
        "ignored_params": set(replicated_parameters(model)),
    }
    for unit in shard_units(model):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def sync_replicated_gradients(model: nn.Module) -> None:
    """Average the replicated parameters' gradients over the ranks (FSDP reduces only the sharded ones)."""
    if not is_sharded(model):
        return
    for param in replicated_parameters(model):
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded (DTensor) and replicated gradients together: the global norm of both."""
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    whole = [p for p in params if not isinstance(p.grad, DTensor)]
    norms = []
    if sharded:
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if whole:
        norms.append(
            torch.nn.utils.get_total_norm([p.grad for p in whole]).to(norms[0].device if norms else None)
        )
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, whole):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def export_model(model: nn.Module, objective: Objective) -> nn.Module | None:
    """The whole model with the current weights, on rank 0's CPU (None on the others). A collective."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return _bare_model(model.config, objective, state)


def _bare_model(model_config: Any, objective: Objective, state: dict[str, torch.Tensor]) -> nn.Module:
    with torch.device("meta"):
        bare = objective.build_model(model_config)
    bare.load_state_dict(state, assign=True)
    return bare.eval()


def save_sharded_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    payload: dict[str, Any] | None, keep_last: int,
) -> Path:  # fmt: skip
    """Write step ``step``'s checkpoint folder (a collective; ``payload``: rank 0's counters, None elsewhere):
    every rank's shards into a hidden folder, then rank 0 adds the counters and checksums and renames it into
    place, so a folder named ``step_N`` is always complete. An ``OSError`` on any rank is raised on every rank,
    the older checkpoints intact."""
    folder = ckpt.checkpoint_path(run_dir, step, sharded=True)
    shards = dict(zip(("model", "optim"), get_state_dict(model, optimizer), strict=True))
    if payload is None:
        building = _agreed(None)
        _save_shards(shards, building)
        _agreed(None)
        return folder
    phase = "folder"  # then "shards" (dcp.save raises on every rank itself), then "publish"
    try:
        with atomic_directory(folder) as building:
            building.mkdir(parents=True)
            _agreed(building)
            phase = "shards"
            _save_shards(shards, building)
            phase = "publish"
            state = {
                "format": ckpt.FORMAT,
                "format_version": ckpt.FORMAT_VERSION,
                "step": step,
                "sharded": True,
            }
            torch.save({**state, **payload}, building / ckpt.FOLDER_STATE)
            ckpt.write_folder_checksums(building)
    except OSError as exc:
        if phase != "shards":  # the other ranks wait for rank 0's word
            _agreed(exc)
        raise
    _agreed(None)
    ckpt.prune_checkpoints(run_dir, keep_last)
    return folder


def _agreed(value: Path | OSError | None) -> Path | None:
    """Rank 0's ``value`` on every rank: an error is raised everywhere (as OSError), a path returned."""
    holder: list[Any] = [f"{value.strerror or value}" if isinstance(value, OSError) else value]
    dist.broadcast_object_list(holder, src=0)
    if isinstance(holder[0], str) and dist.get_rank() != 0:
        raise OSError(f"rank 0 could not write the checkpoint: {holder[0]}")
    return holder[0]


def _save_shards(shards: dict[str, Any], building: Path | None) -> None:
    try:
        dcp.save(shards, checkpoint_id=building)
    except CheckpointException as exc:  # raised on every rank when one rank's write failed
        raise OSError(f"a rank could not write its shards ({exc})") from exc


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer state into the sharded ``model`` and its ``optimizer``."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate(checkpoint_dir: str | Path, output: str | Path | None = None) -> Path:
    """Convert a sharded training checkpoint folder into the single-file model format (one process, no process
    group): ``output`` defaults to ``<checkpoint_dir>.safetensors``. Returns the written path."""
    folder = Path(checkpoint_dir)
    state = ckpt.load_training_checkpoint(folder)
    if not state.get("sharded"):
        raise ConfigError(f"{folder}: not a sharded (parallel=fsdp) checkpoint folder")
    config = train_config_from_dict(json.loads(state["config"]), where=f"{folder}'s saved config")
    objective = objective_for(config)
    model_config = config_from_dict(json.loads(state["model_config"]), where=str(folder / ckpt.FOLDER_STATE))
    model = objective.build_model(model_config)
    model_state = model.state_dict()
    dcp.load({"model": model_state}, checkpoint_id=folder, no_dist=True)
    model.load_state_dict(model_state)
    target = Path(output) if output is not None else folder.with_name(folder.name + ".safetensors")
    return save_model(model, target, config.objective)
