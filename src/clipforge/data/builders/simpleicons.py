"""Simple Icons (pip ``simple-icons-pack``; CC0-1.0, a few icons under their own licence): brand logos drawn in
their brand colour on white, captioned "the {title} logo" and variants; one class, ``brand logo``.

The wheel holds each icon's SVG, slug, title, brand colour (hex), source URL, guidelines URL and licence (set
only where it is not CC0). Colours whose contrast ratio with white is under ``min_contrast`` (``rules.json``,
section ``simpleicons``) are drawn in ``dark_fill`` so the logo stays visible. Drop reasons:
``licence:not_open`` (the icon's own licence is not in ``allowed_licences``: non-commercial, no-derivatives, or a
terms-of-service or trademark-policy URL), ``render:<reason>``, ``duplicate_image``. Logos are trademarks of their
owners, whatever the SVG's licence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from clipforge.data.builders.captions import pick_templates, unique
from clipforge.data.builders.core import PRIMARY_LABEL, Collected, ImageOptions
from clipforge.data.builders.environment import PipPackage, load_rules, python_licence_text, require_module
from clipforge.data.builders.iconpacks import IconItem, pack_icons, render_items, select
from clipforge.data.builders.svgrender import DEFAULT_MARGIN, RESVG, with_fill

NAME = "simpleicons"
PACKAGE = PipPackage("simple-icons-pack", "simple_icons_pack", "16.36.0")
PIP_PACKAGES = (PACKAGE, RESVG)
PACKAGES: tuple[str, ...] = ()
LICENCE = (
    "CC0-1.0 (Simple Icons), except icons whose own licence is given in their json; logos are trademarks"
)
CODE_VERSION = 1


def contrast_with_white(hex_colour: str) -> float:
    """WCAG contrast ratio of an sRGB colour (``"FFDF18"``) with white: 1 (white) to 21 (black)."""

    def linear(channel: int) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (0, 2, 4))
    luminance = 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)
    return 1.05 / (luminance + 0.05)


def logo_captions(title: str, source: str, templates: Sequence[str], count: int) -> tuple[str, ...]:
    """``count`` templates (chosen by the hash of ``source``) with ``{title}``, and ``{the_title}``: the title
    after "the" unless it starts with one ("The Movie Database")."""
    the_title = title if title.lower().startswith("the ") else f"the {title}"
    return unique(
        [t.format(title=title, the_title=the_title) for t in pick_templates(templates, source, count)]
    )


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
    """Every logo (or the first ``limit`` by slug, or the listed ``slugs``) in its brand colour."""
    module = require_module(NAME, PACKAGE)
    require_module(NAME, RESVG)
    pack_rules = load_rules(
        NAME, rules, required=("class", "caption_templates", "allowed_licences", "min_contrast", "dark_fill")
    )
    allowed = set(pack_rules["allowed_licences"])
    icons = pack_icons(module)
    min_contrast, dark_fill = float(pack_rules["min_contrast"]), str(pack_rules["dark_fill"])
    dropped: Counter[str] = Counter()
    items: list[IconItem] = []
    darkened = 0
    for icon in select(icons, lambda i: i.slug, limit=limit, slugs=slugs):
        if (icon.license or "CC0-1.0") not in allowed:
            dropped["licence:not_open"] += 1
            continue
        source = f"{NAME}/{icon.slug}"
        brand = f"#{icon.hex.upper()}"
        visible = contrast_with_white(icon.hex) >= min_contrast
        darkened += not visible
        templates = list(pack_rules["caption_templates"])
        items.append(
            IconItem(
                source=source,
                svg=with_fill(icon.svg, brand if visible else dark_fill),
                captions=logo_captions(icon.title, source, templates, 3),
                classes=(str(pack_rules["class"]),),
                extra={
                    "package": PACKAGE.distribution,
                    "licence": icon.license or "CC0-1.0",
                    "slug": icon.slug,
                    "title": icon.title,
                    "hex": icon.hex,
                    "drawn_colour": brand if visible else dark_fill,
                    "icon_source": icon.source,
                    "guidelines": icon.guidelines,
                    "concept": icon.title,
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
        licence={
            "licence": LICENCE,
            "licence_excerpt": python_licence_text(PACKAGE.distribution, 3),
            "icons_with_own_licence": dict(Counter(i.license for i in icons if i.license)),
        },
        notes={
            "icons_in_package": len(icons),
            "selected": {"limit": limit, "slugs": list(slugs) if slugs is not None else None},
            "margin": margin,
            "drawn_dark": darkened,
            "min_contrast": min_contrast,
            "code_version": CODE_VERSION,
        },
    )
