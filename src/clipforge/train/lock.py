"""Locking towers for LiT training (``TrainConfig.lock``): freeze them, keep them in eval mode, and cache the
features of fully locked pretrained towers."""

from __future__ import annotations

import logging

from torch import nn

from clipforge.config import ConfigError
from clipforge.model import CLIP
from clipforge.model.towers import PretrainedTower
from clipforge.train.config import LockConfig
from clipforge.train.feature_cache import FeatureCache

log = logging.getLogger("clipforge.train")


def apply_locks(model: nn.Module, config: LockConfig) -> dict[str, FeatureCache]:
    """Lock the towers ``config`` names (see :meth:`CLIP.lock`); returns the feature caches attached, by tower.

    A tower's features are cached when it is a pretrained tower locked whole (no unlocked layers),
    ``cache_mb`` > 0 and, for the image tower, ``cache_images``; the caches share ``cache_mb``.
    """
    wanted = [tower for tower in ("text", "image") if getattr(config, tower)]
    if not wanted:
        return {}
    if not isinstance(model, CLIP):
        raise ConfigError("lock: only the contrastive objective's CLIP model has towers to lock")
    towers = {"text": model.text, "image": model.visual}
    for tower in wanted:
        model.lock(tower, getattr(config, f"{tower}_unlocked_layers"))
    cached = [
        tower
        for tower in wanted
        if isinstance(towers[tower], PretrainedTower)
        and getattr(config, f"{tower}_unlocked_layers") == 0
        and config.cache_mb > 0
        and (tower == "text" or config.cache_images)
    ]
    caches = {}
    for tower in cached:
        caches[tower] = FeatureCache(config.cache_mb * 2**20 // len(cached))
        towers[tower].feature_cache = caches[tower]
    for tower in wanted:
        module = towers[tower]
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        how = (
            "features cached"
            if tower in caches
            else "not cached (" + _why_not_cached(module, tower, config) + ")"
        )
        log.info("lock: %s tower %s: %s parameters frozen, %s train; %s", tower, _name(module), f"{frozen:,}",
                 f"{trainable:,}", how)  # fmt: skip
    return caches


def _name(module: nn.Module) -> str:
    return f"'{module.spec.name}'" if isinstance(module, PretrainedTower) else f"({type(module).__name__})"


def _why_not_cached(module: nn.Module, tower: str, config: LockConfig) -> str:
    if not isinstance(module, PretrainedTower):
        return "a from-scratch tower's projection is inside it"
    if getattr(config, f"{tower}_unlocked_layers"):
        return "its top layers train"
    if config.cache_mb == 0:
        return "lock.cache_mb=0"
    return "lock.cache_images=false"
