"""clipforge's own checkpoint format: one safetensors file whose JSON header carries the resolved model config
(architecture, activation, preprocessing, tokenizer settings) and the clipforge version, so the file alone
rebuilds the model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from clipforge.checkpoint.errors import CheckpointError
from clipforge.config import ConfigError, ModelConfig, config_from_dict
from clipforge.files import atomic_path
from clipforge.version import __version__

FORMAT_NAME = "clipforge"
FORMAT_VERSION = "1"


def native_metadata(
    config: ModelConfig, extra: Mapping[str, str] | None = None, towers: Mapping[str, object] | None = None
) -> dict[str, str]:
    """The header: format, versions, the resolved config and (LiT models) the pretrained ``towers`` the weights
    need (see :mod:`clipforge.checkpoint.towers`); ``extra`` keys may not shadow these."""
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "clipforge_version": __version__,
        "config": config.to_json(),
    }
    if towers:
        metadata["towers"] = json.dumps(towers, sort_keys=True)
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"metadata key '{key}' is reserved by the clipforge checkpoint format")
        metadata[key] = str(value)
    return metadata


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Atomically write ``tensors`` (made contiguous, on the CPU) to a safetensors file."""
    path = Path(path)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata else None)
    return path


def is_native(metadata: Mapping[str, str]) -> bool:
    return metadata.get("format") == FORMAT_NAME


def config_from_metadata(metadata: Mapping[str, str], path: Path) -> ModelConfig:
    """The :class:`ModelConfig` stored in a clipforge checkpoint's header."""
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: clipforge checkpoint format version {version!r} is not supported by this clipforge "
            f"(which reads version {FORMAT_VERSION}); upgrade clipforge"
        )
    try:
        return config_from_dict(json.loads(metadata["config"]), where=f"{path} (header 'config')")
    except (KeyError, json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(
            f"{path}: the clipforge header's model config is missing or invalid: {exc}"
        ) from exc
