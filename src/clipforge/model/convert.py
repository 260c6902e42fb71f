"""Foreign checkpoint layouts: key maps between clipforge's module tree and OpenAI's (which open_clip shares for
these architectures) and Hugging Face ``CLIPModel``'s, and architecture inference from foreign tensors.

Everything here is a pure function of tensors and configs. clipforge's own module names never bend to these
layouts; the renaming lives here only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from clipforge.config import (
    ModelConfig,
    TextConfig,
    VisionConfig,
    config_from_dict,
)

StateDict = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """Foreign tensors that do not fit the layout they claim to be in; the message names the key."""


# ----------------------------------------------------------------------------------------------------------------
# Rename tables: (clipforge template, foreign template). "{i}" matches a block index, "{p}" a parameter name.


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name in ("i", "p"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>[^.]+)")
    return re.compile(pattern + r"\Z")


@dataclass(frozen=True)
class _Rule:
    ours: str
    theirs: str
    transpose: bool = False  # clipforge stores nn.Linear weights; OpenAI stores x @ P matrices

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ours_re", _compile(self.ours))
        object.__setattr__(self, "_theirs_re", _compile(self.theirs))


def _block_rules(ours: str, theirs: str, names: Mapping[str, str]) -> list[_Rule]:
    return [_Rule(f"{ours}.{{i}}.{a}.{{p}}", f"{theirs}.{{i}}.{b}.{{p}}") for a, b in names.items()]


_OPENAI_BLOCK = {
    "norm1": "ln_1",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "attn.out": "attn.out_proj",
}

_OPENAI_TEXT_RULES = [
    _Rule("text.token_embed.weight", "token_embedding.weight"),
    _Rule("text.pos_embed", "positional_embedding"),
    _Rule("text.norm_final.{p}", "ln_final.{p}"),
    _Rule("text.proj.weight", "text_projection", transpose=True),
    _Rule("text.transformer.blocks.{i}.attn.qkv.weight", "transformer.resblocks.{i}.attn.in_proj_weight"),
    _Rule("text.transformer.blocks.{i}.attn.qkv.bias", "transformer.resblocks.{i}.attn.in_proj_bias"),
    *_block_rules("text.transformer.blocks", "transformer.resblocks", _OPENAI_BLOCK),
    _Rule("logit_scale", "logit_scale"),
    _Rule("logit_bias", "logit_bias"),  # open_clip models built with init_logit_bias (SigLIP-style loss)
]

_OPENAI_VIT_RULES = [
    _Rule("visual.patch_embed.weight", "visual.conv1.weight"),
    _Rule("visual.class_token", "visual.class_embedding"),
    _Rule("visual.pos_embed", "visual.positional_embedding"),
    _Rule("visual.norm_pre.{p}", "visual.ln_pre.{p}"),
    _Rule("visual.norm_post.{p}", "visual.ln_post.{p}"),
    _Rule("visual.proj.weight", "visual.proj", transpose=True),
    _Rule(
        "visual.transformer.blocks.{i}.attn.qkv.weight",
        "visual.transformer.resblocks.{i}.attn.in_proj_weight",
    ),
    _Rule(
        "visual.transformer.blocks.{i}.attn.qkv.bias", "visual.transformer.resblocks.{i}.attn.in_proj_bias"
    ),
    *_block_rules("visual.transformer.blocks", "visual.transformer.resblocks", _OPENAI_BLOCK),
]

_RESNET_BLOCK = {name: name for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")}
_RESNET_BLOCK.update({"downsample.conv": "downsample.0", "downsample.bn": "downsample.1"})

_OPENAI_RESNET_RULES = [
    *[
        _Rule(f"visual.stem.{n}.{{p}}", f"visual.{n}.{{p}}")
        for n in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    ],
    *[
        rule
        for s in range(4)
        for rule in _block_rules(f"visual.stages.{s}", f"visual.layer{s + 1}", _RESNET_BLOCK)
    ],
    _Rule("visual.attnpool.pos_embed", "visual.attnpool.positional_embedding"),
    _Rule("visual.attnpool.proj.{p}", "visual.attnpool.c_proj.{p}"),
    # attnpool.qkv is split into q_proj/k_proj/v_proj by the fused-projection handling below.
]

_HF_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "attn.out": "self_attn.out_proj",
}

_HF_RULES = [
    _Rule("visual.patch_embed.weight", "vision_model.embeddings.patch_embedding.weight"),
    _Rule("visual.class_token", "vision_model.embeddings.class_embedding"),
    _Rule("visual.pos_embed", "vision_model.embeddings.position_embedding.weight"),
    _Rule("visual.norm_pre.{p}", "vision_model.pre_layrnorm.{p}"),
    _Rule("visual.norm_post.{p}", "vision_model.post_layernorm.{p}"),
    _Rule("visual.proj.weight", "visual_projection.weight"),
    *_block_rules("visual.transformer.blocks", "vision_model.encoder.layers", _HF_BLOCK),
    _Rule("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
    _Rule("text.pos_embed", "text_model.embeddings.position_embedding.weight"),
    _Rule("text.norm_final.{p}", "text_model.final_layer_norm.{p}"),
    _Rule("text.proj.weight", "text_projection.weight"),
    *_block_rules("text.transformer.blocks", "text_model.encoder.layers", _HF_BLOCK),
    _Rule("logit_scale", "logit_scale"),
]


@dataclass(frozen=True)
class _Fused:
    """A clipforge fused q/k/v tensor stored as three tensors in the foreign layout."""

    ours: str  # e.g. "visual.attnpool.qkv.{p}"
    theirs: tuple[str, str, str]


_OPENAI_FUSED = [
    _Fused(
        "visual.attnpool.qkv.{p}",
        ("visual.attnpool.q_proj.{p}", "visual.attnpool.k_proj.{p}", "visual.attnpool.v_proj.{p}"),
    )
]
_HF_FUSED = [
    _Fused(
        f"{ours}.{{i}}.attn.qkv.{{p}}",
        tuple(f"{theirs}.{{i}}.self_attn.{x}_proj.{{p}}" for x in "qkv"),  # type: ignore[arg-type]
    )
    for ours, theirs in (
        ("visual.transformer.blocks", "vision_model.encoder.layers"),
        ("text.transformer.blocks", "text_model.encoder.layers"),
    )
]

# Entries of foreign state dicts that are not weights (OpenAI's TorchScript attributes, HF's position ids,
# open_clip's old attention-mask buffer). They are dropped on import and counted by the caller.
_OPENAI_IGNORED = re.compile(r"(input_resolution|context_length|vocab_size|attn_mask|.*\.attn_mask)\Z")
_HF_IGNORED = re.compile(r".*position_ids\Z")


def _rename(
    state_dict: Mapping[str, torch.Tensor],
    rules: list[_Rule],
    fused: list[_Fused],
    to_ours: bool,
    ignored: re.Pattern[str] | None = None,
) -> tuple[StateDict, list[str]]:
    """Apply ``rules`` in one direction. Returns (renamed tensors, keys dropped as non-weights)."""
    out: StateDict = {}
    dropped: list[str] = []
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if to_ours and ignored is not None and ignored.match(key):
            dropped.append(key)
            continue
        target = _map_key(key, rules, tensor, to_ours, out)
        if target:
            continue
        if _split_or_gather(key, tensor, fused, to_ours, out, pending):
            continue
        side = "foreign" if to_ours else "clipforge"
        raise ConversionError(f"no mapping for {side} key '{key}' (shape {tuple(tensor.shape)})")
    for key, parts in pending.items():
        if len(parts) != 3:
            raise ConversionError(f"fused projection '{key}' is missing {3 - len(parts)} of its q/k/v parts")
        out[key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out, dropped


def _map_key(key: str, rules: list[_Rule], tensor: torch.Tensor, to_ours: bool, out: StateDict) -> bool:
    for rule in rules:
        source, dest = (rule._theirs_re, rule.ours) if to_ours else (rule._ours_re, rule.theirs)  # type: ignore[attr-defined]
        match = source.match(key)
        if match:
            value = tensor.t().contiguous() if rule.transpose else tensor
            out[dest.format(**match.groupdict())] = value
            return True
    return False


def _split_or_gather(
    key: str,
    tensor: torch.Tensor,
    fused: list[_Fused],
    to_ours: bool,
    out: StateDict,
    pending: dict[str, dict[int, torch.Tensor]],
) -> bool:
    for spec in fused:
        if to_ours:
            for part, template in enumerate(spec.theirs):
                match = _compile(template).match(key)
                if match:
                    pending.setdefault(spec.ours.format(**match.groupdict()), {})[part] = tensor
                    return True
        else:
            match = _compile(spec.ours).match(key)
            if match:
                for template, chunk in zip(spec.theirs, tensor.chunk(3, dim=0)):
                    out[template.format(**match.groupdict())] = chunk.contiguous()
                return True
    return False


def _openai_rules(config: ModelConfig) -> list[_Rule]:
    vision = _OPENAI_VIT_RULES if config.vision.arch == "vit" else _OPENAI_RESNET_RULES
    return vision + _OPENAI_TEXT_RULES


def to_openai(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> StateDict:
    """clipforge tensors -> OpenAI / open_clip key layout (``visual.conv1.weight``, ``text_projection``, ...)."""
    out, _ = _rename(state_dict, _openai_rules(config), _OPENAI_FUSED, to_ours=False)
    return out


def from_openai(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> tuple[StateDict, list[str]]:
    """OpenAI / open_clip key layout -> clipforge tensors; also returns the non-weight keys it dropped."""
    return _rename(state_dict, _openai_rules(config), _OPENAI_FUSED, to_ours=True, ignored=_OPENAI_IGNORED)


def to_hf(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> StateDict:
    """clipforge tensors -> Hugging Face ``CLIPModel`` keys (ViT image towers only)."""
    _require_vit(config, "Hugging Face CLIPModel")
    out, _ = _rename(state_dict, _HF_RULES, _HF_FUSED, to_ours=False)
    return out


def from_hf(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> tuple[StateDict, list[str]]:
    """Hugging Face ``CLIPModel`` keys -> clipforge tensors; also returns the non-weight keys it dropped."""
    _require_vit(config, "Hugging Face CLIPModel")
    return _rename(state_dict, _HF_RULES, _HF_FUSED, to_ours=True, ignored=_HF_IGNORED)


def _require_vit(config: ModelConfig, what: str) -> None:
    if config.vision.arch != "vit":
        raise ConversionError(
            f"{what} has no ResNet image tower; '{config.name}' is a ResNet (use openai/open_clip)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Architecture inference


def _require(state_dict: Mapping[str, torch.Tensor], key: str, layout: str) -> torch.Tensor:
    if key not in state_dict:
        raise ConversionError(f"not a CLIP checkpoint in the {layout} layout: missing '{key}'")
    return state_dict[key]


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_openai_config(
    state_dict: Mapping[str, torch.Tensor], activation: str = "quick_gelu", name: str = "openai"
) -> ModelConfig:
    """Rebuild the architecture from OpenAI-layout tensors, as OpenAI's ``build_model`` does.

    Heads are width / 64 for both towers, as in every released CLIP. The activation cannot be read from
    tensors: OpenAI trained with QuickGELU; pass ``activation="gelu"`` for open_clip models trained with GELU.
    """
    layout = "OpenAI/open_clip"
    text_proj = _require(state_dict, "text_projection", layout)
    token_embed = _require(state_dict, "token_embedding.weight", layout)
    pos = _require(state_dict, "positional_embedding", layout)
    text_width = _require(state_dict, "ln_final.weight", layout).shape[0]
    text_mlp = _require(state_dict, "transformer.resblocks.0.mlp.c_fc.weight", layout).shape[0]
    text = TextConfig(
        context_length=pos.shape[0],
        vocab_size=token_embed.shape[0],
        width=text_width,
        heads=max(1, text_width // 64),
        layers=_count_blocks(state_dict, "transformer.resblocks."),
        mlp_ratio=text_mlp / text_width,
    )
    if "visual.proj" in state_dict:
        conv = _require(state_dict, "visual.conv1.weight", layout)
        width, patch = conv.shape[0], conv.shape[-1]
        grid = math.isqrt(_require(state_dict, "visual.positional_embedding", layout).shape[0] - 1)
        mlp = _require(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight", layout).shape[0]
        vision = VisionConfig(
            arch="vit",
            image_size=grid * patch,
            layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
            width=width,
            patch_size=patch,
            head_width=64,
            mlp_ratio=mlp / width,
        )
    elif "visual.attnpool.positional_embedding" in state_dict:
        layers = tuple(_count_blocks(state_dict, f"visual.layer{s}.") for s in (1, 2, 3, 4))
        grid = math.isqrt(state_dict["visual.attnpool.positional_embedding"].shape[0] - 1)
        vision = VisionConfig(
            arch="resnet",
            image_size=grid * 32,
            layers=layers,
            width=_require(state_dict, "visual.layer1.0.conv1.weight", layout).shape[0],
            patch_size=None,
            head_width=64,
        )
    else:
        raise ConversionError(
            f"not a CLIP checkpoint in the {layout} layout: no 'visual.proj' (ViT) or "
            "'visual.attnpool.positional_embedding' (ResNet)"
        )
    bias = state_dict.get("logit_bias")
    return ModelConfig(
        name=name,
        embed_dim=text_proj.shape[1],
        vision=vision,
        text=text,
        activation=activation,
        init_logit_bias=None if bias is None else float(bias),
    )


_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def config_from_hf(hf_config: Mapping[str, Any], name: str = "hf") -> ModelConfig:
    """clipforge config from a Hugging Face ``CLIPConfig`` (its ``config.json`` as a dict)."""
    try:
        vc, tc = hf_config["vision_config"], hf_config["text_config"]
    except KeyError as exc:
        raise ConversionError(
            f"Hugging Face config.json has no {exc.args[0]}; is this a CLIPModel config?"
        ) from exc
    activations = {vc.get("hidden_act", "quick_gelu"), tc.get("hidden_act", "quick_gelu")}
    if len(activations) != 1 or next(iter(activations)) not in _HF_ACTIVATIONS:
        raise ConversionError(
            f"Hugging Face config uses activations {sorted(activations)}; clipforge supports one of "
            f"{sorted(_HF_ACTIVATIONS)} shared by both towers"
        )
    for side, cfg in (("vision_config", vc), ("text_config", tc)):
        eps = cfg.get("layer_norm_eps", 1e-5)
        if abs(eps - 1e-5) > 1e-12:
            raise ConversionError(
                f"Hugging Face {side}.layer_norm_eps={eps} is not supported (clipforge uses 1e-5)"
            )
    v_width, t_width = vc["hidden_size"], tc["hidden_size"]
    data: dict[str, Any] = {
        "name": name,
        "embed_dim": hf_config.get("projection_dim", 512),
        "activation": _HF_ACTIVATIONS[next(iter(activations))],
        "init_logit_scale": hf_config.get("logit_scale_init_value", math.log(1 / 0.07)),
        "vision": {
            "arch": "vit",
            "image_size": vc["image_size"],
            "layers": vc["num_hidden_layers"],
            "width": v_width,
            "patch_size": vc["patch_size"],
            "head_width": v_width // vc["num_attention_heads"],
            "mlp_ratio": vc["intermediate_size"] / v_width,
        },
        "text": {
            "context_length": tc["max_position_embeddings"],
            "vocab_size": tc["vocab_size"],
            "width": t_width,
            "heads": tc["num_attention_heads"],
            "layers": tc["num_hidden_layers"],
            "mlp_ratio": tc["intermediate_size"] / t_width,
        },
    }
    return config_from_dict(data, where="Hugging Face config.json")


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face ``CLIPConfig`` dict (``config.json``) describing ``config``'s architecture."""
    _require_vit(config, "Hugging Face CLIPModel")
    v, t = config.vision, config.text
    act = config.activation
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio),
            "projection_dim": config.embed_dim,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "bos_token_id": t.vocab_size - 2,
            "eos_token_id": t.vocab_size - 1,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": int(v.width * v.mlp_ratio),
            "projection_dim": config.embed_dim,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "num_channels": 3,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
    }
