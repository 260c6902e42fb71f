"""Image preprocessing: PIL image -> normalised float tensor, configured by the model config.

The evaluation transform reproduces OpenAI CLIP / open_clip (torchvision ``Resize`` + ``CenterCrop`` +
``ToTensor`` + ``Normalize`` on PIL images) bit for bit on RGB images, without depending on torchvision. One
deliberate difference: images are converted to RGB (:func:`clipforge.images.to_rgb`) *before* resizing, where
OpenAI converts after cropping. For palette images that means clipforge resizes real colours with the bicubic
filter, while OpenAI's order makes Pillow resize palette indices with nearest-neighbour; for RGBA images
clipforge composites transparency on ``preprocess.fill_color`` instead of keeping whatever colour transparent
pixels happen to store. RGB (and greyscale) images give identical results either way. The training transform
draws its random crop exactly as torchvision's ``RandomResizedCrop`` does, so it too matches open_clip for the
same torch RNG state.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from clipforge.config import CLIP_MEAN, CLIP_STD, ModelConfig, PreprocessConfig, get_model_config
from clipforge.images import to_rgb

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
TRAIN_ASPECT_RATIO = (3 / 4, 4 / 3)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (pure functions, same arithmetic as torchvision's PIL path)


def image_to_tensor(
    img: Image.Image,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """An RGB PIL image (W x H) -> contiguous float32 tensor [3, H, W], ``(pixel / 255 - mean) / std``.

    Bit-identical to torchvision's ``ToTensor`` + ``Normalize``: a 256-entry table per channel is computed with
    the same float32 operations, then indexed by the pixels. A table lookup in numpy costs well under a
    millisecond at 224 px and, unlike a chain of small torch ops, never waits on torch's thread pool (which can
    cost tens of milliseconds per image on a busy machine).
    """
    if img.mode != "RGB":
        raise ValueError(
            f"image_to_tensor expects an RGB image, got mode {img.mode!r}; convert it with to_rgb"
        )
    table = _normalization_table(tuple(mean), tuple(std))  # [3, 256] float32
    pixels = np.asarray(img)  # [H, W, 3] uint8
    out = torch.empty((3, img.height, img.width), dtype=torch.float32)
    out_np = out.numpy()
    for channel in range(3):
        np.take(table[channel], pixels[:, :, channel], out=out_np[channel], mode="clip")
    return out


@functools.lru_cache(maxsize=16)
def _normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    values = torch.arange(256, dtype=torch.float32).div(255).expand(3, 256)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1)
    table = values.sub(mean_t).div(std_t).numpy()
    table.setflags(write=False)  # shared by every call
    return table


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to ``size``: long side ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize(img: Image.Image, size: tuple[int, int], interpolation: str = "bicubic") -> Image.Image:
    """Resize to ``size`` = (width, height) with Pillow's antialiased filter; same-size input is returned as is."""
    if img.size == tuple(size):
        return img
    return img.resize(tuple(size), _RESAMPLE[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` region; offsets ``round((H - size) / 2)`` (Python's round-half-even).

    An image smaller than the crop is first padded with black, split as evenly as possible (the extra pixel goes
    right/bottom), as torchvision does. Shortest-side resizing never needs it.
    """
    width, height = img.size
    if width < size or height < size:
        padded = Image.new(img.mode, (max(width, size), max(height, size)), 0)
        padded.paste(img, (max(size - width, 0) // 2, max(size - height, 0) // 2))
        img, (width, height) = padded, padded.size
        if (width, height) == (size, size):
            return img
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return _crop(img, left, top, size, size)


def _crop(img: Image.Image, left: int, top: int, width: int, height: int) -> Image.Image:
    box = (left, top, left + width, top + height)
    try:
        return img.crop(box)
    except Image.DecompressionBombError:
        # Image.crop applies Pillow's process-wide bomb guard to the crop size; the image was already admitted by
        # load_image's per-call max_pixels, so crop through numpy instead (same pixels, more memory).
        return Image.fromarray(np.asarray(img)[top : top + height, left : left + width])


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = TRAIN_ASPECT_RATIO,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Sample a crop (left, top, crop_width, crop_height) of area ``scale`` and aspect ``ratio`` (log-uniform).

    The standard RandomResizedCrop algorithm: up to 10 attempts to fit a sampled crop inside the image, then a
    center crop of the whole image clamped to ``ratio``. The random draws (and their order) are torchvision's,
    so for the same torch RNG state the crop is the same as torchvision's.
    """
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, size=(1,), generator=generator).item())
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_w, crop_h = round(height * max(ratio)), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


_JITTER_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def color_jitter(
    img: Image.Image, strengths: tuple[float, float, float], generator: torch.Generator | None = None
) -> Image.Image:
    """Brightness, then contrast, then saturation, each by a factor uniform in [max(0, 1 - s), 1 + s] (skipped
    where s = 0): the PIL operations torchvision's ``ColorJitter`` uses, in a fixed order and without hue."""
    for enhancer, strength in zip(_JITTER_ENHANCERS, strengths):
        if strength > 0:
            low, high = max(0.0, 1.0 - strength), 1.0 + strength
            factor = torch.empty(1).uniform_(low, high, generator=generator).item()
            img = enhancer(img).enhance(factor)
    return img


# ----------------------------------------------------------------------------------------------------------------
# Transforms


class _Transform:
    """Shared state: the output size and the resolved preprocess config (both for logging)."""

    def __init__(self, image_size: int, preprocess: PreprocessConfig) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if preprocess.interpolation not in _RESAMPLE:
            raise ValueError(
                f"preprocess.interpolation {preprocess.interpolation!r} is not one of {sorted(_RESAMPLE)}"
            )
        self.image_size = image_size
        self.preprocess = preprocess

    def _prepare(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(
                f"{type(self).__name__} expects a PIL image, got {type(img).__name__}; "
                "load files with clipforge.images.load_image"
            )
        return to_rgb(img, self.preprocess.fill_color)

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        return image_to_tensor(img, self.preprocess.mean, self.preprocess.std)

    def _repr_fields(self) -> dict[str, Any]:
        p = self.preprocess
        return {
            "image_size": self.image_size,
            "interpolation": p.interpolation,
            "mean": p.mean,
            "std": p.std,
            "fill_color": p.fill_color,
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"


class EvalTransform(_Transform):
    """Deterministic preprocessing: PIL image -> float32 tensor [3, S, S], S = ``image_size``.

    RGB conversion, then ``resize_mode='shortest'``: resize the short side to S and center-crop S x S (OpenAI
    CLIP's preprocessing), or ``'squash'``: resize straight to S x S, ignoring the aspect ratio.
    """

    def __call__(
        self,
        img: Image.Image,
        generator: torch.Generator | None = None,
        *,
        allow_flip: bool = True,
        allow_color_jitter: bool = True,
    ) -> torch.Tensor:
        """``generator`` and the augmentation permissions are accepted and unused (nothing is random), so the
        data pipeline can call either transform the same way (a locked, cached image tower trains on this one)."""
        img = self._prepare(img)
        size, interpolation = self.image_size, self.preprocess.interpolation
        if self.preprocess.resize_mode == "squash":
            img = resize(img, (size, size), interpolation)
        else:
            img = center_crop(resize(img, shortest_side_size(*img.size, size), interpolation), size)
        return self._to_tensor(img)

    def _repr_fields(self) -> dict[str, Any]:
        return {"resize_mode": self.preprocess.resize_mode, **super()._repr_fields()}


class TrainTransform(_Transform):
    """Training preprocessing: PIL image -> float32 tensor [3, S, S] through a random resized crop.

    RGB conversion, a crop of area ``preprocess.train_crop_scale`` x the image area and aspect ratio in
    (3/4, 4/3) (see :func:`random_resized_crop_box`), resized to S x S. Randomness comes from ``generator`` if
    given, else from torch's global RNG, so restoring torch's RNG state reproduces the crops and DataLoader
    workers (which seed torch per worker) draw different ones. A generator is copied into every worker process
    with the same state, which would repeat the same crops in every worker, so calling a transform that holds
    one from another process raises: pass ``generator=None`` for multi-worker loading.

    For the same torch RNG state the output equals open_clip's training transform (``RandomResizedCrop``) on RGB
    images. The resize uses ``preprocess.interpolation`` (open_clip always uses bicubic here; the default is
    bicubic, so they differ only for a ``'bilinear'`` config).

    Optional, off by default: a horizontal flip with probability ``preprocess.train_hflip`` and
    :func:`color_jitter` with ``preprocess.train_color_jitter``, after the crop. The caller says per image
    whether the caption allows them (``allow_flip``, ``allow_color_jitter``; see
    :class:`clipforge.data.stream.SampleDecoder`); a disallowed step draws nothing.
    """

    def __init__(
        self, image_size: int, preprocess: PreprocessConfig, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(image_size, preprocess)
        low, high = preprocess.train_crop_scale
        if not 0 < low <= high:
            raise ValueError(f"preprocess.train_crop_scale must satisfy 0 < low <= high, got {(low, high)}")
        self.scale = (float(low), float(high))
        self.ratio = TRAIN_ASPECT_RATIO
        if not 0.0 <= preprocess.train_hflip <= 1.0:
            raise ValueError(
                f"preprocess.train_hflip must be a probability in [0, 1], got {preprocess.train_hflip}"
            )
        if len(preprocess.train_color_jitter) != 3 or min(preprocess.train_color_jitter) < 0:
            raise ValueError(
                "preprocess.train_color_jitter must be three strengths >= 0 (brightness, contrast, saturation), "
                f"got {preprocess.train_color_jitter}"
            )
        self.hflip = float(preprocess.train_hflip)
        self.color_jitter = tuple(float(s) for s in preprocess.train_color_jitter)
        self.generator = generator
        self._owner_pid = os.getpid()

    def __call__(
        self,
        img: Image.Image,
        generator: torch.Generator | None = None,
        *,
        allow_flip: bool = True,
        allow_color_jitter: bool = True,
    ) -> torch.Tensor:
        """``generator`` (per call) overrides the transform's own: the data pipeline seeds one per sample
        position, so crops do not depend on which worker decodes a sample. ``allow_flip`` /
        ``allow_color_jitter`` False skip those steps for this image (its caption names a side or a colour)."""
        flip, jitter = allow_flip and self.hflip > 0, allow_color_jitter and any(self.color_jitter)
        if generator is not None:
            return self._apply(img, generator, flip, jitter)
        if self.generator is not None and os.getpid() != self._owner_pid:
            raise RuntimeError(
                "TrainTransform holds a torch.Generator but is running in another process (e.g. a DataLoader "
                "worker), where every copy would repeat the same crops; build it with generator=None so each "
                "worker uses its own torch seed"
            )
        return self._apply(img, self.generator, flip, jitter)

    def _apply(
        self, img: Image.Image, generator: torch.Generator | None, flip: bool = False, jitter: bool = False
    ) -> torch.Tensor:
        img = self._prepare(img)
        left, top, width, height = random_resized_crop_box(*img.size, self.scale, self.ratio, generator)
        size = self.image_size
        img = resize(_crop(img, left, top, width, height), (size, size), self.preprocess.interpolation)
        if flip and torch.rand(1, generator=generator).item() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if jitter:
            img = color_jitter(img, self.color_jitter, generator)
        return self._to_tensor(img)

    def _repr_fields(self) -> dict[str, Any]:
        ratio = tuple(round(r, 4) for r in self.ratio)
        rng = "torch global RNG" if self.generator is None else "explicit generator"
        augment = {"hflip": self.hflip} if self.hflip else {}
        if any(self.color_jitter):
            augment["color_jitter"] = self.color_jitter
        return {**super()._repr_fields(), "scale": self.scale, "ratio": ratio, **augment, "rng": rng}


def _resolve_config(model_or_config: Any) -> ModelConfig:
    if isinstance(model_or_config, str):
        return get_model_config(model_or_config)
    if isinstance(model_or_config, ModelConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if isinstance(config, ModelConfig):
        return config
    raise TypeError(
        "get_transforms expects a model name, a clipforge ModelConfig, or a model with a .config ModelConfig; "
        f"got {type(model_or_config).__name__}"
    )


def get_transforms(
    model_or_config: str | ModelConfig | Any,
    train: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> EvalTransform | TrainTransform:
    """The preprocessing a model expects: a callable PIL image -> float32 tensor [3, S, S].

    ``model_or_config`` is a model name, a :class:`~clipforge.config.ModelConfig`, or a model with a ``.config``.
    S is ``config.vision.image_size``; everything else comes from ``config.preprocess``. ``train=True`` gives
    the random-resized-crop :class:`TrainTransform` (``generator`` makes it reproducible in one process);
    otherwise the deterministic :class:`EvalTransform`. Both expose ``image_size`` and ``preprocess``.
    """
    config = _resolve_config(model_or_config)
    if train:
        return TrainTransform(config.vision.image_size, config.preprocess, generator=generator)
    if generator is not None:
        raise ValueError(
            "generator is only used by the training transform (train=True); the eval one is deterministic"
        )
    return EvalTransform(config.vision.image_size, config.preprocess)
