"""`clipforge data build NAME --out DIR`: real datasets from Debian packages, pip-installed icon sets (and
scikit-learn's digits) as webdataset shards with train/val/test splits, class labels and optional held-out
classes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _heldout(value: str) -> int | list[str]:
    """``"5"`` -> 5 classes; ``"flag,fruit"`` -> those class names."""
    return int(value) if value.strip().isdigit() else [v.strip() for v in value.split(",") if v.strip()]


def _fractions(value: str) -> tuple[float, float, float]:
    parts = [float(v) for v in value.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"need three comma-separated fractions (train,val,test), got {value!r}"
        )
    return parts[0], parts[1], parts[2]


def builder_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options for :func:`clipforge.data.builders.build` from parsed arguments."""
    options: dict[str, Any] = {
        "size": args.size,
        "image_format": args.format,
        "jpeg_quality": args.jpeg_quality,
        "fractions": args.fractions,
        "seed": args.seed,
        "heldout_field": args.heldout_field,
        "heldout_min_count": args.heldout_min_count,
        "heldout_min_mentions": args.heldout_min_mentions,
        "heldout_max_count": args.heldout_max_count,
        "overwrite": args.overwrite,
        "max_shard_samples": args.max_shard_samples,
        "progress": not args.quiet,
    }
    if args.heldout_classes is not None:
        options["heldout_classes"] = args.heldout_classes
    if args.heldout_every is not None:
        options["heldout_every"] = args.heldout_every
    applies = {
        "--root": ("openclipart", "tuxpaint"),
        "--rules": ("openclipart", "tuxpaint", "emoji", *ICON_BUILDERS),
        "--max-pixels": ("openclipart", "tuxpaint"),
        "--emoji-test": ("emoji", "openmoji"),
        "--font": ("emoji",),
        "--no-skin-tones": ("emoji", "openmoji"),
        "--resample": ("digits",),
        "--limit": ICON_BUILDERS,
        "--slugs": ICON_BUILDERS,
        "--workers": ICON_BUILDERS,
    }
    given = {
        "--root": args.root,
        "--rules": args.rules,
        "--max-pixels": args.max_pixels,
        "--emoji-test": args.emoji_test,
        "--font": args.font,
        "--no-skin-tones": args.no_skin_tones or None,
        "--resample": args.resample,
        "--limit": args.limit,
        "--slugs": args.slugs,
        "--workers": args.workers,
    }
    wrong = [flag for flag, value in given.items() if value is not None and args.name not in applies[flag]]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do(es) not apply to the {args.name} builder")
    if args.rules is not None:
        options["rules"] = args.rules
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels or None  # 0: no limit
    if args.root is not None and args.name == "openclipart":
        options["png_root"], options["svg_root"] = Path(args.root) / "png", Path(args.root) / "svg"
    elif args.root is not None:
        options["root"] = Path(args.root)
    if args.emoji_test is not None:
        options["emoji_test"] = args.emoji_test
    if args.font is not None:
        options["font"] = args.font
    if args.no_skin_tones:
        options["skin_tones"] = False
    if args.resample is not None:
        options["resample"] = args.resample
    if args.limit is not None:
        options["limit"] = args.limit
    if args.slugs is not None:
        options["slugs"] = [s.strip() for s in args.slugs.split(",") if s.strip()]
    if args.workers is not None:
        options["workers"] = args.workers
    return options


def _cmd_data_build(args: argparse.Namespace) -> int:
    from clipforge.data.builders import build

    result = build(args.name, args.out, **builder_options(args))
    print("\n".join(result.summary_lines()))
    return 0


ICON_BUILDERS = ("fontawesome", "mdi", "openmoji", "simpleicons")  # SVG icon sets installed by pip
# clipforge.data.builders.BUILDERS, not imported here so that `clipforge --help` does not load Pillow's font code
BUILDER_NAMES = tuple(sorted(("digits", "emoji", "openclipart", "tuxpaint", *ICON_BUILDERS)))


def register_build(data_subparsers: argparse._SubParsersAction) -> None:
    """Add ``build`` to the ``clipforge data`` sub-commands."""
    p = data_subparsers.add_parser(
        "build",
        help="build a real dataset (openclipart, tuxpaint, emoji, digits, openmoji, mdi, fontawesome, simpleicons) "
        "as shards with splits and labels",
        description="openclipart: public-domain clip art, captions from SVG metadata; tuxpaint: Tux Paint stamps "
        "(GPL-2) with descriptions and translations; emoji: every fully-qualified emoji rendered with Noto Color "
        "Emoji, CLDR group/subgroup labels; digits: scikit-learn's handwritten digits; openmoji, mdi, fontawesome, "
        "simpleicons: SVG icon sets installed by pip (pip install 'clipforge[data]'), rendered with resvg, "
        "captions from names/slugs/titles. See docs/data.md.",
    )
    p.add_argument("name", choices=BUILDER_NAMES, help="which builder")
    p.add_argument(
        "--out", required=True, help="output folder (gets train/ val/ test/ classes.json build.json)"
    )
    _add_layout_arguments(p)
    _add_heldout_arguments(p)
    _add_source_arguments(p)
    p.add_argument(
        "--max-pixels", type=int, default=None, help="refuse larger source images (bomb guard; 0: no limit)"
    )
    p.add_argument("--max-shard-samples", type=int, default=2000, help="samples per shard at most (2000)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data_build)


def _add_layout_arguments(p: argparse.ArgumentParser) -> None:
    """Thumbnail size and format, split fractions and the split seed."""
    p.add_argument("--size", type=int, default=224, help="square thumbnail side in pixels (default 224)")
    p.add_argument("--format", choices=("png", "jpeg"), default="png", help="thumbnail format (default png)")
    p.add_argument(
        "--jpeg-quality", type=int, default=90, help="JPEG quality with --format jpeg (default 90)"
    )
    p.add_argument(
        "--fractions", type=_fractions, default=(0.8, 0.1, 0.1), help="train,val,test (0.8,0.1,0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash (default 0)")


def _add_heldout_arguments(p: argparse.ArgumentParser) -> None:
    """Which classes move whole to the test_heldout split."""
    p.add_argument(
        "--heldout-classes",
        type=_heldout,
        default=None,
        help="move whole classes to a test_heldout split: a number N (spread over the classes sorted by name), "
        "or comma-separated class names",
    )
    p.add_argument(
        "--heldout-every", type=int, default=None, help="hold out every K-th eligible class instead"
    )
    p.add_argument(
        "--heldout-field", default="label", help="label field to hold out by (e.g. subgroup_label)"
    )
    p.add_argument(
        "--heldout-min-count",
        type=int,
        default=10,
        help="only classes with this many samples may be held out",
    )
    p.add_argument(
        "--heldout-max-count",
        type=int,
        default=0,
        help="classes with more samples than this stay in training (0: no limit)",
    )
    p.add_argument(
        "--heldout-min-mentions",
        type=int,
        default=0,
        help="only classes whose name appears in the captions of this many samples of other classes may be "
        "held out (zero-shot then tests a concept known from other images' language)",
    )


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where each builder reads its sources, and which of them."""
    p.add_argument(
        "--root", default=None, help="package tree copy: openclipart (has png/ svg/), tuxpaint stamps"
    )
    p.add_argument(
        "--emoji-test",
        default=None,
        help="emoji, openmoji: an emoji-test.txt (default: emoji uses unicode-data's if installed, else the "
        "packaged table; openmoji the packaged table)",
    )
    p.add_argument("--font", default=None, help="emoji: the colour emoji font (default: Noto Color Emoji)")
    p.add_argument(
        "--no-skin-tones", action="store_true", help="emoji, openmoji: leave out skin-tone variants"
    )
    p.add_argument(
        "--resample", choices=("bicubic", "nearest"), default=None, help="digits: upscaling (bicubic)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="icon sets: only the first N icons (sorted by slug/file name)"
    )
    p.add_argument("--slugs", default=None, help="icon sets: only these comma-separated slugs")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="icon sets: rendering processes (default 1; see docs/data.md)",
    )
    p.add_argument("--rules", default=None, help="all but digits: a rules.json to use instead")
