"""Saving and loading a trained model of any objective: CLIP models in clipforge's checkpoint format, the
others as safetensors with the objective's name and the model config in the header."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from torch import nn

from clipforge.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from clipforge.checkpoint.native import native_metadata, write_safetensors
from clipforge.config import config_from_dict
from clipforge.model import CLIP
from clipforge.objectives.registry import get_objective

OBJECTIVE_KEY = "objective"


def save_model(model: nn.Module, path: str | Path, objective: str) -> Path:
    """Write ``model`` atomically; a CLIP (contrastive objective) stays loadable by ``load_checkpoint``."""
    if isinstance(model, CLIP):
        return save_checkpoint(model, path)
    metadata = native_metadata(model.config, {OBJECTIVE_KEY: objective})  # type: ignore[arg-type]
    return write_safetensors(model.state_dict(), path, metadata)


def load_objective_model(path: str | Path) -> tuple[nn.Module, str]:
    """``(model in eval mode, objective name)`` from a file :func:`save_model` wrote."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except Exception as exc:  # not safetensors: let load_checkpoint explain
        if path.exists():
            return load_checkpoint(path), "contrastive"
        raise FileNotFoundError(f"{path}: no such model file") from exc
    objective = metadata.get(OBJECTIVE_KEY, "contrastive")
    if objective == "contrastive":
        return load_checkpoint(path), objective
    if "config" not in metadata:
        raise CheckpointError(f"{path}: a '{objective}' model without its config in the header; re-save it")
    config = config_from_dict(json.loads(metadata["config"]), where=str(path))
    model = get_objective(objective).build_model(config)
    model.load_state_dict(tensors)
    return model.eval(), objective
