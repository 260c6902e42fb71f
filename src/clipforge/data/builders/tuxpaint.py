"""Tux Paint stamps (Debian ``tuxpaint-stamps-default``, GPL-2): each stamp's ``.txt`` gives the caption (its
first line, English) and translations (``xx.utf8=...`` lines, kept in the sample json); classes come from
folders (nearest listed ancestor in ``rules.json``, section ``tuxpaint``).

GPL-2 data: fine for local experiments, never shipped in the built-in dataset.

Drop reasons: ``svg_only`` (the stamp has only an SVG; no rasteriser is used), ``no_image``,
``no_description`` (empty first line), ``no_class``, ``image:<reason>``, ``duplicate_image``; PNGs with no
``.txt`` are counted as ``mirror_variant`` (``*_mirror.png``, the flipped copy of a stamp) or
``png_without_description``.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clipforge.data.builders.core import PRIMARY_LABEL, Candidate, Collected, ImageOptions
from clipforge.data.builders.environment import load_rules, read_text_head, require_files
from clipforge.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

NAME = "tuxpaint"
DEFAULT_ROOT = Path("/usr/share/tuxpaint/stamps")
PACKAGES = ("tuxpaint-stamps-default",)
COPYRIGHT_FILE = Path("/usr/share/doc/tuxpaint-stamps-default/copyright")
LICENCE = (
    "GPL-2 (Debian package tuxpaint-stamps-default); do not redistribute with permissively licensed data"
)


def parse_description(text: str) -> tuple[str, dict[str, str]]:
    """``(english, {language: translation})`` from a stamp's ``.txt``.

    The first line is English; other lines are ``lang.utf8=text`` (or ``lang=text``); empty translations and
    lines without ``=`` are left out.
    """
    lines = text.lstrip("\ufeff").splitlines()
    english = " ".join(lines[0].split()) if lines else ""
    translations: dict[str, str] = {}
    for line in lines[1:]:
        key, equals, value = line.partition("=")
        value = " ".join(value.split())
        if equals and value:
            translations[key.strip().removesuffix(".utf8")] = value
    return english, translations


def class_of(folder: str, classes: dict[str, str]) -> str | None:
    """The class of the nearest listed ancestor folder (the folder itself first)."""
    parts = folder.split("/") if folder else []
    for end in range(len(parts), 0, -1):
        name = classes.get("/".join(parts[:end]))
        if name is not None:
            return name
    return None


def collect(
    image_options: ImageOptions,
    *,
    root: str | Path = DEFAULT_ROOT,
    rules: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> Collected:
    """Every stamp with a PNG and an English description, as thumbnails; drops counted by reason."""
    root = Path(root)
    require_files(NAME, [(root, PACKAGES[0])], "root= (--root)")
    classes = {k.strip("/"): v for k, v in load_rules(NAME, rules, required=("classes",))["classes"].items()}
    files: dict[str, set[str]] = {}
    for directory, _, names in os.walk(root):
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            if dot and suffix.lower() in ("txt", "png", "svg"):
                relative = (Path(directory) / stem).relative_to(root).as_posix()
                files.setdefault(relative, set()).add(suffix.lower())
    dropped: Counter[str] = Counter()
    candidates: list[Candidate] = []
    for stem in tqdm(sorted(files), desc=NAME, unit="stamp", disable=not progress, dynamic_ncols=True):
        kinds = files[stem]
        if "txt" not in kinds:
            if "png" in kinds:
                dropped["mirror_variant" if stem.endswith("_mirror") else "png_without_description"] += 1
            continue  # an SVG without a description is not a stamp Tux Paint shows either
        outcome = _one(stem, kinds, root, classes, image_options, max_pixels)
        if isinstance(outcome, str):
            dropped[outcome] += 1
        else:
            candidates.append(outcome)
    return Collected(
        candidates=candidates,
        dropped=dropped,
        label_fields=(PRIMARY_LABEL,),
        packages=PACKAGES,
        licence={
            "licence": LICENCE,
            "copyright_file": str(COPYRIGHT_FILE),
            "copyright_excerpt": read_text_head(COPYRIGHT_FILE, 8),
        },
        notes={"root": str(root), "stamps_with_description": sum("txt" in k for k in files.values())},
    )


def _one(
    stem: str,
    kinds: set[str],
    root: Path,
    classes: dict[str, str],
    image_options: ImageOptions,
    max_pixels: int | None,
) -> Candidate | str:
    if "png" not in kinds:
        return "svg_only" if "svg" in kinds else "no_image"
    text = (root / f"{stem}.txt").read_bytes().decode("utf-8", errors="replace")
    english, translations = parse_description(text)
    if not english:
        return "no_description"
    folder = stem.rpartition("/")[0]
    class_name = class_of(folder, classes)
    if class_name is None:
        return "no_class"
    png_path = root / f"{stem}.png"
    try:
        data = png_path.read_bytes()
        image = load_image(data, name=str(png_path), max_pixels=max_pixels)
    except ImageLoadError as exc:
        return f"image:{exc.reason}"
    dat_path = root / f"{stem}.dat"
    extra: dict[str, Any] = {
        "package": PACKAGES[0],
        "licence": "GPL-2",
        "folder": folder,
        "description": english,
        "translations": translations,
        "stamp_options": dat_path.read_text(errors="replace").split() if dat_path.exists() else [],
        "original_size": list(image.size),
    }
    return Candidate(
        source=f"{stem}.png",
        image=image_options.thumbnail(image),
        captions=(english,),
        classes=(class_name,),
        extra=extra,
        content_id=hashlib.sha256(data).hexdigest(),
    )
