"""Rebuild clipforge's built-in dataset (``src/clipforge/builtin_data/``) from the Debian packages.

    apt-get update && apt-get install -y openclipart-png openclipart-svg fonts-noto-color-emoji unicode-data
    .venv/bin/python scripts/build_builtin_data.py            # measure sizes, build, write MANIFEST.json, verify

Sources: openclipart (public domain) and Noto emoji without skin-tone variants (Apache-2.0 images); never
tuxpaint (GPL-2); digits are generated at runtime (``clipforge.data.builtin.build_digits``). Held-out classes
for zero-shot: every 5th class (sorted by name) among those with >= 20 images, per source (openclipart by
``label``, emoji by ``subgroup_label``). The thumbnail size and formats are chosen by :func:`choose_images`
from a measurement of the whole set at 32/48/64/96 px as PNG and JPEG (quality 90), written to MANIFEST.json
and docs/data.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.builders import BUILDERS, build
from clipforge.data.builders.core import ImageOptions, drop_duplicates, sample_key
from clipforge.data.builders.environment import read_text_head
from clipforge.data.builtin import BUDGET_BYTES, BUILTIN_DIR, MANIFEST_FILE, MANIFEST_FORMAT, verify_builtin
from clipforge.data.raw import tar_member_bytes

# What choose_images picked from the measurement (checked on every rebuild; update docs/data.md if it changes).
CHOSEN_IMAGES: dict[str, dict[str, Any]] = {
    "openclipart": {"size": 64, "image_format": "png"},
    "emoji": {"size": 64, "image_format": "jpeg", "jpeg_quality": 90},
}
MAX_SIZE = 64  # the demo trains a small CLIP on the CPU at 32-64 px
BUDGET_SHARE = 0.97  # leave room for manifests, classes.json, build.json, MANIFEST.json
# Held-out classes: zero-shot on them should test a concept the training text knows from *other* images (as in
# the paper), so only classes whose name appears in >= 10 captions of other classes -- in either source, as the
# demo trains on both -- may be held out; of those with 20-150 samples (the largest classes stay in training and
# do not dominate the held-out set), every 2nd sorted by name.
HELDOUT = {"heldout_every": 2, "heldout_min_count": 20, "heldout_max_count": 150, "heldout_min_mentions": 10}
SOURCES: dict[str, dict[str, Any]] = {
    "openclipart": dict(HELDOUT),
    "emoji": {"skin_tones": False, "heldout_field": "subgroup_label", **HELDOUT},
}
MEASURE_VARIANTS = [(size, fmt) for size in (32, 48, 64, 96) for fmt in ("png", "jpeg")]
COPYRIGHT_FILES = {
    "openclipart": ("/usr/share/doc/openclipart-svg/copyright", 30),
    "noto-color-emoji": ("/usr/share/doc/fonts-noto-color-emoji/copyright", 30),
    "unicode-data (emoji names, groups)": ("/usr/share/doc/unicode-data/copyright", 62),
    "Apache-2.0 (full text; the Noto emoji images)": ("/usr/share/common-licenses/Apache-2.0", 210),
}


@dataclass(frozen=True)
class MeasuringImages(ImageOptions):
    """Encodes every image at each measured (size, format) as well, recording the byte counts in order."""

    encoded: dict[tuple[int, str], list[int]] = field(default_factory=dict)

    def thumbnail(self, image: Image.Image, resample: str = "bicubic") -> bytes:
        for size, fmt in MEASURE_VARIANTS:
            variant = ImageOptions(size=size, image_format=fmt, jpeg_quality=90)
            self.encoded.setdefault((size, fmt), []).append(len(variant.thumbnail(image, resample)))
        return super().thumbnail(image, resample)


def measure(progress: bool) -> dict[str, Any]:
    """Bytes of each source's shards (tar members as written: image, .txt, .json) at every measured variant."""
    table: dict[str, dict[str, int]] = {f"{s}px {f}": {} for s, f in MEASURE_VARIANTS}
    for name, options in SOURCES.items():
        images = MeasuringImages(size=MAX_SIZE)
        collect_options = {k: v for k, v in options.items() if not k.startswith("heldout")}
        collected = BUILDERS[name].collect(images, progress=progress, **collect_options)
        index = {id(c): i for i, c in enumerate(collected.candidates)}
        kept = drop_duplicates(collected.candidates, collected.dropped.copy())
        for (size, fmt), lengths in images.encoded.items():
            ext = "png" if fmt == "png" else "jpg"
            total = 0
            for candidate in kept:
                key = sample_key(candidate.source)
                document = {
                    "captions": list(candidate.captions),
                    "label": 0,
                    "class": candidate.classes[0],
                    "source": candidate.source,
                    **candidate.extra,
                }
                total += len(tar_member_bytes(f"{key}.{ext}", bytes(lengths[index[id(candidate)]])))
                total += len(tar_member_bytes(f"{key}.txt", candidate.captions[0].encode()))
                total += len(
                    tar_member_bytes(f"{key}.json", json.dumps(document, ensure_ascii=False).encode())
                )
            table[f"{size}px {fmt}"][name] = total
    for row in table.values():
        row["total"] = sum(row.values())
    return {
        "bytes": table,
        "budget_bytes": BUDGET_BYTES,
        "note": "shard bytes (tar members exactly as written; manifests and json files add about 0.1 MB)",
    }


def collect_captions(progress: bool) -> dict[str, list[str]]:
    """Each source's kept samples' captions (one string per sample), for the held-out rule's mention counts."""
    captions = {}
    for name, options in SOURCES.items():
        collect_options = {k: v for k, v in options.items() if not k.startswith("heldout")}
        collected = BUILDERS[name].collect(ImageOptions(size=8), progress=progress, **collect_options)
        kept = drop_duplicates(collected.candidates, collected.dropped.copy())
        captions[name] = ["\n".join(c.captions) for c in kept]
    return captions


def choose_images(measurement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-source thumbnail options: the largest measured size up to MAX_SIZE at which the whole set fits
    BUDGET_SHARE of the budget, PNG everywhere if that fits, else JPEG (quality 90) for the sources where it
    saves the most bytes, as few sources as possible."""
    table = measurement["bytes"]
    sizes = sorted({s for s, _ in MEASURE_VARIANTS if s <= MAX_SIZE}, reverse=True)
    for size in sizes:
        png, jpeg = table[f"{size}px png"], table[f"{size}px jpeg"]
        by_saving = sorted(SOURCES, key=lambda name: png[name] - jpeg[name], reverse=True)
        for count in range(len(SOURCES) + 1):
            as_jpeg = set(by_saving[:count])
            total = sum(jpeg[n] if n in as_jpeg else png[n] for n in SOURCES)
            if total <= BUDGET_SHARE * BUDGET_BYTES:
                return {
                    name: {"size": size, "image_format": "jpeg", "jpeg_quality": 90}
                    if name in as_jpeg
                    else {"size": size, "image_format": "png"}
                    for name in SOURCES
                }
    raise SystemExit(f"no measured thumbnail size up to {MAX_SIZE} px fits the budget; see the measurement")


def write_manifest(out: Path, measurement: dict[str, Any] | None, results: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        data = path.read_bytes()
        files[path.relative_to(out).as_posix()] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    sources = {}
    for name, result in results.items():
        info = result.info
        sources[name] = {
            "path": name,
            "builder": name,
            "counts": info["counts"]["kept"],
            "dropped": info["counts"]["dropped"],
            "classes": {f: len(c) for f, c in info["classes"].items()},
            "heldout": info["heldout"],
            "licence": info["licence"]["licence"],
            "source_packages": info["source_packages"],
            "options": {k: v for k, v in info["options"].items() if k not in ("progress", "overwrite")},
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "built": time.strftime("%Y-%m-%d", time.gmtime()),
        "thumbnail": {
            "size": CHOSEN_IMAGES["openclipart"]["size"],
            "per_source": CHOSEN_IMAGES,
            "square": "fitted and padded with white",
            "measurement": measurement,
            "rule": choose_images.__doc__ and " ".join(choose_images.__doc__.split()),
        },
        "budget_bytes": BUDGET_BYTES,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "sources": sources,
        "digits": {
            "shipped": False,
            "how": "clipforge.data.builtin.build_digits(out_dir, size=64)",
            "licence": BUILDERS["digits"].licence,
        },
        "excluded": {"tuxpaint": "GPL-2: not shipped with permissively licensed data"},
        "licences": {
            name: {"copyright_file": path, "excerpt": read_text_head(path, lines)}
            for name, (path, lines) in COPYRIGHT_FILES.items()
        },
        "files": files,
    }
    manifest["total_bytes"] += len(json.dumps(manifest, indent=1, ensure_ascii=False).encode()) + 16
    (out / MANIFEST_FILE).write_text(
        json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=BUILTIN_DIR, help="output folder (default: the package's)"
    )
    parser.add_argument(
        "--measurement",
        type=Path,
        default=None,
        help="reuse this measurement JSON (written there if missing)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    progress = not args.quiet
    if args.measurement is not None and args.measurement.exists():
        measurement = json.loads(args.measurement.read_text())
    else:
        measurement = measure(progress)
        if args.measurement is not None:
            args.measurement.write_text(json.dumps(measurement, indent=1))
    print(f"thumbnail size measurement (MB of shards; budget {BUDGET_BYTES / 1e6:.0f} MB):")
    for variant, row in measurement["bytes"].items():
        parts = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in row.items())
        print(f"  {variant:<11} {parts}")
    chosen = choose_images(measurement)
    print(f"chosen: {chosen}")
    if chosen != CHOSEN_IMAGES:
        raise SystemExit(f"the measurement now picks {chosen}; update CHOSEN_IMAGES and docs/data.md")
    captions = collect_captions(progress)
    staging = args.out.with_name(args.out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    results = {}
    for name, options in SOURCES.items():
        others = [other for other in SOURCES if other != name]
        mention_options = {
            "heldout_mention_texts": [text for other in others for text in captions[other]],
            "heldout_mention_note": "counting this source's and " + ", ".join(others) + "'s captions",
        }
        results[name] = build(
            name, staging / name, progress=progress, **CHOSEN_IMAGES[name], **options, **mention_options
        )
        print("\n".join(results[name].summary_lines()))
    manifest = write_manifest(staging, measurement, results)
    problems = verify_builtin(staging)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    print(
        f"built-in dataset: {manifest['total_bytes'] / 1e6:.2f} MB in {len(manifest['files'])} files -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
