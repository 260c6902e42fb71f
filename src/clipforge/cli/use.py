"""`clipforge classify`, `embed` and `search`: using a model (any checkpoint clipforge loads) on your own images
and texts. Parsing and printing only; the work is in :mod:`clipforge.inference` and :mod:`clipforge.search`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _load_model(spec: str, device: str | None, backend: str = "torch") -> Any:
    """The model, with the random-weights warning printed loudly on stderr (not as a Python warning line)."""
    from clipforge.device import resolve_device
    from clipforge.inference import load_model

    with loud_random_weights():
        where = resolve_device(device) if backend == "torch" or device else None
        return load_model(spec, device=where, backend=backend)


@contextlib.contextmanager
def loud_random_weights() -> Iterator[None]:
    """Inside the block, a :class:`~clipforge.inference.RandomWeightsWarning` is printed as one ``WARNING:`` line
    on stderr, not as a Python warning with its source line; other warnings pass through."""
    from clipforge.inference import RandomWeightsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, RandomWeightsWarning):
            print(f"WARNING: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _report_failures(failures: Sequence[Any], total: int, done: int, verb: str) -> None:
    """Each failed image (name + reason) and a summary line, on stderr."""
    for failure in failures:
        print(f"skipped ({failure.reason}) {failure.message}", file=sys.stderr)
    if failures:
        reasons = ", ".join(
            f"{reason} {n}" for reason, n in sorted(Counter(f.reason for f in failures).items())
        )
        print(f"{verb} {done} of {total} images; {len(failures)} failed ({reasons})", file=sys.stderr)


def _check_top_k(top_k: int) -> int:
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    return top_k


# ----------------------------------------------------------------------------------------------------------------
# classify


def read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """Labels from ``--labels 'a cat,a dog'`` (comma-separated, stripped) or ``--labels-file`` (one per line;
    blank lines and surrounding whitespace are ignored). Empty items of a comma list are an error."""
    if labels_file is not None:
        path = Path(labels_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: labels file not found; pass a text file with one label per line"
            ) from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: the labels file is not UTF-8 text ({exc})") from exc
        found = [line.strip() for line in text.splitlines() if line.strip()]
        if not found:
            raise ValueError(f"{path}: the labels file holds no labels; write one label per line")
        return found
    items = [item.strip() for item in (labels or "").split(",")]
    if items == [""]:
        raise ValueError("the label list is empty; pass --labels 'a cat,a dog' or --labels-file FILE")
    empty = [i + 1 for i, item in enumerate(items) if not item]
    if empty:
        raise ValueError(
            f"--labels item {empty[0]} of {len(items)} is empty (two commas in a row, or a trailing comma); "
            "remove it, or use --labels-file for labels that contain commas"
        )
    return items


def _cmd_classify(args: argparse.Namespace) -> int:
    from clipforge.eval.zeroshot import zero_shot_probabilities
    from clipforge.features import encode_image_batches
    from clipforge.inference import find_images, iter_image_batches, label_classifier
    from clipforge.tokenizer import get_tokenizer
    from clipforge.transforms import get_transforms

    labels = read_labels(args.labels, args.labels_file)
    top_k = min(_check_top_k(args.top_k), len(labels))
    paths = find_images(args.images)
    model = _load_model(args.model, args.device, args.backend)
    tokenizer, transform = get_tokenizer(model), get_transforms(model)
    classifier = label_classifier(model, tokenizer, labels, args.template)
    logit_scale = float(model.logit_scale.detach().exp())
    results: list[dict[str, Any]] = []
    failures = []
    batches = iter_image_batches(paths, transform, batch_size=args.batch_size, workers=args.workers)
    for batch, features in encode_image_batches(model, batches, pixels=lambda b: b.pixels, normalize=False):
        failures += [failure for _, failure in batch.failures]
        if features is None:
            continue
        probs = zero_shot_probabilities(features, classifier, logit_scale).cpu()
        for index, row in zip(batch.indices, probs):
            values, order = row.topk(top_k)
            top = [{"label": labels[j], "prob": float(p)} for p, j in zip(values, order.tolist())]
            results.append({"image": str(paths[index]), "top": top})
            if not args.json:
                print(str(paths[index]))
                for entry in top:
                    print(f"  {entry['prob']:.4f}  {entry['label']}")
    _report_failures(failures, len(paths), len(results), "classified")
    if not results:
        raise ValueError(f"all {len(paths)} images failed to load; nothing was classified")
    if args.json:
        report = {
            "model": str(args.model),
            "labels": labels,
            "template": args.template,
            "logit_scale": float(logit_scale),
            "counts": {"images": len(paths), "classified": len(results), "failed": len(failures)},
            "results": results,
            "failed": [{"image": f.key, "reason": f.reason, "message": f.message} for f in failures],
        }
        print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# embed


def read_texts(items: Sequence[str]) -> list[str]:
    """Texts from ``--texts``: an item naming an existing file gives its non-blank lines (stripped of the line
    break only); any other item is a text itself."""
    texts: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: the texts file is not UTF-8 text ({exc})") from exc
            found = [line for line in lines if line.strip()]
            if not found:
                raise ValueError(f"{path}: the texts file holds no text; write one text per line")
            if len(found) < len(lines):
                print(
                    f"{path}: {len(found)} texts ({len(lines) - len(found)} blank lines ignored)",
                    file=sys.stderr,
                )
            texts += found
        else:
            texts.append(item)
    return texts


def _cmd_embed(args: argparse.Namespace) -> int:
    from clipforge.inference import (
        check_embeddings_path,
        embed_images,
        embed_texts,
        find_images,
        write_embeddings,
    )
    from clipforge.tokenizer import get_tokenizer
    from clipforge.transforms import get_transforms

    out = check_embeddings_path(args.out)
    if args.images is not None:
        paths = find_images(args.images)
        model = _load_model(args.model, args.device, args.backend)
        result = embed_images(
            model,
            get_transforms(model),
            paths,
            normalize=args.normalize,
            batch_size=args.batch_size,
            workers=args.workers,
        )
        _report_failures(result.failures, len(paths), len(result.keys), "embedded")
        keys, embeddings = result.keys, result.embeddings
    else:
        keys = read_texts(args.texts)
        model = _load_model(args.model, args.device, args.backend)
        embeddings = embed_texts(
            model, get_tokenizer(model), keys, normalize=args.normalize, batch_size=args.batch_size
        )
    written = write_embeddings(out, keys, embeddings)
    state = "L2-normalised" if args.normalize else "unnormalised"
    print(
        f"wrote {len(keys)} {state} embeddings of dimension {embeddings.shape[1]} (float32) to {written[0]}"
    )
    for extra in written[1:]:
        print(f"keys: {extra}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# search


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/clipforge/search``, or ``~/.cache/clipforge/search``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipforge" / "search"


def _cmd_search(args: argparse.Namespace) -> int:
    from clipforge.features import model_fingerprint
    from clipforge.inference import embed_images, find_images
    from clipforge.search import default_cache_path, embed_images_cached, search, write_montage
    from clipforge.tokenizer import get_tokenizer
    from clipforge.transforms import get_transforms

    top_k = _check_top_k(args.top_k)
    if not args.query.strip():
        raise ValueError("the search query is empty; pass some text to search for")
    paths = find_images(args.images)
    model = _load_model(args.model, args.device, args.backend)
    transform = get_transforms(model)
    options = {"batch_size": args.batch_size, "workers": args.workers}
    if args.no_cache:
        result = embed_images(model, transform, paths, **options)
        source = f"{len(result.keys)} encoded, no cache"
    else:
        identity = model_fingerprint(model)
        cache = (
            Path(args.cache)
            if args.cache
            else default_cache_path(args.images, identity, default_cache_root())
        )
        result, stats = embed_images_cached(model, transform, paths, cache, identity, **options)
        why = f"; cache not used: {stats.note}" if stats.note and stats.reused == 0 else ""
        source = f"{stats.reused} from cache, {stats.encoded} encoded{why}; cache {cache}"
    _report_failures(result.failures, len(paths), len(result.keys), "searched")
    hits = search(model, get_tokenizer(model), args.query, result.embeddings, result.keys, top_k)
    print(f"query {args.query!r}: {len(result.keys)} images ({source})")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:3d}. {hit.score:.4f}  {hit.key}")
    if args.montage:
        print(f"montage: {write_montage(args.montage, args.query, hits)}")
    return 0


# ----------------------------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    def add_model_options(p: argparse.ArgumentParser, batch_size: int) -> None:
        p.add_argument(
            "--model",
            required=True,
            help="checkpoint file or folder (clipforge, OpenAI/open_clip, Hugging Face); an architecture name "
            "such as 'tiny' gives RANDOM weights, for testing only",
        )
        p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        p.add_argument(
            "--batch-size", type=int, default=batch_size, help=f"items per forward pass ({batch_size})"
        )
        p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
        p.add_argument(
            "--backend", choices=["torch", "onnxruntime"], default="torch",
            help="onnxruntime: --model is a folder from `clipforge export onnx` (CPU)",
        )  # fmt: skip

    p = sub.add_parser(
        "classify",
        help="zero-shot classify images against free-text labels",
        description="Print, per image, the labels sorted by probability (softmax of logit_scale x cosine).",
    )
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated labels, e.g. 'a cat,a dog'")
    labels.add_argument("--labels-file", help="a UTF-8 text file with one label per line")
    p.add_argument(
        "--template", default=None, help="prompt template with {} for the label, e.g. 'a photo of a {}.'"
    )
    p.add_argument("--top-k", type=int, default=5, help="labels shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON report instead of text")
    add_model_options(p, batch_size=32)
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser(
        "embed",
        help="write image or text embeddings (.npy + .keys.txt, .npz, .parquet)",
        description="Embed images or texts in batches and write float32 embeddings with their keys.",
    )
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", help="image files or folders (searched recursively)")
    inputs.add_argument(
        "--texts", nargs="+", help="texts, or text files with one text per line (an existing path is read)"
    )
    p.add_argument("--out", required=True, help="FILE.npy (+ FILE.keys.txt), FILE.npz or FILE.parquet")
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="L2-normalise the embeddings (default: yes)",
    )
    add_model_options(p, batch_size=64)
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser(
        "search",
        help="find the images in a folder that best match a text",
        description="Rank a folder's images by cosine similarity to a text query; embeddings are cached.",
    )
    p.add_argument("query", help="the text to search for")
    p.add_argument("--images", nargs="+", required=True, help="image folder(s) or files")
    p.add_argument("--top-k", type=int, default=8, help="hits to show (default 8)")
    p.add_argument("--montage", default=None, help="write a PNG grid of the hits here")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache", default=None, help="embedding cache file (default: under ~/.cache/clipforge)"
    )
    cache.add_argument("--no-cache", action="store_true", help="embed every image, read and write no cache")
    add_model_options(p, batch_size=64)
    p.set_defaults(func=_cmd_search)
