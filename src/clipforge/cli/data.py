"""`clipforge data ...`: preparing data (shards from tables/folders)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipforge.cli.databuild import register_build


def _cmd_data_shards(args: argparse.Namespace) -> int:
    from clipforge.data.sources import open_source, source_notes, write_shards

    options = {
        k: v
        for k, v in {
            "image_column": args.image_column,
            "caption_column": args.caption_column,
            "caption_separator": args.caption_separator,
            "root": args.root,
        }.items()
        if v is not None
    }
    if args.report_bad_rows:
        options["on_bad_row"] = "report"
    source = open_source(args.src, **options)
    for note in source_notes(source):
        print(f"note: {note}", file=sys.stderr)
    manifest = write_shards(
        source,
        args.out,
        prefix=args.prefix,
        max_bytes=int(args.max_shard_mb * 2**20),
        max_samples=args.max_samples,
        resize=args.resize,
        jpeg_quality=args.jpeg_quality,
        num_workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    dropped = sum(n for r, n in manifest.dropped.items() if r != "empty_caption_text")
    print(f"wrote {manifest.num_samples:,} samples in {len(manifest.shards)} shards to {args.out}")
    print(f"dropped {dropped:,} inputs" + (":" if manifest.dropped else ""))
    for reason, n in sorted(manifest.dropped.items()):
        print(f"  {reason:<24} {n:,}")
    if manifest.oversized_samples:
        print(
            f"{manifest.oversized_samples} samples were larger than --max-shard-mb alone (each in its own shard)"
        )
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare training data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    register_build(data_sub)
    p = data_sub.add_parser(
        "shards",
        help="write webdataset shards from a CSV/TSV/JSONL table, an image folder with .txt captions, or shards",
    )
    p.add_argument("src", help="table, image folder or shards (several joined with '::')")
    p.add_argument("out", help="output folder (gets shard-000000.tar, ... and manifest.json)")
    p.add_argument("--max-shard-mb", type=float, default=256.0, help="shard size bound in MiB (default 256)")
    p.add_argument(
        "--max-samples", type=int, default=10_000, help="samples per shard at most (default 10000)"
    )
    p.add_argument(
        "--resize", type=int, default=None, help="downscale images so the shorter side is at most S"
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs (default 90)")
    p.add_argument(
        "--image-column", default=None, help="table column holding image paths (default: detected)"
    )
    p.add_argument("--caption-column", default=None, help="table column holding captions (default: detected)")
    p.add_argument("--caption-separator", default=None, help="split a caption field into several captions")
    p.add_argument("--root", default=None, help="folder image paths are relative to (default: the table's)")
    p.add_argument("--report-bad-rows", action="store_true", help="count malformed rows instead of stopping")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    p.add_argument("--workers", type=int, default=0, help="decode images in this many processes")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data_shards)
