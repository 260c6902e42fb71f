"""A picture of an overlap analysis: the closest (evaluation, training) pairs side by side in a PNG grid,
flagged pairs framed in red (:mod:`clipforge.eval.overlap` finds the pairs)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont, ImageOps

from clipforge.eval.overlap import OverlapError, OverlapMatch, sort_matches
from clipforge.files import atomic_path
from clipforge.images import to_rgb

_PAD = 6
_TEXT_BAND = 30  # two lines of 11 px text
_BACKGROUND = (255, 255, 255)
_THUMB_BACKGROUND = (232, 232, 232)
_FLAG_COLOUR = (200, 30, 30)


def montage_size(num_pairs: int, *, thumb: int = 96, columns: int = 4) -> tuple[int, int]:
    """The (width, height) in pixels of :func:`overlap_montage`'s PNG for ``num_pairs`` drawn pairs."""
    columns = max(1, min(columns, num_pairs))
    rows = math.ceil(num_pairs / columns)
    cell_width, cell_height = 2 * thumb + 3 * _PAD, thumb + _TEXT_BAND + 2 * _PAD
    return columns * cell_width, rows * cell_height


def overlap_montage(
    matches: Sequence[OverlapMatch],
    load_eval: Callable[[int], Image.Image],
    load_train: Callable[[int], Image.Image],
    path: str | Path,
    *,
    top: int = 24,
    thumb: int = 96,
    columns: int = 4,
    order: Literal["cosine", "hash"] = "cosine",
    cosine_threshold: float | None = None,
    hash_threshold: int | None = None,
) -> Path:
    """Draw the ``top`` closest pairs as a PNG grid (closest first, by ``order``) and write it atomically.

    Each cell shows the eval image (left) beside its training match (right), each fitted into a ``thumb``-pixel
    square, and under them ``cos 0.973  hash 4`` and ``eval_key | train_key``. Pairs flagged by either given
    threshold get a red frame. The image size is :func:`montage_size` of the number of pairs drawn.
    """
    if not matches:
        raise OverlapError(
            "overlap_montage got no matches to draw; pass result.nearest or result.hash_matches"
        )
    if top < 1 or thumb < 8 or columns < 1:
        raise OverlapError(
            f"need top >= 1, thumb >= 8 and columns >= 1, got top={top}, thumb={thumb}, columns={columns}"
        )
    chosen = sort_matches(matches, order)[:top]
    width, height = montage_size(len(chosen), thumb=thumb, columns=columns)
    columns = max(1, min(columns, len(chosen)))
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    cell_width, cell_height = 2 * thumb + 3 * _PAD, thumb + _TEXT_BAND + 2 * _PAD
    for position, match in enumerate(chosen):
        left = (position % columns) * cell_width
        top_edge = (position // columns) * cell_height
        flagged = (cosine_threshold is not None and match.cosine >= cosine_threshold) or (
            hash_threshold is not None and match.hash_distance <= hash_threshold
        )
        if flagged:
            draw.rectangle(
                (left + 1, top_edge + 1, left + cell_width - 2, top_edge + cell_height - 2),
                outline=_FLAG_COLOUR,
                width=2,
            )
        for slot, image in enumerate((load_eval(match.eval_index), load_train(match.train_index))):
            canvas.paste(_thumbnail(image, thumb), (left + _PAD + slot * (thumb + _PAD), top_edge + _PAD))
        text_top = top_edge + _PAD + thumb + 2
        colour = _FLAG_COLOUR if flagged else (0, 0, 0)
        draw.text(
            (left + _PAD, text_top),
            f"cos {match.cosine:.3f}  hash {match.hash_distance}",
            fill=colour,
            font=font,
        )
        keys = _fit_text(f"{match.eval_key} | {match.train_key}", draw, font, cell_width - 2 * _PAD)
        draw.text((left + _PAD, text_top + 14), keys, fill=(80, 80, 80), font=font)

    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def _thumbnail(image: Image.Image, size: int) -> Image.Image:
    """``image`` as RGB, fitted inside a ``size`` square (aspect kept) and centred on a grey background."""
    fitted = ImageOps.contain(to_rgb(image), (size, size), Image.Resampling.BICUBIC)
    square = Image.new("RGB", (size, size), _THUMB_BACKGROUND)
    square.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return square


def _fit_text(text: str, draw: ImageDraw.ImageDraw, font: Any, width: int) -> str:
    """``text`` cut at the end with an ellipsis so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


__all__ = ["montage_size", "overlap_montage"]
