"""Frozen features for evaluation: images and texts encoded in streamed batches into L2-normalised float32 arrays,
and a disk cache of image features keyed by what determines them (weights, data, preprocessing, precision).

Works with any CLIP-like model: ``encode_image(images [B, 3, S, S]) -> [B, D]`` and ``encode_text(tokens [B, L])
-> [B, D]``; a clipforge model also supplies its own transform and config.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipforge.eval.dataset import EvalDataset
from clipforge.features import (
    encode_image_batches,
    encode_texts,
    eval_mode,
    feature_identity,
    model_fingerprint,
    progress_bar,
    run_device,
)
from clipforge.files import atomic_path

log = logging.getLogger("clipforge.eval")

# eval_mode, encode_texts and model_fingerprint live in the encode layer (clipforge.features); kept importable here.
__all__ = ["EncodedImages", "FeatureCache", "encode_images", "encode_texts", "eval_mode", "model_fingerprint"]


# ----------------------------------------------------------------------------------------------------------------
# Encoding


@dataclass
class EncodedImages:
    """Image features in stored order, with labels, keys, captions and what was skipped (by reason)."""

    features: np.ndarray  # [N, D] float32, L2-normalised
    labels: np.ndarray  # [N] int64, -1 where the sample has no label
    keys: list[str]
    captions: list[tuple[str, ...]]
    skipped: dict[str, int] = field(default_factory=dict)
    from_cache: bool = False
    seconds: float = 0.0  # encoding time (0 for a cache hit)

    def __len__(self) -> int:
        return len(self.keys)


def encode_images(
    model: nn.Module,
    dataset: EvalDataset,
    *,
    transform: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    cache: FeatureCache | None = None,
    fingerprint: str | None = None,
    progress: bool = True,
) -> EncodedImages:
    """Encode every usable image of ``dataset``: features float32 [N, D], L2-normalised, in stored order.

    ``transform`` defaults to the model's eval transform (``clipforge.get_transforms(model)``; other models must
    pass theirs). ``device``: where to run (the model is moved there); None: the model's device. With
    ``cache``, the result is looked up and stored under a key of (``fingerprint`` or
    :func:`model_fingerprint` of the model, the dataset's fingerprint, the transform, the precision).
    """
    if transform is None:
        from clipforge.transforms import get_transforms

        transform = get_transforms(model)
    where = run_device(model, device)
    key = None
    if cache is not None:
        key = cache.key(
            kind="images",
            model=fingerprint or model_fingerprint(model),
            dataset=dataset.fingerprint(),
            transform=repr(transform),
            precision=precision,
        )
        hit = _load_encoded_images(cache, key, dataset.name)
        if hit is not None:
            return hit
    result = _encode_image_batches(
        model, dataset, transform, batch_size, num_workers, where, precision, progress
    )
    if cache is not None and key is not None:
        _save_encoded_images(cache, key, result)
    return result


def _encode_image_batches(
    model: nn.Module,
    dataset: EvalDataset,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    num_workers: int,
    where: torch.device,
    precision: str,
    progress: bool,
) -> EncodedImages:
    """The encoding loop of :func:`encode_images`: batches in any order, results put back in stored order."""
    started = time.perf_counter()
    chunks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    orders: list[np.ndarray] = []
    keys: list[str] = []
    captions: list[tuple[str, ...]] = []
    skipped: Counter[str] = Counter()
    bar = progress_bar(len(dataset), f"encoding {Path(dataset.name).name}", "img", progress)
    batches = dataset.batches(transform, batch_size, num_workers)
    with bar:
        for batch, features in encode_image_batches(
            model, batches, pixels=lambda b: b.images if b.keys else None, device=where, precision=precision
        ):
            skipped.update(batch.skipped)
            bar.update(len(batch.keys) + sum(batch.skipped.values()))
            if features is None:
                continue
            chunks.append(features.cpu().numpy())
            labels.append(batch.labels.numpy())
            orders.append(batch.order.numpy())
            keys.extend(batch.keys)
            captions.extend(batch.captions)
    if not chunks:
        raise ValueError(
            f"{dataset.name}: no image could be used (skipped: {dict(skipped) or 'none'}); check the data"
        )
    order = np.argsort(np.concatenate(orders), kind="stable")
    result = EncodedImages(
        features=np.ascontiguousarray(np.concatenate(chunks)[order], dtype=np.float32),
        labels=np.concatenate(labels)[order].astype(np.int64),
        keys=[keys[i] for i in order],
        captions=[captions[i] for i in order],
        skipped=dict(sorted(skipped.items())),
        seconds=time.perf_counter() - started,
    )
    if skipped:
        log.warning("%s: skipped %s", dataset.name, ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    return result


def _load_encoded_images(cache: FeatureCache, key: str, dataset_name: str) -> EncodedImages | None:
    hit = cache.load(key)
    if hit is None:
        return None
    log.info("feature cache hit: %s (%d images of %s)", cache.path(key), len(hit["keys"]), dataset_name)
    return EncodedImages(
        features=hit["features"],
        labels=hit["labels"],
        keys=[str(k) for k in hit["keys"]],
        captions=[tuple(c) for c in json.loads(str(hit["captions"]))],
        skipped=json.loads(str(hit["skipped"])),
        from_cache=True,
    )


def _save_encoded_images(cache: FeatureCache, key: str, result: EncodedImages) -> None:
    path = cache.save(
        key,
        features=result.features,
        labels=result.labels,
        keys=np.array(result.keys, dtype=str),
        captions=np.array(json.dumps(result.captions)),
        skipped=np.array(json.dumps(result.skipped)),
    )
    log.info("feature cache: wrote %s", path)


# ----------------------------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/clipforge/features``, by default ``~/.cache/clipforge/features``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipforge" / "features"


class FeatureCache:
    """``.npz`` files under ``directory``, one per key; written atomically, so a crash never leaves half a file.
    An unreadable entry is treated as a miss (and logged), then overwritten."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()

    def key(self, **parts: Any) -> str:
        """The entry's name: :func:`clipforge.features.feature_identity` of the parts."""
        return feature_identity(**parts)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except (OSError, ValueError, KeyError) as exc:
            log.warning("feature cache: %s is unreadable (%s); recomputing", path, exc)
            return None

    def save(self, key: str, **arrays: np.ndarray) -> Path:
        path = self.path(key)
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
        return path
