"""Checkpoints: clipforge's self-describing safetensors format, import from and export to OpenAI, open_clip and
Hugging Face, and strict weight loading with errors that name the mismatching key."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from clipforge.checkpoint import foreign
from clipforge.checkpoint.errors import CheckpointError, TowerUnavailableError, UnsafeCheckpointError
from clipforge.checkpoint.native import config_from_metadata, is_native, native_metadata, write_safetensors
from clipforge.checkpoint.reader import read_checkpoint
from clipforge.checkpoint.towers import fill_tower_weights, split_tower_weights, tower_header
from clipforge.config import ModelConfig, get_model_config, merge
from clipforge.model import CLIP
from clipforge.model.convert import ConversionError

log = logging.getLogger("clipforge.checkpoint")

SourceFormat = Literal["auto", "clipforge", "openai", "open_clip", "hf"]
TargetFormat = Literal["clipforge", "openai", "open_clip", "hf"]
FORMATS: tuple[str, ...] = ("clipforge", "openai", "open_clip", "hf")


@dataclass(frozen=True)
class LoadedWeights:
    """Weights read from any supported file, renamed to clipforge's module tree."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    format: str
    path: Path
    dropped: list[str] = field(default_factory=list)  # foreign non-weight entries that were ignored
    metadata: dict[str, str] = field(default_factory=dict)


def read_weights(
    path: str | Path,
    *,
    format: SourceFormat = "auto",
    config: ModelConfig | str | None = None,
    activation: Literal["quick_gelu", "gelu"] | None = None,
) -> LoadedWeights:
    """Read a checkpoint in any supported format without building a model.

    ``config`` (a :class:`ModelConfig` or a model name) describes the architecture when the file cannot (bare
    state dicts); ``activation`` settles QuickGELU vs GELU for OpenAI/open_clip-layout state dicts, which do not
    record it. Neither is needed for clipforge checkpoints, Hugging Face folders, open_clip folders, or OpenAI's
    TorchScript archives.
    """
    path = Path(path)
    if format not in ("auto", *FORMATS):
        raise ValueError(f"unknown checkpoint format '{format}'; use one of {['auto', *FORMATS]}")
    resolved = get_model_config(config) if isinstance(config, str) else config
    if path.is_dir():
        return _read_folder(path, format)
    if (
        path.name in foreign.HF_WEIGHT_FILES
        and (path.parent / "config.json").is_file()
        and format in ("auto", "hf")
    ):
        return _read_folder(path.parent, "hf")
    raw = read_checkpoint(path)
    keys = raw.tensors.keys()
    if format == "clipforge" or (format == "auto" and is_native(raw.metadata)):
        cfg = config_from_metadata(raw.metadata, path) if is_native(raw.metadata) else resolved
        if cfg is None:
            raise CheckpointError(
                f"{path}: clipforge weights without a config header; pass config=<model name or ModelConfig>"
            )
        if activation is not None:
            cfg = merge(cfg, {"activation": activation})
        return LoadedWeights(cfg, dict(raw.tensors), "clipforge", path, metadata=dict(raw.metadata))
    if format in ("openai", "open_clip") or (format == "auto" and foreign.is_openai_layout(keys)):
        if not foreign.is_openai_layout(keys):
            raise CheckpointError(
                f"{path}: not an OpenAI/open_clip-layout CLIP checkpoint (no token_embedding)"
            )
        assume_openai = format == "openai" or raw.container == "torchscript"
        cfg, tensors, dropped = foreign.read_openai(raw, resolved, activation, assume_openai)
        fmt = "openai" if assume_openai else "open_clip"
        return LoadedWeights(cfg, tensors, fmt, path, dropped, dict(raw.metadata))
    if format == "hf" or foreign.is_hf_layout(keys):
        raise CheckpointError(
            f"{path}: Hugging Face CLIPModel weights need their config.json: pass the folder that holds both"
        )
    if resolved is not None:  # clipforge keys without a header, described by the caller
        return LoadedWeights(resolved, dict(raw.tensors), "clipforge", path, metadata=dict(raw.metadata))
    sample = ", ".join(list(keys)[:3])
    raise CheckpointError(
        f"{path}: tensors are in no known CLIP layout (first keys: {sample}); expected clipforge, OpenAI/open_clip "
        "or Hugging Face names"
    )


def _read_folder(folder: Path, format: str) -> LoadedWeights:
    if (folder / foreign.OPEN_CLIP_CONFIG).is_file() and format in ("auto", "open_clip"):
        cfg, tensors, dropped = foreign.read_open_clip_folder(folder)
        return LoadedWeights(cfg, tensors, "open_clip", folder, dropped)
    if (folder / "config.json").is_file() and format in ("auto", "hf"):
        cfg, tensors, dropped = foreign.read_hf_folder(folder)
        return LoadedWeights(cfg, tensors, "hf", folder, dropped)
    raise CheckpointError(
        f"{folder}: a folder checkpoint needs config.json (Hugging Face) or {foreign.OPEN_CLIP_CONFIG} (open_clip)"
    )


def load_weights(
    model: CLIP, state_dict: Mapping[str, torch.Tensor], source: str | Path = "checkpoint"
) -> None:
    """Copy ``state_dict`` into ``model`` strictly: every key present, none extra, every shape equal.

    Raises :class:`CheckpointError` naming the first mismatching key (in the model's order) and both shapes.
    """
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise CheckpointError(
                f"{source}: weight '{key}' (shape {tuple(tensor.shape)}) is missing from the checkpoint for "
                f"model '{model.config.name}'; the checkpoint was made for another architecture"
            )
        got = state_dict[key]
        if tuple(got.shape) != tuple(tensor.shape):
            hint = ""
            if key.endswith("pos_embed"):
                hint = " (load at the checkpoint's size, then call model.resize_image / model.resize_context)"
            raise CheckpointError(
                f"{source}: weight '{key}' has shape {tuple(got.shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in model '{model.config.name}'{hint}"
            )
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} checkpoint weight(s) have no place in model '{model.config.name}', "
            f"first '{unexpected[0]}'; the checkpoint was made for another architecture"
        )
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(
    path: str | Path,
    *,
    format: SourceFormat = "auto",
    config: ModelConfig | str | None = None,
    activation: Literal["quick_gelu", "gelu"] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> CLIP:
    """Build the model a checkpoint describes and load its weights; returns it in eval mode.

    Reads clipforge files, OpenAI checkpoints (state dicts and TorchScript archives, read without running code),
    open_clip state dicts/training checkpoints/folders and Hugging Face CLIPModel folders. See
    :func:`read_weights` for ``config`` and ``activation``. A LiT checkpoint takes its locked tower weights from
    the tower packages (:class:`TowerUnavailableError`, with the pip line, when one is missing or differs).
    """
    loaded = read_weights(path, format=format, config=config, activation=activation)
    if loaded.dropped:
        log.info(
            "%s: ignored %d non-weight entries: %s", path, len(loaded.dropped), ", ".join(loaded.dropped)
        )
    model = CLIP(loaded.config)
    state = loaded.state_dict
    header = tower_header(loaded.metadata)
    if header:
        state = fill_tower_weights(model, state, header, path)
    load_weights(model, state, source=path)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def save_checkpoint(model: CLIP, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` in clipforge's format (atomically): safetensors weights + the config in the header.

    Pretrained-tower tensors still equal to their package's are left out and recorded in the header instead.
    """
    state, towers = split_tower_weights(model)
    return write_safetensors(state, path, native_metadata(model.config, metadata, towers))


def export_checkpoint(model: CLIP, path: str | Path, to: TargetFormat) -> Path:
    """Write ``model`` in another format: ``clipforge`` (a .safetensors file), ``openai`` (a state-dict .pt file
    for ``clip.load(path, jit=False)``), ``open_clip`` (a folder for ``open_clip.create_model('local-dir:PATH')``,
    or a weights file when ``path`` ends in .safetensors/.pt/.bin) or ``hf`` (a folder for
    ``CLIPModel.from_pretrained``)."""
    path = Path(path)
    if to != "clipforge" and (model.config.vision.tower or model.config.text.tower):
        raise CheckpointError(
            f"cannot export to {to}: model '{model.config.name}' has pretrained towers (LiT), which the {to} "
            "format cannot describe; save it in clipforge's format"
        )
    try:
        if to == "clipforge":
            return save_checkpoint(model, path)
        tensors = model.state_dict()
        if to == "openai":
            return foreign.write_openai(tensors, model.config, path)
        if to == "open_clip":
            return foreign.write_open_clip(tensors, model.config, path)
        if to == "hf":
            return foreign.write_hf(tensors, model.config, path)
    except ConversionError as exc:
        raise CheckpointError(f"cannot export to {to}: {exc}") from exc
    raise ValueError(f"unknown export format '{to}'; use one of {list(FORMATS)}")


__all__ = [
    "FORMATS",
    "CheckpointError",
    "LoadedWeights",
    "TowerUnavailableError",
    "UnsafeCheckpointError",
    "export_checkpoint",
    "load_checkpoint",
    "load_weights",
    "read_weights",
    "save_checkpoint",
]
