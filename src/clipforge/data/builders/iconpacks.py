"""What the builders of SVG icon sets installed by pip share (``openmoji``, ``mdi``, ``fontawesome``,
``simpleicons``): the icons of a pack module, the ``limit``/``slugs`` slice, and rendering every selected icon
into a :class:`Candidate` (a failed render is counted under its ``render:...`` reason)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from tqdm import tqdm

from clipforge.data.builders.core import Candidate, ImageOptions
from clipforge.data.builders.svgrender import RenderJob, render_many

T = TypeVar("T")


@dataclass(frozen=True)
class IconItem:
    """One icon to render, with everything but its image."""

    source: str  # "mdi/account-arrow-down-outline": seeds the split and the key
    svg: str
    captions: tuple[str, ...]
    classes: tuple[str, ...]
    extra: Mapping[str, Any]


def pack_icons(module: ModuleType) -> list[Any]:
    """Every icon constant of an icon-pack module: the upper-case names of its ``__all__``."""
    return [getattr(module, name) for name in module.__all__ if name.isupper()]


def select(
    items: Sequence[T],
    key: Callable[[T], str],
    *,
    limit: int | None = None,
    slugs: Sequence[str] | None = None,
) -> list[T]:
    """``items`` sorted by ``key``; only those whose key is in ``slugs`` when given (an unknown one is a
    ``ValueError``); then the first ``limit``."""
    ordered = sorted(items, key=key)
    if slugs is not None:
        wanted = set(slugs)
        known = {key(item) for item in ordered}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"unknown slugs {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        ordered = [item for item in ordered if key(item) in wanted]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        ordered = ordered[:limit]
    return ordered


def render_items(
    name: str,
    items: Sequence[IconItem],
    image_options: ImageOptions,
    dropped: Counter[str],
    *,
    margin: float,
    workers: int,
    progress: bool,
) -> list[Candidate]:
    """Render every item; a failure is counted in ``dropped`` under its reason. ``content_id`` is the sha256 of
    the thumbnail, so icons that render identically are dropped as ``duplicate_image`` (distinct images only)."""
    jobs = [RenderJob(item.source, item.svg) for item in items]
    results = render_many(jobs, image_options, margin=margin, workers=workers)
    candidates: list[Candidate] = []
    bar = tqdm(results, total=len(jobs), desc=name, unit="icon", disable=not progress, dynamic_ncols=True)
    for item, result in zip(items, bar):
        if isinstance(result, str):
            dropped[result] += 1
            continue
        candidates.append(
            Candidate(
                source=item.source,
                image=result,
                captions=item.captions,
                classes=item.classes,
                extra=item.extra,
                content_id=hashlib.sha256(result).hexdigest(),
            )
        )
    return candidates
