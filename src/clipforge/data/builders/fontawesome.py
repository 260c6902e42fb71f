"""Font Awesome Free (pip ``fontawesome-free-pack``; icons CC BY 4.0): every icon of the solid, regular and
brands families rendered black on white. Solid and regular icons are read by the ``icon_names`` rules (leading
``circle``/``square`` are containers: ``circle-check`` is a check mark in a circle) with the family as a style
("a solid icon of ...", regular = "an outline icon of ..."); brand icons are logos ("the GitHub logo", class
``brand logo``).

The wheel holds each icon's SVG, slug, family, size, modification time and label -- the label is the slug in
title case; there are no search terms. Drop reasons: ``render:<reason>``, ``duplicate_image``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipforge.data.builders.core import PRIMARY_LABEL, Collected, ImageOptions
from clipforge.data.builders.environment import PipPackage, load_rules, python_licence_text, require_module
from clipforge.data.builders.iconnames import RULE_FIELDS, IconNamer, concept_classes
from clipforge.data.builders.iconpacks import IconItem, pack_icons, render_items, select
from clipforge.data.builders.simpleicons import logo_captions
from clipforge.data.builders.svgrender import DEFAULT_MARGIN, RESVG

NAME = "fontawesome"
PACKAGE = PipPackage("fontawesome-free-pack", "fontawesome_free_pack", "7.3.1")
PIP_PACKAGES = (PACKAGE, RESVG)
PACKAGES: tuple[str, ...] = ()
LICENCE = "CC BY 4.0 (Font Awesome Free icons by Fonticons, Inc., https://fontawesome.com/license/free)"
CODE_VERSION = 1
BRANDS = "brands"


def icon_source(icon: Any) -> str:
    return f"{NAME}/{icon.family}/{icon.slug}"


def collect(
    image_options: ImageOptions,
    *,
    limit: int | None = None,
    slugs: Sequence[str] | None = None,
    margin: float = DEFAULT_MARGIN,
    workers: int = 1,
    rules: str | Path | None = None,
    progress: bool = True,
) -> Collected:
    """Every icon (or the first ``limit`` by ``family/slug``, or those whose ``family/slug`` is in ``slugs``)."""
    module = require_module(NAME, PACKAGE)
    require_module(NAME, RESVG)
    names = load_rules("icon_names", rules, required=RULE_FIELDS)
    pack_rules = load_rules(
        NAME,
        rules,
        required=("family_styles", "min_class_count", "brand_class", "brand_templates", "words_line"),
    )
    icons = pack_icons(module)
    drawn = [i for i in icons if i.family != BRANDS]
    namer = IconNamer(
        names,
        leading_containers=True,
        known_names=[i.slug for i in drawn],
        min_class_count=int(pack_rules["min_class_count"]),
    )
    described = {i.slug: namer.describe(i.slug.split("-")) for i in drawn}
    classes = concept_classes(
        [described[i.slug].head for i in drawn], namer.min_class_count, namer.other_class
    )
    dropped: Counter[str] = Counter()
    items: list[IconItem] = []
    for icon in select(icons, lambda i: f"{i.family}/{i.slug}", limit=limit, slugs=slugs):
        source = icon_source(icon)
        extra: dict[str, Any] = {
            "package": PACKAGE.distribution,
            "licence": "CC-BY-4.0",
            "slug": icon.slug,
            "family": icon.family,
            "fa_label": icon.label,
            "last_modified": icon.last_modified,
            "width": icon.width,
            "height": icon.height,
        }
        if icon.family == BRANDS:
            templates = list(pack_rules["brand_templates"])
            captions = logo_captions(icon.label, source, templates, 3)
            class_name = str(pack_rules["brand_class"])
            extra.update(concept=icon.label, head=class_name)
        else:
            name = described[icon.slug]
            style = pack_rules["family_styles"].get(icon.family, icon.family)
            words_line = pack_rules["words_line"].format(words=icon.label.lower())
            captions = namer.captions(name, source, style=style, words_line=words_line)
            class_name = classes[name.head]
            extra.update(concept=name.concept, head=name.head, name_parts=dict(name.parts))
        items.append(IconItem(source, icon.svg, captions, (class_name,), extra))
    candidates = render_items(
        NAME, items, image_options, dropped, margin=margin, workers=workers, progress=progress
    )
    return Collected(
        candidates=candidates,
        dropped=dropped,
        label_fields=(PRIMARY_LABEL,),
        packages=PACKAGES,
        python_packages=tuple(p.distribution for p in PIP_PACKAGES),
        licence={"licence": LICENCE, "licence_excerpt": python_licence_text(PACKAGE.distribution, 40)},
        notes={
            "icons_in_package": len(icons),
            "families_in_package": dict(Counter(i.family for i in icons)),
            "selected": {"limit": limit, "slugs": list(slugs) if slugs is not None else None},
            "margin": margin,
            "concept_heads": len(classes),
            "concept_classes": len(set(classes.values())),
            "min_class_count": namer.min_class_count,
            "code_version": CODE_VERSION,
        },
    )
