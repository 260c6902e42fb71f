"""The image index: build throughput (images/s) over real images, and search latency (exact and approximate) at
10k and 1M vectors.

Build: the built-in dataset's real images (emoji and openclipart renderings, every split; repeated under new
names when more are asked for) written to a folder, then ``clipforge.index.build_index`` timed cold (decode +
encode + chunk commits + publish) against ``encode_image_files`` alone on the same files, and an
``update_index`` with nothing changed (the re-scan alone).
Search: synthetic clustered, L2-normalised vectors (D=512, ViT-B/32's width); per size, one query at a time
(p50/p99 over the queries) and a batch of 16, exact (``exact_top_k``, a matrix product) and approximate (the
faiss IVF-Flat index ``build_approximate`` tunes to recall@10 >= 0.95; its build time and recall reported).
Synthetic vectors are harder for an inverted file than CLIP features (their clusters overlap more), so the
probe counts here are an upper bound for real collections.

    python benchmarks/bench_index.py                          # 2,000 images with tiny; 10k and 1M vectors
    python benchmarks/bench_index.py --quick                  # 500 images; 10k and 100k vectors
    python benchmarks/bench_index.py --model ViT-B-32 --images 1000 --sizes 10000
"""

from __future__ import annotations

import argparse
import logging
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from clipforge.data.builtin import builtin_dataset_path
from clipforge.features import encode_image_files
from clipforge.index import EncodeOptions, SearchOptions, build_index, recall_at_10, update_index
from clipforge.index.approximate import build_approximate, exact_top_k
from clipforge.inference import RandomWeightsWarning, find_images, load_model
from clipforge.transforms import get_transforms
from common import (
    add_common_arguments,
    describe_machine,
    machine_info,
    pick_device,
    set_threads,
    table,
    write_json,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def write_builtin_images(folder: Path, count: int) -> int:
    """``count`` image files from the built-in dataset's shards (repeated under new names past its size)."""
    payloads = []
    for shard in sorted(builtin_dataset_path().rglob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                if member.name.lower().endswith(IMAGE_SUFFIXES):
                    payloads.append((Path(member.name).suffix, archive.extractfile(member).read()))
    if not payloads:
        raise SystemExit("the built-in dataset has no images; is clipforge installed with its package data?")
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        suffix, data = payloads[number % len(payloads)]
        (folder / f"{number:07d}{suffix}").write_bytes(data)
    return len(payloads)


def bench_build(args: argparse.Namespace, device: torch.device) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = load_model(args.model, device=device)
    transform = get_transforms(model)
    with tempfile.TemporaryDirectory() as tmp:
        distinct = write_builtin_images(Path(tmp) / "images", args.images)
        encode = EncodeOptions(batch_size=args.batch_size, workers=args.workers, progress=False)
        started = time.perf_counter()  # the bare encode path, for the index's own overhead
        encode_image_files(model, transform, find_images([Path(tmp) / "images"]), batch_size=args.batch_size,
                           workers=args.workers, progress=False)  # fmt: skip
        bare_seconds = time.perf_counter() - started
        started = time.perf_counter()
        report = build_index([Path(tmp) / "images"], model, transform, Path(tmp) / "index",
                             model_spec=args.model, encode=encode, search=SearchOptions(exact=True))  # fmt: skip
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        update_index(Path(tmp) / "index", model, transform, encode=encode, search=SearchOptions(exact=True))
        rescan_seconds = time.perf_counter() - started
    return {
        "model": args.model, "images": report.count, "distinct_images": distinct, "failed": len(report.failures),
        "batch_size": args.batch_size, "workers": args.workers,
        "build_seconds": build_seconds, "build_images_per_s": report.count / build_seconds,
        "rescan_seconds": rescan_seconds, "encode_only_images_per_s": report.count / bare_seconds,
    }  # fmt: skip


def clustered(n: int, dim: int, seed: int, centers: int = 1000) -> np.ndarray:
    """Unit vectors around ``centers`` random means (made in blocks so 1M x 512 needs no extra copy)."""
    means = np.random.default_rng(12345).standard_normal((centers, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = means[rng.integers(0, centers, stop - start)]
        block += 0.6 * rng.standard_normal(block.shape).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _latencies(search, queries: np.ndarray, k: int) -> dict:
    times = []
    for query in queries:
        started = time.perf_counter()
        search(query[None], k)
        times.append(time.perf_counter() - started)
    batch = queries[:16]
    started = time.perf_counter()
    search(batch, k)
    batch_ms = (time.perf_counter() - started) * 1e3
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "batch16_ms": batch_ms}  # fmt: skip


def bench_search(size: int, dim: int, queries: int, k: int) -> list[dict]:
    vectors = clustered(size, dim, seed=0)
    asked = clustered(queries, dim, seed=1)
    rows = [{"size": size, "kind": "exact", **_latencies(lambda q, k: exact_top_k(vectors, q, k), asked, k)}]
    started = time.perf_counter()
    approximate, settings = build_approximate(vectors)
    build_seconds = time.perf_counter() - started
    _, truth = exact_top_k(vectors, asked, 10)
    _, found = approximate.search(asked, 10)

    rows.append({
        "size": size, "kind": f"{settings.kind} {settings.params}", "build_seconds": build_seconds,
        "recall_at_10_tuned": settings.recall_at_10, "recall_at_10_new_queries": recall_at_10(truth, found),
        **_latencies(approximate.search, asked, k),
    })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, "500 images; 10k and 100k vectors (unless --sizes is given)")
    parser.add_argument("--model", default="tiny", help="checkpoint or architecture name (default tiny)")
    parser.add_argument("--images", type=int, default=2000, help="images to index (default 2000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="image-decoding workers (default 1)")
    parser.add_argument("--sizes", default="10000,1000000", help="vector counts to search (default 10k,1M)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200, help="single queries timed per case")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.images = args.images if args.images != parser.get_default("images") else 500
        args.queries = args.queries if args.queries != parser.get_default("queries") else 100
        args.sizes = args.sizes if args.sizes != parser.get_default("sizes") else "10000,100000"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    info = machine_info(device, threads)
    print(describe_machine(info))
    build = bench_build(args, device)
    print(f"\nbuild: {build['images']} images with {build['model']} in {build['build_seconds']:.1f} s = "
          f"{build['build_images_per_s']:.0f} images/s (encode_image_files alone: "
          f"{build['encode_only_images_per_s']:.0f} images/s); re-scan with nothing changed {build['rescan_seconds']:.2f} s")  # fmt: skip
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        results += bench_search(size, args.dim, args.queries, args.k)
        print(f"{size} vectors: " + "; ".join(f"{r['kind']} p50 {r['p50_ms']:.2f} ms" for r in results[-2:]))
    header = ["vectors", "search", "p50 ms", "p99 ms", "16 queries ms", "recall@10", "build s"]
    print("\n" + table([[r["size"], r["kind"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['batch16_ms']:.1f}",
                         f"{r.get('recall_at_10_new_queries', 1.0):.3f}", f"{r.get('build_seconds', 0):.1f}"]
                        for r in results], header))  # fmt: skip
    write_json(args.json, {"machine": info, "build": build, "search": results})


if __name__ == "__main__":
    main()
