"""Reading and writing the three foreign CLIP formats: OpenAI (state dicts and TorchScript archives), open_clip
(state dicts, training checkpoints, ``local-dir`` folders) and Hugging Face ``CLIPModel`` folders."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint.errors import CheckpointError
from clipforge.checkpoint.native import write_safetensors
from clipforge.checkpoint.reader import RawCheckpoint, read_checkpoint
from clipforge.config import ModelConfig, config_from_dict, merge
from clipforge.files import atomic_path
from clipforge.model.convert import (
    ConversionError,
    config_from_hf,
    config_to_hf,
    from_hf,
    from_openai,
    infer_openai_config,
    to_hf,
    to_openai,
)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)

_ACTIVATION_HELP = (
    "the activation cannot be read from OpenAI/open_clip-layout tensors: pass activation='quick_gelu' "
    "(OpenAI's released weights, open_clip '-quickgelu' models) or activation='gelu' (most LAION/DataComp "
    "open_clip models), or config=<model name> (CLI: --activation / --model). A mismatch silently costs accuracy, "
    "so clipforge does not guess"
)


def is_openai_layout(keys: Any) -> bool:
    keys = set(keys)
    return "token_embedding.weight" in keys and any(k.startswith("visual.") for k in keys)


def is_hf_layout(keys: Any) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in keys)


# ----------------------------------------------------------------------------------------------------------------
# Import


def read_openai(
    raw: RawCheckpoint, config: ModelConfig | None, activation: str | None, assume_openai: bool
) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """Tensors in OpenAI/open_clip layout -> (config, clipforge tensors, dropped keys).

    ``assume_openai``: the file is one of OpenAI's (a TorchScript archive, or ``format='openai'``), so QuickGELU.
    """
    if config is None:
        if activation is None:
            if not assume_openai:
                raise CheckpointError(f"{raw.path}: {_ACTIVATION_HELP}")
            activation = "quick_gelu"
        try:
            config = infer_openai_config(raw.tensors, activation=activation, name=raw.path.stem)
        except ConversionError as exc:
            raise CheckpointError(f"{raw.path}: {exc}") from exc
    elif activation is not None and activation != config.activation:
        config = merge(config, {"activation": activation})
    try:
        tensors, dropped = from_openai(raw.tensors, config)
    except ConversionError as exc:
        raise CheckpointError(f"{raw.path}: {exc}") from exc
    return config, tensors, dropped


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """A Hugging Face ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``)."""
    config_file = folder / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{folder}: a Hugging Face CLIPModel folder needs config.json beside the weights"
        ) from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON: {exc}") from exc
    weights = next((folder / n for n in HF_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights found; expected one of {list(HF_WEIGHT_FILES)}")
    try:
        config = config_from_hf(hf_config, name=folder.name)
    except (ConversionError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: cannot build a clipforge config: {exc}") from exc
    config = _with_hf_preprocess(config, folder / "preprocessor_config.json")
    raw = read_checkpoint(weights)
    try:
        tensors, dropped = from_hf(raw.tensors, config)
    except ConversionError as exc:
        raise CheckpointError(f"{weights}: {exc}") from exc
    return config, tensors, dropped


def _with_hf_preprocess(config: ModelConfig, file: Path) -> ModelConfig:
    if not file.is_file():
        return config
    data = json.loads(file.read_text())
    overrides: dict[str, Any] = {}
    if "image_mean" in data:
        overrides["preprocess.mean"] = list(data["image_mean"])
    if "image_std" in data:
        overrides["preprocess.std"] = list(data["image_std"])
    return merge(config, overrides) if overrides else config


def read_open_clip_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """An open_clip ``local-dir``/hub folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    config_file = folder / OPEN_CLIP_CONFIG
    data = json.loads(config_file.read_text())
    model_cfg, pre = data.get("model_cfg", data), data.get("preprocess_cfg", {})
    weights = next((folder / n for n in OPEN_CLIP_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights found; expected one of {list(OPEN_CLIP_WEIGHT_FILES)}")
    config = config_from_open_clip(model_cfg, pre, name=folder.name, where=str(config_file))
    raw = read_checkpoint(weights)
    return read_openai(raw, config, None, assume_openai=False)


def config_from_open_clip(
    model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any], name: str, where: str
) -> ModelConfig:
    """clipforge config from an open_clip model config (standard CLIP architectures only)."""
    vc, tc = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    unsupported = sorted(
        k
        for k in list(vc) + list(tc)
        if k
        not in {
            "image_size",
            "layers",
            "width",
            "patch_size",
            "head_width",
            "mlp_ratio",
            "context_length",
            "vocab_size",
            "heads",
            "patch_dropout",
        }
    )
    if unsupported:
        raise CheckpointError(
            f"{where}: open_clip options {unsupported} are not part of the CLIP architecture"
        )
    resnet = isinstance(vc.get("layers"), (list, tuple))
    data: dict[str, Any] = {
        "name": name,
        "embed_dim": model_cfg["embed_dim"],
        "activation": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "vision": {
            "arch": "resnet" if resnet else "vit",
            "image_size": vc.get("image_size", 224),
            "layers": vc.get("layers", 12),
            "width": vc.get("width", 768),
            "patch_size": None if resnet else vc.get("patch_size", 16),
            "head_width": vc.get("head_width", 64),
            "mlp_ratio": vc.get("mlp_ratio", 4.0),
            "patch_dropout": vc.get("patch_dropout", 0.0),
        },
        "text": {
            k: tc[k]
            for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")
            if k in tc
        },
        "preprocess": {k: preprocess_cfg[k] for k in ("mean", "std") if k in preprocess_cfg},
    }
    if model_cfg.get("init_logit_bias") is not None:
        data["init_logit_bias"] = model_cfg["init_logit_bias"]
    return config_from_dict(data, where=where)


# ----------------------------------------------------------------------------------------------------------------
# Export


def write_openai(tensors: Mapping[str, torch.Tensor], config: ModelConfig, path: Path) -> Path:
    """A state dict in OpenAI's layout, readable by ``clip.load(path, jit=False)`` and open_clip."""
    if config.activation != "quick_gelu":
        raise ConversionError(
            f"OpenAI's loader always builds QuickGELU models, but '{config.name}' uses {config.activation}; "
            "export to open_clip instead (its config records the activation)"
        )
    exported = to_openai(tensors, config)
    inferred = infer_openai_config(exported, activation=config.activation)
    mismatch = _architecture_mismatch(config, inferred)
    if mismatch:
        raise ConversionError(
            f"OpenAI's loader would rebuild '{config.name}' with a different {mismatch} (it assumes 64-wide "
            "attention heads); export to open_clip or hf instead"
        )
    _torch_save(exported, path)
    return path


def _architecture_mismatch(ours: ModelConfig, inferred: ModelConfig) -> str | None:
    for field in ("embed_dim",):
        if getattr(ours, field) != getattr(inferred, field):
            return field
    for side in ("vision", "text"):
        a, b = getattr(ours, side), getattr(inferred, side)
        for field in a.__dataclass_fields__:
            if field == "patch_dropout":  # a training setting, not part of the architecture
                continue
            if getattr(a, field) != getattr(b, field):
                return f"{side}.{field}"
    return None


def write_open_clip(tensors: Mapping[str, torch.Tensor], config: ModelConfig, path: Path) -> Path:
    """A folder loadable by ``open_clip.create_model('local-dir:PATH')`` (config + safetensors), or, when
    ``path`` names a ``.safetensors``/``.pt``/``.bin`` file, just the state dict."""
    exported = to_openai(tensors, config)
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        if path.suffix == ".safetensors":
            write_safetensors(exported, path)
        else:
            _torch_save(exported, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(exported, path / OPEN_CLIP_WEIGHT_FILES[0])
    _write_json(path / OPEN_CLIP_CONFIG, open_clip_config(config))
    return path


def open_clip_config(config: ModelConfig) -> dict[str, Any]:
    v, t, p = config.vision, config.text, config.preprocess
    vision: dict[str, Any] = {"image_size": v.image_size, "layers": v.layers, "width": v.width}
    if v.arch == "vit":
        vision.update(patch_size=v.patch_size, head_width=v.head_width, mlp_ratio=v.mlp_ratio)
        if v.patch_dropout:
            vision["patch_dropout"] = v.patch_dropout
    else:
        vision.update(patch_size=None, head_width=v.head_width)
    extra = {} if config.init_logit_bias is None else {"init_logit_bias": config.init_logit_bias}
    return {
        "model_cfg": {
            "embed_dim": config.embed_dim,
            "quick_gelu": config.activation == "quick_gelu",
            **extra,
            "vision_cfg": vision,
            "text_cfg": {
                "context_length": t.context_length,
                "vocab_size": t.vocab_size,
                "width": t.width,
                "heads": t.heads,
                "layers": t.layers,
                "mlp_ratio": t.mlp_ratio,
            },
        },
        "preprocess_cfg": {
            "mean": list(p.mean),
            "std": list(p.std),
            "interpolation": p.interpolation,
            "resize_mode": p.resize_mode,
        },
    }


def write_hf(tensors: Mapping[str, torch.Tensor], config: ModelConfig, folder: Path) -> Path:
    """A folder loadable by ``transformers.CLIPModel.from_pretrained(folder)``."""
    exported = to_hf(tensors, config)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(exported, folder / "model.safetensors", metadata={"format": "pt"})
    _write_json(folder / "config.json", config_to_hf(config))
    _write_json(folder / "preprocessor_config.json", hf_preprocessor_config(config))
    return folder


def hf_preprocessor_config(config: ModelConfig) -> dict[str, Any]:
    size, p = config.vision.image_size, config.preprocess
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3 if p.interpolation == "bicubic" else 2,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(p.mean),
        "image_std": list(p.std),
        "do_convert_rgb": True,
    }


def _torch_save(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


__all__ = [
    "config_from_open_clip",
    "is_hf_layout",
    "is_openai_layout",
    "read_hf_folder",
    "read_open_clip_folder",
    "read_openai",
    "write_hf",
    "write_open_clip",
    "write_openai",
]
