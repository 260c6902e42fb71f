"""Caption-side augmentation: tag-list dropout and shuffling, and the words that forbid an image augmentation
(a flip when the caption names a side, colour jitter when it names a colour). Word lists: ``caption_words.json``."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

WORDS_FILE = Path(__file__).with_name("caption_words.json")


@functools.lru_cache(maxsize=1)
def _patterns() -> dict[str, re.Pattern[str]]:
    words = json.loads(WORDS_FILE.read_text())
    patterns = {}
    for kind in ("side", "colour"):
        phrases = sorted(words[kind], key=len, reverse=True)  # longest first: "left-facing" before "left"
        alternatives = "|".join(r"\s+".join(map(re.escape, phrase.split())) for phrase in phrases)
        # Whole words only: "right" matches "Right," "right-facing" and "up-right", not "bright" or "copyright".
        patterns[kind] = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    return patterns


def mentions_side(caption: str) -> bool:
    """Whether ``caption`` names a side or a turning direction (left, right, clockwise, ...): a mirrored image
    would contradict it."""
    return _patterns()["side"].search(caption) is not None


def mentions_colour(caption: str) -> bool:
    """Whether ``caption`` names a colour (red, blue, golden, ...): a colour-jittered image might contradict it."""
    return _patterns()["colour"].search(caption) is not None


def split_items(caption: str) -> list[str]:
    """The comma-separated items of ``caption``, stripped, empty ones removed; commas inside brackets do not
    split ("a family (man, woman, girl)" is one item)."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(caption):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            items.append(caption[start:index])
            start = index + 1
    items.append(caption[start:])
    return [item.strip() for item in items if item.strip()]


def augment_tags(caption: str, generator: torch.Generator, drop: float = 0.0, shuffle: bool = False) -> str:
    """A comma-separated list ("cat, animal, pet, cute") with each item after the first dropped with probability
    ``drop`` and, with ``shuffle``, the kept items after the first in random order; joined by ", ".

    Captions with fewer than two items (:func:`split_items`) come back unchanged and draw nothing from
    ``generator``. Draws: one uniform per item after the first (when ``drop`` > 0), then one permutation of the
    kept ones (with ``shuffle``), so a fixed generator state gives a fixed result.
    """
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    if "," not in caption or not (drop or shuffle):
        return caption
    items = split_items(caption)
    if len(items) < 2:
        return caption
    head, rest = items[0], items[1:]
    if drop:
        keep = torch.rand(len(rest), generator=generator) >= drop
        rest = [item for item, kept in zip(rest, keep.tolist()) if kept]
    if shuffle and len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return ", ".join([head, *rest])
