"""The one place that turns images and texts into features: batches of preprocessed tensors (or image files decoded
in DataLoader workers) and texts tokenised in batches, on the model's device, in eval mode without gradients, at a
precision (autocast), L2-normalised in float32; and the identity under which cached features are stored.

Evaluation (:mod:`clipforge.eval.features`), inference (:mod:`clipforge.inference`), search, the zero-shot
classifier, the zero-shot sets, the demo, the experiments and the CLI call these functions; none has its own loop.
Works with any CLIP-like model: ``encode_image(images [B, 3, S, S]) -> [B, D]``, ``encode_text(tokens [B, L]) ->
[B, D]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clipforge.device import autocast_context, model_device
from clipforge.images import ImageLoadError, load_image

log = logging.getLogger("clipforge.features")

#: What ``clipforge.get_transforms(model)`` returns: PIL image -> float tensor [3, S, S].
ImageTransform = Callable[[Image.Image], torch.Tensor]
Batch = TypeVar("Batch")

_IDENTITY_FORMAT = 1  # bump when what a cached feature holds changes


# ----------------------------------------------------------------------------------------------------------------
# Where and how the model runs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (BatchNorm statistics frozen) without gradients; restores the previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def run_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """``device`` (the model is moved there), or the model's own device when None."""
    if device is None:
        return model_device(model)
    device = torch.device(device)
    if model_device(model) != device:
        model.to(device)
    return device


def _input_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype pixels are cast to: the model's first parameter's, when it is a float type (a half-precision
    model gets half-precision pixels); None (leave them) for a model without parameters."""
    parameter = next(model.parameters(), None)
    return parameter.dtype if parameter is not None and parameter.is_floating_point() else None


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm bar (tqdm is imported lazily), disabled unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def _features(raw: torch.Tensor, normalize: bool) -> torch.Tensor:
    """float32, and L2-normalised when ``normalize`` (in float32, whatever the model's dtype)."""
    return F.normalize(raw.float(), dim=-1) if normalize else raw.float()


# ----------------------------------------------------------------------------------------------------------------
# Images


def encode_image_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    pixels: Callable[[Batch], torch.Tensor | None] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    normalize: bool = True,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[Batch, torch.Tensor | None]]:
    """``(batch, features)`` for each of ``batches``: features float32 [B, D] on the run device (L2-normalised
    when ``normalize``), or None when the batch has no pixels.

    ``pixels(batch)`` gives the batch's preprocessed images [B, 3, S, S] (default: the batch is the tensor; None
    or an empty tensor: nothing to encode). ``encode`` replaces ``model.encode_image`` (e.g. an objective's
    zero-shot scorer: images -> class scores). The model is in eval mode without gradients while the generator
    runs, and back in its previous mode once it is exhausted or closed.
    """
    where = run_device(model, device)
    dtype = _input_dtype(model)
    encode = encode or model.encode_image
    with eval_mode(model):
        for batch in batches:
            images = batch if pixels is None else pixels(batch)
            if images is None or len(images) == 0:
                yield batch, None
                continue
            images = images.to(device=where, dtype=dtype) if dtype is not None else images.to(where)
            with autocast_context(where, precision):
                raw = encode(images)
            yield batch, _features(raw, normalize)


def encode_image_tensor(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    normalize: bool = True,
) -> torch.Tensor:
    """Features float32 [N, D] on the CPU of preprocessed images [N, 3, S, S] held in memory, ``batch_size`` at
    a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    parts = encode_image_batches(
        model, images.split(batch_size), device=device, precision=precision, normalize=normalize
    )
    return torch.cat([features for _, features in parts if features is not None]).cpu()


@dataclass(frozen=True)
class ImageFailure:
    """An image that could not be used: its key (the path), the :class:`ImageLoadError` reason and message."""

    key: str
    reason: str
    message: str


@dataclass(frozen=True)
class ImageBatch:
    """Preprocessed images [B, 3, S, S] with their positions in the input list, and the failures among them."""

    indices: list[int]
    pixels: torch.Tensor | None
    failures: list[tuple[int, ImageFailure]]


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], transform: ImageTransform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | ImageFailure]:
        path = self.paths[index]
        try:
            return index, self.transform(load_image(path))
        except ImageLoadError as exc:
            return index, ImageFailure(str(path), exc.reason, str(exc))


def _collate(items: list[tuple[int, torch.Tensor | ImageFailure]]) -> ImageBatch:
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    failures = [(i, x) for i, x in items if isinstance(x, ImageFailure)]
    pixels = torch.stack([x for _, x in good]) if good else None
    return ImageBatch([i for i, _ in good], pixels, failures)


def iter_image_batches(
    paths: Sequence[Path], transform: ImageTransform, *, batch_size: int = 32, workers: int = 0
) -> Iterator[ImageBatch]:
    """Load and preprocess ``paths`` in order, ``batch_size`` at a time (``workers`` processes decode), so only
    one batch of pixels is held at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be 0 (load in this process) or more, got {workers}")
    loader = DataLoader(
        _ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers, collate_fn=_collate
    )
    yield from loader


@dataclass(frozen=True)
class ImageEmbeddings:
    """Embeddings [N, D] float32 of the images that loaded, their keys (paths), and the images that failed."""

    keys: list[str]
    embeddings: np.ndarray
    failures: list[ImageFailure] = field(default_factory=list)


def encode_image_files(
    model: nn.Module,
    transform: ImageTransform,
    paths: Sequence[Path],
    *,
    normalize: bool = True,
    batch_size: int = 32,
    workers: int = 0,
    precision: str = "fp32",
    progress: bool = True,
) -> ImageEmbeddings:
    """Embeddings of the image files ``paths`` in input order; files that fail to load are in ``failures``."""
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    failures: list[ImageFailure] = []
    batches = iter_image_batches(paths, transform, batch_size=batch_size, workers=workers)
    with progress_bar(len(paths), "embedding images", "img", progress and bool(paths)) as bar:
        for batch, features in encode_image_batches(
            model, batches, pixels=lambda b: b.pixels, precision=precision, normalize=normalize
        ):
            failures += [failure for _, failure in batch.failures]
            if features is not None:
                chunks.append(features.cpu().numpy())
                keys += [str(paths[i]) for i in batch.indices]
            bar.update(len(batch.indices) + len(batch.failures))
    for failure in failures:
        log.debug("skipped %s (%s)", failure.key, failure.reason)
    if chunks:
        embeddings = np.concatenate(chunks)
    else:
        embeddings = np.zeros((0, model.config.embed_dim), np.float32)
    return ImageEmbeddings(keys, embeddings.astype(np.float32, copy=False), failures)


# ----------------------------------------------------------------------------------------------------------------
# Texts


def encode_text_batches(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    normalize: bool = True,
) -> Iterator[torch.Tensor]:
    """Features float32 [b, D] on the run device of ``texts``, ``batch_size`` at a time, in order (tokenised per
    batch; eval mode without gradients while the generator runs)."""
    if len(texts) == 0:
        raise ValueError("no texts to encode")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    where = run_device(model, device)
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start : start + batch_size])).to(where)
            with autocast_context(where, precision):
                raw = model.encode_text(tokens)
            yield _features(raw, normalize)


def encode_texts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    normalize: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Features float32 [M, D] of ``texts`` in the order given (L2-normalised when ``normalize``)."""
    chunks = []
    with progress_bar(len(texts), "encoding texts", "text", progress) as bar:
        for features in encode_text_batches(
            model, tokenizer, texts, batch_size=batch_size, device=device, precision=precision,
            normalize=normalize,
        ):  # fmt: skip
            chunks.append(features.cpu().numpy())
            bar.update(len(features))
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Identity of cached features


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config (when it has one) and every state-dict tensor (name, dtype, shape, bytes).

    The same weights give the same fingerprint whichever file format they were loaded from; weights changed in
    memory (a training run) give a new one. A model with a ``fingerprint()`` method (``OnnxCLIP``) gives that.
    """
    own = getattr(model, "fingerprint", None)
    if callable(own):  # a model that is not a torch module knows its own identity (an ONNX export)
        return str(own())
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config.to_json() if hasattr(config, "to_json") else type(model).__name__).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_identity(**parts: Any) -> str:
    """sha256 (hex) of what determines cached features: by convention ``model`` (:func:`model_fingerprint`),
    ``transform`` (its repr: the preprocessing), ``precision``, and what names the inputs (a dataset's
    fingerprint of file stamps; for per-file rows, the stamps are kept beside each row). Both feature caches
    (:class:`clipforge.eval.features.FeatureCache` and :func:`clipforge.search.embed_images_cached`) store
    features under this identity."""
    text = json.dumps({"format": _IDENTITY_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = [
    "ImageBatch",
    "ImageEmbeddings",
    "ImageFailure",
    "encode_image_batches",
    "encode_image_files",
    "encode_image_tensor",
    "encode_text_batches",
    "encode_texts",
    "eval_mode",
    "feature_identity",
    "iter_image_batches",
    "model_fingerprint",
    "progress_bar",
    "run_device",
]
