"""Model configuration as small frozen dataclasses, plus loading, merging and dotted overrides.

A named architecture is a JSON file in ``clipforge/configs``; a resolved :class:`ModelConfig` travels inside every
checkpoint, so the architecture, activation, preprocessing and tokenizer settings can always be rebuilt from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from clipforge.errors import ConfigError  # re-exported: the tower table, below this module, raises it too
from clipforge.tower_specs import tower_spec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. ``arch='vit'``: ``layers`` is an int. ``arch='resnet'``: ``layers`` is 4 stage depths.

    ``tower``: a pretrained tower (:data:`clipforge.tower_specs.TOWERS`, e.g. ``"efficientnet-lite0"``) that
    replaces the from-scratch one; it fixes ``arch``, ``width``, ``layers`` and the image normalisation.
    """

    arch: Literal["vit", "resnet", "efficientnet_lite"] = "vit"
    image_size: int = 224
    layers: int | tuple[int, ...] = 12
    width: int = 768
    patch_size: int | None = 32  # ViT only
    head_width: int = 64  # heads = width // head_width (ViT) or width * 32 // head_width (ResNet attnpool)
    mlp_ratio: float = 4.0
    tower: str | None = None
    # FLIP (Li et al. 2023), ViT only: in training mode keep a random round((1 - p) * N) of the N patch tokens
    # per image (class token always kept); evaluation sees every patch. 0.5 halves the image tokens.
    patch_dropout: float = 0.0
    # EfficientNet tower only: inner blocks (0..15) whose average-pooled outputs join the head's features, each
    # part L2-normalised (see clipforge.model.efficientnet); () keeps the tower's own 1280-d output.
    pool_blocks: tuple[int, ...] = ()

    @property
    def heads(self) -> int:
        channels = self.width * 32 if self.arch == "resnet" else self.width
        return channels // self.head_width


@dataclass(frozen=True)
class TextConfig:
    """Causal text Transformer pooled at the end-of-text token, or with ``tower`` a pretrained text tower (e.g.
    ``"minilm-l6"``), which fixes the width, heads, layers, vocabulary and tokenizer."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    tower: str | None = None


@dataclass(frozen=True)
class PreprocessConfig:
    """Image preprocessing; the crop size is the vision tower's ``image_size``."""

    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"  # shortest: resize short side then center crop
    train_crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range for training
    fill_color: tuple[int, int, int] = (255, 255, 255)  # background for images with transparency
    # Training only, and only where the caption stays true (clipforge.data.captions decides per sample):
    # horizontal flip with this probability unless the caption names a side (left, right, ...);
    # brightness, contrast, saturation jitter (factors uniform in [1 - s, 1 + s]; no hue) unless it names a colour.
    train_hflip: float = 0.0
    train_color_jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class TokenizerConfig:
    """Tokenizer settings; ``context_length`` comes from the text tower. ``wordpiece``: a BERT text tower's."""

    name: Literal["clip-bpe", "wordpiece"] = "clip-bpe"
    on_overflow: Literal["truncate", "error"] = "truncate"  # truncate keeps the end token and is counted


@dataclass(frozen=True)
class ModelConfig:
    """A whole CLIP model: two towers, the joint embedding size and everything needed to feed it."""

    name: str = "custom"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set: CLIP gets a learned logit_bias (SigLIP's sigmoid loss: -10)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert JSON values (lists, ints) to the dataclass field type (tuples, floats), checking literals."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return dataclass_from_dict(hint, value, where)
    if hint is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not fit {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    return value


def dataclass_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from plain data, converting lists to tuples and checking types and literals;
    unknown fields raise :class:`ConfigError` listing the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = _resolve_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], where: str = "config") -> ModelConfig:
    """Build and validate a :class:`ModelConfig` from plain data (JSON/YAML)."""
    return validate(dataclass_from_dict(ModelConfig, data, where))


def merge(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """Return ``config`` with ``overrides`` applied.

    Keys may be nested mappings (``{"vision": {"layers": 2}}``) or dotted paths (``{"vision.layers": 2}``).
    """
    data = apply_overrides(config.to_dict(), overrides)
    return config_from_dict(data, where=f"config '{config.name}'")


def apply_overrides(
    data: dict[str, Any], overrides: dict[str, Any], open_keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Apply nested or dotted-key ``overrides`` to plain ``data`` (in place; also returned). Unknown keys raise.

    ``open_keys`` name free-form mapping fields: ``"model_overrides.vision.layers"`` sets the key
    ``"vision.layers"`` inside ``data["model_overrides"]`` instead of descending into it.
    """
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head in open_keys:
            target = data.setdefault(head, {})
            if rest:
                target[rest] = value
            elif isinstance(value, dict):
                target.update(value)
            else:
                raise ConfigError(f"override '{key}': expected a mapping, got {value!r}")
            continue
        _set_path(data, key.split("."), value, key)
    return data


def _set_path(data: dict[str, Any], path: list[str], value: Any, full_key: str) -> None:
    head, rest = path[0], path[1:]
    if head not in data:
        raise ConfigError(f"override '{full_key}': unknown field '{head}'; valid fields are {sorted(data)}")
    if rest:
        if not isinstance(data[head], dict):
            raise ConfigError(f"override '{full_key}': '{head}' is not a group of fields")
        _set_path(data[head], rest, value, full_key)
    elif isinstance(value, dict) and isinstance(data[head], dict):
        for k, v in value.items():
            _set_path(data[head], [k], v, f"{full_key}.{k}")
    else:
        data[head] = value


def validate(config: ModelConfig) -> ModelConfig:
    """Check the cross-field constraints a dataclass cannot express; raise :class:`ConfigError` naming the field.

    A config naming a pretrained tower gets the fields that tower fixes (see :func:`apply_towers`).
    """
    config = apply_towers(config)
    v, t = config.vision, config.text
    name = config.name
    positive = {
        "embed_dim": config.embed_dim,
        "vision.image_size": v.image_size,
        "vision.width": v.width,
        "vision.head_width": v.head_width,
        "text.context_length": t.context_length,
        "text.vocab_size": t.vocab_size,
        "text.width": t.width,
        "text.heads": t.heads,
        "text.layers": t.layers,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config '{name}': {key} must be positive, got {value}")
    if v.pool_blocks and v.arch != "efficientnet_lite":
        raise ConfigError(
            f"config '{name}': vision.pool_blocks {list(v.pool_blocks)} applies to an EfficientNet tower only "
            f"(vision.arch is {v.arch!r}); remove it"
        )
    if v.arch == "efficientnet_lite":
        if v.tower is None:
            raise ConfigError(
                f"config '{name}': vision.arch 'efficientnet_lite' exists as a pretrained tower only; set "
                "vision.tower (e.g. 'efficientnet-lite0')"
            )
    elif v.arch == "vit":
        if not isinstance(v.layers, int) or v.layers <= 0:
            raise ConfigError(
                f"config '{name}': vision.layers must be a positive int for a ViT, got {v.layers!r}"
            )
        if not v.patch_size or v.patch_size <= 0:
            raise ConfigError(f"config '{name}': vision.patch_size must be set for a ViT")
        if v.image_size % v.patch_size:
            raise ConfigError(
                f"config '{name}': vision.image_size {v.image_size} is not a multiple of "
                f"vision.patch_size {v.patch_size}"
            )
        if v.width % v.head_width:
            raise ConfigError(
                f"config '{name}': vision.width {v.width} is not a multiple of vision.head_width {v.head_width}"
            )
    else:
        if not isinstance(v.layers, tuple) or len(v.layers) != 4 or min(v.layers) <= 0:
            raise ConfigError(
                f"config '{name}': vision.layers must be 4 positive stage depths for a ResNet, got {v.layers!r}"
            )
        if v.image_size % 32:
            raise ConfigError(
                f"config '{name}': a ResNet needs vision.image_size divisible by 32, got {v.image_size}"
            )
        if (v.width * 32) % v.head_width:
            raise ConfigError(f"config '{name}': vision.width*32 must be a multiple of vision.head_width")
    if t.width % t.heads:
        raise ConfigError(f"config '{name}': text.width {t.width} is not a multiple of text.heads {t.heads}")
    if t.context_length < 2:
        raise ConfigError(f"config '{name}': text.context_length must leave room for start and end tokens")
    if (config.tokenizer.name == "wordpiece") != (t.tower is not None):
        raise ConfigError(
            f"config '{name}': tokenizer.name 'wordpiece' goes with a pretrained text.tower only"
        )
    _validate_augmentation(config)
    return config


def apply_towers(config: ModelConfig) -> ModelConfig:
    """``config`` with the fields its pretrained towers fix (architecture shape, normalisation, tokenizer)
    written in, so the resolved config describes the model truthfully; unknown tower names raise."""
    data = None
    for modality, section in (("image", "vision"), ("text", "text")):
        name = getattr(config, section).tower
        if name is None:
            continue
        spec = tower_spec(name)
        if spec.modality != modality:
            raise ConfigError(f"config '{config.name}': {section}.tower '{name}' is a {spec.modality} tower")
        if section == "text" and not 2 <= config.text.context_length <= spec.max_length:
            raise ConfigError(
                f"config '{config.name}': text.context_length {config.text.context_length} must be in "
                f"2..{spec.max_length}, the positions tower '{name}' has"
            )
        data = data if data is not None else config.to_dict()
        for group, values in spec.config.items():
            data[group].update(values)
    return config if data is None else dataclass_from_dict(ModelConfig, data, f"config '{config.name}'")


def _validate_augmentation(config: ModelConfig) -> None:
    """Training-time augmentation fields (patch dropout, flip, colour jitter)."""
    name, v, p = config.name, config.vision, config.preprocess
    if not 0.0 <= v.patch_dropout < 1.0:
        raise ConfigError(
            f"config '{name}': vision.patch_dropout is the share of patches dropped, in [0, 1); got {v.patch_dropout}"
        )
    if v.patch_dropout and v.arch != "vit":
        raise ConfigError(
            f"config '{name}': vision.patch_dropout needs a ViT (patches); set it to 0 for a ResNet"
        )
    if not 0.0 <= p.train_hflip <= 1.0:
        raise ConfigError(
            f"config '{name}': preprocess.train_hflip is a probability in [0, 1] (0.5 to use), got {p.train_hflip}"
        )
    if min(p.train_color_jitter) < 0:
        raise ConfigError(
            f"config '{name}': preprocess.train_color_jitter strengths (brightness, contrast, saturation) must be "
            f">= 0 (e.g. [0.2, 0.2, 0.2]), got {list(p.train_color_jitter)}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Named architectures (data files)

CONFIG_DIR = Path(__file__).parent / "configs"


def list_models() -> list[str]:
    """Names of the architectures shipped as data files, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> ModelConfig:
    """The named architecture's config, or a config read from a JSON/YAML file path."""
    path = Path(name)
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        return load_config_file(path)
    file = CONFIG_DIR / f"{name}.json"
    if not file.is_file():
        import difflib

        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(f"unknown model '{name}'.{hint} Known models: {', '.join(list_models())}")
    data = json.loads(file.read_text())
    data.setdefault("name", name)
    return config_from_dict(data, where=str(file))


def load_config_file(path: str | Path) -> ModelConfig:
    """Read a model config from a JSON or YAML file."""
    path = Path(path)
    data = read_mapping_file(path)
    data.setdefault("name", path.stem)
    return config_from_dict(data, where=str(path))


def read_mapping_file(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a JSON or YAML file; :class:`ConfigError` naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data
