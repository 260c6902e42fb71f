"""The raw-pixel baseline: logistic regression on downscaled pixels, the paper's yardstick for MNIST-like data.

CLIP's paper notes that logistic regression on raw pixels beats zero-shot CLIP on MNIST. :func:`pixel_features`
turns images into flat pixel vectors and :func:`pixel_baseline` runs the same linear-probe protocol on them as
:func:`clipforge.eval.linear_probe.linear_probe` runs on model features.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from clipforge.eval.linear_probe import LinearProbeResult, linear_probe
from clipforge.images import to_rgb

# Rows per block when the number of images is not known in advance (an iterator without len()).
_BLOCK_ROWS = 1024


def pixel_features(images: Iterable[Image.Image], *, size: int = 16, grayscale: bool = False) -> np.ndarray:
    """Flat pixel vectors, float32 [N, size * size * channels], values in [0, 1].

    Each image is made 8-bit RGB by :func:`clipforge.images.to_rgb` (alpha composited on white, 16-bit and
    float modes scaled), then grey (Pillow's ``convert("L")``, ITU-R 601 luma) when ``grayscale``, then resized
    to ``size x size`` with Pillow's bicubic filter (antialiased when shrinking) on the whole image: no crop, so
    nothing at the edges is lost and a non-square image is squashed. Values are divided by 255 and flattened in
    row-major (row, column, channel) order.

    ``images`` is consumed one image at a time. When it has ``len()`` the output is allocated once and filled,
    so nothing beyond it is held; a plain iterator is gathered in blocks of 1,024 rows and joined at the end
    (briefly twice the output).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be an int >= 1 (pixels per side), got {size!r}")
    channels = 1 if grayscale else 3
    width = size * size * channels
    rows = (_pixels(image, index, size, grayscale) for index, image in enumerate(images))
    try:
        expected = len(images)  # type: ignore[arg-type]
    except TypeError:
        return _gather(rows, width)
    out = np.empty((expected, width), dtype=np.float32)
    count = 0
    for count, row in enumerate(rows, start=1):
        if count > expected:
            raise ValueError(f"images yielded more than its len() of {expected} items")
        out[count - 1] = row
    if count != expected:
        raise ValueError(f"images yielded {count} items but its len() is {expected}")
    return out


def pixel_baseline(
    train_images: Iterable[Image.Image],
    train_y: Any,
    test_images: Iterable[Image.Image],
    test_y: Any,
    *,
    size: int = 16,
    grayscale: bool = False,
    val_images: Iterable[Image.Image] | None = None,
    val_y: Any = None,
    seed: int = 0,
    standardize: bool = True,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    progress: bool = False,
) -> LinearProbeResult:
    """Logistic regression on :func:`pixel_features`, by the protocol of :func:`~.linear_probe.linear_probe`.

    ``standardize`` (default on) standardises every pixel with the mean/std of the data each model is fit on:
    raw pixels have very unequal variances (borders are nearly constant), which slows L-BFGS and makes one C
    regularise pixels unevenly. Without validation images a stratified split of train (``val_fraction``,
    ``seed``) is the validation set.
    """
    if (val_images is None) != (val_y is None):
        raise ValueError(
            "pass both val_images and val_y, or neither (then a split of train is the validation)"
        )
    train_x = pixel_features(train_images, size=size, grayscale=grayscale)
    test_x = pixel_features(test_images, size=size, grayscale=grayscale)
    val_x = None if val_images is None else pixel_features(val_images, size=size, grayscale=grayscale)
    return linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        val_x=val_x,
        val_y=val_y,
        val_fraction=val_fraction,
        seed=seed,
        max_iter=max_iter,
        standardize=standardize,
        progress=progress,
    )


def _pixels(image: Any, index: int, size: int, grayscale: bool) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise TypeError(f"images[{index}] is a {type(image).__name__}, not a PIL.Image.Image")
    image = to_rgb(image)
    if grayscale:
        image = image.convert("L")
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32).reshape(-1) / np.float32(255.0)


def _gather(rows: Iterator[np.ndarray], width: int) -> np.ndarray:
    blocks: list[np.ndarray] = []
    block = np.empty((_BLOCK_ROWS, width), dtype=np.float32)
    filled = 0
    for row in rows:
        if filled == _BLOCK_ROWS:
            blocks.append(block)
            block, filled = np.empty((_BLOCK_ROWS, width), dtype=np.float32), 0
        block[filled] = row
        filled += 1
    blocks.append(block[:filled])
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0].copy()
