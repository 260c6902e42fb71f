"""Pretrained towers (LiT, Zhai et al. 2022): named image and text encoders whose weights come from pinned Python
packages, each followed by a trainable linear projection into CLIP's joint space; plus locking (which parts of a
tower train) for pretrained and from-scratch towers alike.

A model config names a tower (``text.tower: "minilm-l6"``, ``vision.tower: "efficientnet-lite0"``); building the
model reads the tower's weights from its installed package (never from the network) and checks the file's
sha256 against the one pinned in the tower table (:mod:`clipforge.tower_specs`, re-exported here). A missing
package is a :class:`TowerUnavailableError` with the pip line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from clipforge.errors import TowerUnavailableError
from clipforge.model.bert import BertConfig, BertEncoder
from clipforge.model.efficientnet import EfficientNetLite
from clipforge.model.tower_weights import bert_state_dict, efficientnet_state_dict
from clipforge.tower_specs import TOWERS, TowerSpec, tower_spec  # noqa: F401 (TOWERS is re-exported)

_BERT_CONFIG_KEYS = {"vocab_size": "vocab_size", "hidden_size": "width", "num_hidden_layers": "layers",
                     "num_attention_heads": "heads", "intermediate_size": "mlp_width",
                     "max_position_embeddings": "max_positions", "type_vocab_size": "segments",
                     "layer_norm_eps": "norm_eps", "hidden_dropout_prob": "dropout",
                     "attention_probs_dropout_prob": "attention_dropout", "pad_token_id": "pad_token_id"}  # fmt: skip


def locate_package(module: str) -> Path | None:
    """The folder of an installed package, found without importing it; None when it is not installed."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def installed_version(spec: TowerSpec) -> str | None:
    try:
        return importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_folder(spec: TowerSpec) -> Path:
    """Where the tower's package is installed; :class:`TowerUnavailableError` with the pip line otherwise."""
    folder = locate_package(spec.module)
    if folder is None or not (folder / spec.weights).is_file():
        what = "is not installed" if folder is None else f"has no {spec.weights} (a broken install)"
        _unavailable(
            f"the pretrained {spec.modality} tower '{spec.name}' needs the Python package {spec.package} "
            f"{spec.version}, which {what}: {spec.pip}"
        )
    return folder


def tower_files(spec: TowerSpec) -> Path:
    """The folder with the tower's own config and tokenizer files."""
    return package_folder(spec) / spec.files


def _unavailable(message: str) -> None:
    raise TowerUnavailableError(message)


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(spec: TowerSpec) -> str:
    """sha256 of the installed weight file, checked against the pinned one."""
    path = package_folder(spec) / spec.weights
    found = file_sha256(path)
    if found != spec.sha256:
        _unavailable(
            f"{path}: the weights of tower '{spec.name}' have sha256 {found}, not the {spec.sha256} of "
            f"{spec.package} {spec.version} that clipforge pins (installed: {installed_version(spec)}); {spec.pip}"
        )
    return found


def tower_state_dict(spec: TowerSpec) -> dict[str, torch.Tensor]:
    """The tower's pretrained encoder weights in clipforge's names (read once per process; do not modify)."""
    path = package_folder(spec) / spec.weights
    weights_sha256(spec)
    stat = path.stat()
    return _read_state(spec.name, str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _read_state(name: str, path: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    if name == "minilm-l6":
        from safetensors.torch import load_file

        return bert_state_dict(load_file(path))
    if name == "efficientnet-lite0":
        return efficientnet_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    raise AssertionError(name)


def bert_config(spec: TowerSpec) -> BertConfig:
    """The encoder shape from the package's ``config.json`` (and whether ``modules.json`` normalises)."""
    folder = tower_files(spec)
    data = json.loads((folder / "config.json").read_text())
    if (
        data.get("hidden_act", "gelu") != "gelu"
        or data.get("position_embedding_type", "absolute") != "absolute"
    ):
        raise ValueError(f"{folder / 'config.json'}: only BERT with GELU and absolute positions is supported")
    values = {ours: data[theirs] for theirs, ours in _BERT_CONFIG_KEYS.items() if theirs in data}
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    pooling_file = folder / "1_Pooling" / "config.json"
    pooling = (
        json.loads(pooling_file.read_text()) if pooling_file.is_file() else {"pooling_mode_mean_tokens": True}
    )
    if not pooling.get("pooling_mode_mean_tokens") or any(
        pooling.get(mode) for mode in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                       "pooling_mode_mean_sqrt_len_tokens")
    ):  # fmt: skip
        raise ValueError(f"{pooling_file}: only mean pooling is supported")
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    return BertConfig(**values, normalize=normalize)


# ----------------------------------------------------------------------------------------------------------------
# The tower module


class PretrainedTower(nn.Module):
    """A pretrained encoder and a trainable projection: inputs -> ``proj(encoder(inputs))`` [B, embed_dim].

    While every encoder parameter is locked (``requires_grad`` False) the encoder runs without autograd, and
    through ``feature_cache`` when one is set and the encoder is in eval mode: a callable
    ``(inputs, encoder) -> features`` such as :class:`clipforge.train.feature_cache.FeatureCache`.
    """

    def __init__(self, spec: TowerSpec, encoder: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        width = getattr(encoder, "width", spec.width)  # an EfficientNet pooling inner blocks is wider
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        self.feature_cache: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None

    @property
    def grad_checkpointing(self) -> bool:
        return self.encoder.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enabled: bool) -> None:
        self.encoder.grad_checkpointing = enabled

    @property
    def encoder_locked(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The encoder's output [B, W], before the projection (W = ``spec.width``, or wider with pool_blocks)."""
        if not self.encoder_locked:
            return self.encoder(inputs)
        with torch.no_grad():
            if self.feature_cache is not None and not self.encoder.training:
                return self.feature_cache(inputs, self.encoder)
            return self.encoder(inputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Cached features may come from an autocast pass; under autocast the projection casts them again.
        return self.proj(self.features(inputs).to(self.proj.weight.dtype))

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The package's weights for this tower, keyed as in ``self.state_dict()`` (``encoder.*``)."""
        return {f"encoder.{key}": value for key, value in tower_state_dict(self.spec).items()}

    def resize_image(self, image_size: int) -> None:
        """Convolutional towers take any size; nothing to resample."""

    def resize_context(self, context_length: int) -> None:
        limit = self.spec.max_length
        if context_length > limit:
            raise ValueError(
                f"tower '{self.spec.name}' has {limit} positions; context_length {context_length} is too long"
            )


def build_tower(name: str, embed_dim: int, pool_blocks: tuple[int, ...] = ()) -> PretrainedTower:
    """The named tower with its package's weights loaded (on the current default device, unless meta)."""
    spec = tower_spec(name)
    encoder: nn.Module = (
        BertEncoder(bert_config(spec))
        if spec.modality == "text"
        else EfficientNetLite(pool_blocks=pool_blocks)
    )
    tower = PretrainedTower(spec, encoder, embed_dim)
    if not any(p.is_meta for p in encoder.parameters()):  # `clipforge info` builds on the meta device
        missing, unexpected = encoder.load_state_dict(tower_state_dict(spec), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"tower '{name}': weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return tower


# ----------------------------------------------------------------------------------------------------------------
# Locking


def tower_units(tower: nn.Module) -> tuple[list[list[nn.Parameter]], list[nn.Parameter]]:
    """A tower's parameters as (layers from input to output, the projection into the joint space).

    Pretrained towers: the encoder's units (BERT: embeddings, 6 layers; EfficientNet: stem, 16 blocks, head)
    and ``proj``. ViT / text transformer: embeddings, blocks (the last with the final LayerNorm), and ``proj``.
    ModifiedResNet: stem and 4 stages, and the attention pool (whose output projection is the projection).
    """
    from clipforge.model.resnet import ModifiedResNet
    from clipforge.model.text import TextTransformer
    from clipforge.model.vision import VisionTransformer

    def params(*modules: nn.Module | nn.Parameter) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for item in modules:
            out += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        return out

    if isinstance(tower, PretrainedTower):
        return [params(unit) for unit in tower.encoder.units()], params(tower.proj)
    if isinstance(tower, VisionTransformer):
        blocks = [params(block) for block in tower.transformer.blocks]
        blocks[-1] += params(tower.norm_post)
        stem = params(tower.patch_embed, tower.class_token, tower.pos_embed, tower.norm_pre)
        return [stem, *blocks], params(tower.proj)
    if isinstance(tower, TextTransformer):
        blocks = [params(block) for block in tower.transformer.blocks]
        blocks[-1] += params(tower.norm_final)
        return [params(tower.token_embed, tower.pos_embed), *blocks], params(tower.proj)
    if isinstance(tower, ModifiedResNet):
        return [params(tower.stem), *(params(stage) for stage in tower.stages)], params(tower.attnpool)
    raise TypeError(f"cannot lock a {type(tower).__name__}")


def lock_tower(tower: nn.Module, unlocked_layers: int = 0) -> list[nn.Module]:
    """Freeze ``tower`` except its projection and its top ``unlocked_layers`` layers; returns the modules that
    must stay in eval mode (no dropout, BatchNorm statistics frozen) whatever ``model.train()`` says."""
    units, head = tower_units(tower)
    if not 0 <= unlocked_layers <= len(units):
        raise ValueError(
            f"unlocked_layers must be in [0, {len(units)}] for this tower, got {unlocked_layers}"
        )
    tower.requires_grad_(False)
    for param in [*head, *(p for unit in units[len(units) - unlocked_layers :] for p in unit)]:
        param.requires_grad_(True)
    return frozen_modules(tower)


def frozen_modules(root: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``root`` all of whose parameters (at least one) are frozen."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(root)
    return found
