"""Material Design Icons (pip ``material-design-icons-pack``, Apache-2.0): every icon's SVG rendered black on
white; captions and the concept class from its slug (``account-arrow-down-outline`` -> "an outline icon of an
account with an arrow pointing down", class ``account``) by the ``icon_names`` rules of ``rules.json``.

The wheel holds each icon's SVG, slug, version, deprecation flag and author -- no tags or aliases. Drop reasons:
``deprecated`` (withdrawn upstream; almost all are brand logos), ``render:<reason>``, ``duplicate_image``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from clipforge.data.builders.core import PRIMARY_LABEL, Collected, ImageOptions
from clipforge.data.builders.environment import PipPackage, load_rules, python_licence_text, require_module
from clipforge.data.builders.iconnames import RULE_FIELDS, IconNamer, concept_classes
from clipforge.data.builders.iconpacks import IconItem, pack_icons, render_items, select
from clipforge.data.builders.svgrender import DEFAULT_MARGIN, RESVG

NAME = "mdi"
PACKAGE = PipPackage("material-design-icons-pack", "material_design_icons_pack", "7.4.47")
PIP_PACKAGES = (PACKAGE, RESVG)
PACKAGES: tuple[str, ...] = ()  # no Debian package
LICENCE = "Apache-2.0 (Material Design Icons by Pictogrammers; Pictogrammers Free License)"
CODE_VERSION = 1  # bump when the output for the same package version changes (the cache key includes it)


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
    """Every (or the first ``limit`` by slug, or the listed ``slugs``) icon as a thumbnail with captions.

    Concept classes are counted over the whole pack, so a slice gets the labels of the full build.
    """
    module = require_module(NAME, PACKAGE)
    require_module(NAME, RESVG)
    names = load_rules("icon_names", rules, required=RULE_FIELDS)
    pack_rules = load_rules(NAME, rules, required=("drop_deprecated", "words_line"))
    icons = pack_icons(module)
    usable = [i for i in icons if not (i.deprecated and pack_rules["drop_deprecated"])]
    namer = IconNamer(names, known_names=[i.slug for i in usable])
    described = {i.slug: namer.describe(i.slug.split("-")) for i in usable}
    classes = concept_classes([d.head for d in described.values()], namer.min_class_count, namer.other_class)
    dropped: Counter[str] = Counter()
    items: list[IconItem] = []
    for icon in select(icons, lambda i: i.slug, limit=limit, slugs=slugs):
        if icon.slug not in described:
            dropped["deprecated"] += 1
            continue
        name = described[icon.slug]
        source = f"{NAME}/{icon.slug}"
        words_line = pack_rules["words_line"].format(words=" ".join(icon.slug.split("-")))
        items.append(
            IconItem(
                source=source,
                svg=icon.svg,
                captions=namer.captions(name, source, words_line=words_line),
                classes=(classes[name.head],),
                extra={
                    "package": PACKAGE.distribution,
                    "licence": "Apache-2.0",
                    "slug": icon.slug,
                    "version": icon.version,
                    "author": icon.author,
                    "deprecated": icon.deprecated,
                    "concept": name.concept,
                    "head": name.head,
                    "name_parts": dict(name.parts),
                },
            )
        )
    candidates = render_items(
        NAME, items, image_options, dropped, margin=margin, workers=workers, progress=progress
    )
    return Collected(
        candidates=candidates,
        dropped=dropped,
        label_fields=(PRIMARY_LABEL,),
        packages=PACKAGES,
        python_packages=tuple(p.distribution for p in PIP_PACKAGES),
        licence={"licence": LICENCE, "licence_excerpt": python_licence_text(PACKAGE.distribution, 12)},
        notes={
            "icons_in_package": len(icons),
            "deprecated_in_package": sum(i.deprecated for i in icons),
            "selected": {"limit": limit, "slugs": list(slugs) if slugs is not None else None},
            "margin": margin,
            "renderer": f"resvg_py {getattr(require_module(NAME, RESVG), '__version__', '?')}",
            "concept_heads": len(classes),
            "concept_classes": len(set(classes.values())),
            "min_class_count": namer.min_class_count,
            "code_version": CODE_VERSION,
        },
    )
