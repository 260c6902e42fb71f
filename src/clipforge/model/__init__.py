"""The CLIP model family and its registry entry point."""

from __future__ import annotations

from typing import Any

import torch

from clipforge.config import ModelConfig, get_model_config, merge
from clipforge.model.clip import CLIP, CLIPOutput


def create_model(
    name_or_config: str | ModelConfig,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> CLIP:
    """Build a randomly initialised CLIP from a registered name, a config file path or a :class:`ModelConfig`.

    ``overrides`` change config fields: top-level ones by name (``activation="gelu"``), nested ones as mappings
    (``vision={"layers": 2}``) or through ``merge`` with dotted keys. Weights come from
    :func:`clipforge.load_checkpoint`, never from here, with one exception: a pretrained tower the config names
    (``vision.tower`` / ``text.tower``, see :mod:`clipforge.model.towers`) is built with its package's weights.
    """
    config = name_or_config if isinstance(name_or_config, ModelConfig) else get_model_config(name_or_config)
    if overrides:
        config = merge(config, overrides)
    model = CLIP(config)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


__all__ = ["CLIP", "CLIPOutput", "create_model"]
