"""`clipforge index build|update|search|info`: a persistent image index (:mod:`clipforge.index`). Parsing and
printing only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _encode_options(args: argparse.Namespace, precision: str) -> Any:
    from clipforge.index import EncodeOptions

    return EncodeOptions(args.batch_size, args.workers, precision, args.chunk_size, not args.no_progress)


def _search_options(args: argparse.Namespace) -> Any:
    from clipforge.index import APPROXIMATE_THRESHOLD, SearchOptions

    threshold = APPROXIMATE_THRESHOLD if args.threshold is None else args.threshold
    if threshold < 0:
        raise ValueError(f"--threshold must be 0 or more, got {threshold}")
    return SearchOptions(exact=args.exact, threshold=threshold)


def _print_report(report: Any, verb: str) -> None:
    for failure in report.failures:
        print(f"skipped ({failure.reason}) {failure.message}", file=sys.stderr)
    print(
        f"{verb} {report.folder}: {report.count} images ({report.encoded} encoded, {report.reused} reused, "
        f"{report.removed} removed, {len(report.failures)} failed) in {report.seconds:.1f} s"
    )
    print(_describe_search(report.search, report.count))


def _describe_search(search: Any, count: int) -> str:
    if search.kind == "exact":
        return f"search: exact ({count} vectors)"
    params = ", ".join(f"{k}={v}" for k, v in search.params.items())
    return (
        f"search: approximate ({search.kind}, {params}); recall@10 against exact {search.recall_at_10:.3f} "
        f"on {search.recall_queries} sampled queries"
    )


def _cmd_build(args: argparse.Namespace) -> int:
    from clipforge.cli.use import _load_model
    from clipforge.index import build_index
    from clipforge.index.layout import check_folder
    from clipforge.transforms import get_transforms

    check_folder(Path(args.out))
    model = _load_model(args.model, args.device, args.backend)
    report = build_index(
        args.images, model, get_transforms(model), args.out, model_spec=args.model,
        encode=_encode_options(args, args.precision), search=_search_options(args),
    )  # fmt: skip
    _print_report(report, "built")
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    from clipforge.cli.use import _load_model
    from clipforge.index import IndexFormatError, update_index
    from clipforge.index.layout import read_manifest
    from clipforge.transforms import get_transforms

    manifest = read_manifest(Path(args.index))
    if manifest is None:
        raise IndexFormatError(
            f"{args.index}: no index here (no index.json); build one with clipforge index build"
        )
    model = _load_model(args.model or manifest.model_spec, args.device, args.backend)
    report = update_index(
        args.index, model, get_transforms(model), args.images or None,
        encode=_encode_options(args, manifest.model.precision), search=_search_options(args),
    )  # fmt: skip
    _print_report(report, "updated")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from clipforge.cli.use import _load_model
    from clipforge.index import Index
    from clipforge.tokenizer import get_tokenizer
    from clipforge.transforms import get_transforms

    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    if args.text is not None and not args.text.strip():
        raise ValueError("--text is empty; pass some text to search for")
    index = Index.open(args.index, exact=args.exact)
    model = _load_model(args.model or index.manifest.model_spec, args.device, args.backend)
    if args.text is not None:
        hits = index.search_text(model, get_tokenizer(model), args.text, args.k)
    else:
        hits = index.search_image(model, get_transforms(model), args.image, args.k)
    if args.json:
        query = {"text": args.text} if args.text is not None else {"image": args.image}
        rows = [{"id": h.id, "path": h.path, "score": h.score} for h in hits]
        print(json.dumps({"index": str(args.index), "query": query, "k": args.k, "hits": rows}, indent=2))
    else:
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:3d}. {hit.score:.4f}  id {hit.id}  {hit.path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from clipforge.index import Index

    index = Index.open(args.index, exact=True)
    manifest = index.manifest
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False))
        return 0
    model = manifest.model
    print(f"index: {index.folder} (generation {manifest.generation})")
    print(f"images: {manifest.count} (+{len(manifest.failures)} that failed to load)")
    print(f"vectors: float32 [{manifest.count}, {model.embed_dim}]")
    print(f"model: {model.describe()} from {manifest.model_spec}; fingerprint {model.fingerprint}")
    print(f"sources: {', '.join(manifest.sources)}")
    print(_describe_search(manifest.search, manifest.count))
    return 0


def _add_encoding(p: argparse.ArgumentParser, *, precision: bool) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: --model is a folder from `clipforge export onnx` (CPU)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    if precision:
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="autocast precision of the image tower (default fp32)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=512,
                   help="images encoded between two commits: a killed build loses at most this many (default 512)")  # fmt: skip
    p.add_argument("--exact", action="store_true", help="never build an approximate index")
    p.add_argument("--threshold", type=int, default=None,
                   help="build an approximate (faiss) index above this many images (default 50000)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "index", help="a persistent image index: build, update, search, info",
        description="Embed an image collection once into an index folder, then search it by text or image.",
    )  # fmt: skip
    jobs = parser.add_subparsers(dest="index_command", required=True)

    p = jobs.add_parser("build", help="index image files and folders (rerun a killed build to continue it)")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--model", required=True, help="checkpoint path, or an architecture name (random weights)")
    p.add_argument("--out", required=True, help="the index folder to create")
    _add_encoding(p, precision=True)
    p.set_defaults(func=_cmd_build)

    p = jobs.add_parser("update", help="re-scan: encode new and changed files, drop removed ones")
    p.add_argument("index", help="the index folder")
    p.add_argument("images", nargs="*", help="files or folders to index instead of those it was built from")
    p.add_argument("--model", default=None, help="the model (default: the one the index was built with)")
    _add_encoding(p, precision=False)
    p.set_defaults(func=_cmd_update)

    p = jobs.add_parser("search", help="the images closest to a text or an image")
    p.add_argument("index", help="the index folder")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="the text to search for")
    query.add_argument("--image", help="an image file to search by")
    p.add_argument("-k", type=int, default=10, help="results to show (default 10)")
    p.add_argument("--model", default=None, help="the model (default: the one the index was built with)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: --model is a folder from `clipforge export onnx` (CPU)")  # fmt: skip
    p.add_argument(
        "--exact", action="store_true", help="search exactly even if an approximate index is stored"
    )
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=_cmd_search)

    p = jobs.add_parser("info", help="what an index holds: count, model, search settings and recall")
    p.add_argument("index", help="the index folder")
    p.add_argument("--json", action="store_true", help="print index.json")
    p.set_defaults(func=_cmd_info)


__all__ = ["register"]
