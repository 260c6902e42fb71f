"""Small real datasets for tests, built on the fly: scikit-learn's bundled handwritten digits (1,797 real 8x8
scans) as captioned PNGs, written as a CSV table or as webdataset shards, optionally with planted damage."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.data.shards import ShardWriter

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_images(n: int | None = None, size: int = 32) -> tuple[list[Image.Image], list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = len(digits.images) if n is None else n
    images = []
    for pixels in digits.images[:count]:
        gray = (255 - pixels * 255 / 16).clip(0, 255).astype(np.uint8)  # dark ink on white paper
        images.append(Image.fromarray(gray, mode="L").resize((size, size), Image.BICUBIC).convert("RGB"))
    return images, [int(t) for t in digits.target[:count]]


def caption(label: int, index: int) -> str:
    forms = ["a handwritten digit {}.", "the number {} written by hand.", "a scan of a handwritten {}."]
    return forms[index % len(forms)].format(NUMBER_WORDS[label])


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digits_table(folder: Path, n: int | None = None, size: int = 32) -> Path:
    """PNG files + ``captions.csv`` (image, caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(n, size)
    table = folder / "captions.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for index, (image, label) in enumerate(zip(images, labels)):
            name = f"digit_{index:05d}.png"
            image.save(folder / name)
            writer.writerow([name, caption(label, index)])
    return table


def digits_shards(folder: Path, n: int = 200, per_shard: int = 25, size: int = 32) -> Path:
    """Clean shards of ``n`` digit images with captions and a manifest."""
    images, labels = digit_images(n, size)
    with ShardWriter(folder, max_samples=per_shard) as writer:
        for index, (image, label) in enumerate(zip(images, labels)):
            writer.write(f"{index:06d}", png_bytes(image), "png", caption(label, index))
    return folder
