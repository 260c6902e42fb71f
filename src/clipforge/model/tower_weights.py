"""Key maps from the pretrained towers' weight files to clipforge's module names (foreign names stay here, so they
never shape the module tree): a Hugging Face BERT safetensors file, and an EfficientNet-PyTorch state dict."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Entries of the files that no clipforge module holds, and why.
BERT_UNUSED = (
    "embeddings.position_ids",
    "pooler.",
)  # a constant buffer; the [CLS] pooler sentence-transformers skips
EFFICIENTNET_UNUSED = ("_fc.",)  # the ImageNet classifier: the tower ends at the pooled features

_BERT_NAMES = {
    "embeddings.word_embeddings.weight": "embeddings.token_embed.weight",
    "embeddings.position_embeddings.weight": "embeddings.pos_embed",
    "embeddings.token_type_embeddings.weight": "embeddings.segment_embed",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
}
_BERT_LAYER = {
    "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
_EFFICIENTNET_BLOCK = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
                       "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}  # fmt: skip
_EFFICIENTNET_TOP = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "head.conv",
    "_bn1": "head.bn",
}


class TowerWeightsError(ValueError):
    """A tower's weight file does not hold the tensors its architecture needs."""


def bert_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``BertModel`` names -> :class:`clipforge.model.bert.BertEncoder` names (q, k, v fused)."""
    out: dict[str, torch.Tensor] = {}
    layer = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)\Z")
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(BERT_UNUSED):
            continue
        if key in _BERT_NAMES:
            out[_BERT_NAMES[key]] = tensor
            continue
        match = layer.match(key)
        if match is None:
            raise TowerWeightsError(f"unexpected BERT weight '{key}'")
        index, part, kind = match.groups()
        if part.startswith("attention.self."):
            qkv.setdefault((index, kind), {})[part.rsplit(".", 1)[1]] = tensor
        elif part in _BERT_LAYER:
            out[f"layers.{index}.{_BERT_LAYER[part]}.{kind}"] = tensor
        else:
            raise TowerWeightsError(f"unexpected BERT weight '{key}'")
    for (index, kind), parts in qkv.items():
        if sorted(parts) != ["key", "query", "value"]:
            raise TowerWeightsError(
                f"layer {index}: attention {kind} needs query, key and value, got {sorted(parts)}"
            )
        out[f"layers.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def efficientnet_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch names (``_blocks.3._bn1.weight``) -> :class:`EfficientNetLite` names."""
    out: dict[str, torch.Tensor] = {}
    block = re.compile(r"_blocks\.(\d+)\.(_\w+?)\.(.+)\Z")
    for key, tensor in tensors.items():
        if key.startswith(EFFICIENTNET_UNUSED):
            continue
        match = block.match(key)
        if match is not None:
            index, part, rest = match.groups()
            if part not in _EFFICIENTNET_BLOCK:
                raise TowerWeightsError(f"unexpected EfficientNet weight '{key}'")
            out[f"blocks.{index}.{_EFFICIENTNET_BLOCK[part]}.{rest}"] = tensor
            continue
        part, _, rest = key.partition(".")
        if part not in _EFFICIENTNET_TOP:
            raise TowerWeightsError(f"unexpected EfficientNet weight '{key}'")
        out[f"{_EFFICIENTNET_TOP[part]}.{rest}"] = tensor
    return out
