"""ONNX Runtime vs PyTorch throughput on the CPU: each tower of the demo's architecture (``small``) and of
ViT-B/32, exported with ``clipforge export onnx`` and run by :class:`clipforge.export.runtime.OnnxCLIP`.

Inputs are real: the built-in data set's test images (clip art and emoji thumbnails, preprocessed by the model's
own transform) and their captions. Both backends run in this process on the same number of threads (torch's
intra-op pool and onnxruntime's), calls alternating, after a warm-up; medians of the timed rounds, and the
ratio ORT/PyTorch. PyTorch runs as users run it: eval mode, ``torch.inference_mode``, fast paths on. Each
onnxruntime graph-optimisation level in ``--optimization`` is a case of its own. Before timing, the outputs are
compared (max |Δ|). Random weights: throughput does not depend on their values.

    python benchmarks/bench_onnx.py                        # ~10 min on 2 busy cores
    python benchmarks/bench_onnx.py --quick                # ~3 min: small only, 3 rounds
    python benchmarks/bench_onnx.py --json docs/results/onnx.json
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import clipforge
from clipforge.data.builtin import builtin_split_shards
from clipforge.export.onnx import export_onnx
from clipforge.export.runtime import OnnxCLIP
from clipforge.inference import RandomWeightsWarning, load_model
from common import (
    describe_machine,
    machine_info,
    max_abs_diff,
    set_threads,
    table,
    time_alternating,
    write_json,
)


def real_pairs(count: int) -> tuple[list[Image.Image], list[str]]:
    """The first ``count`` (image, caption) pairs of the built-in test shards (both sources, interleaved)."""
    images, captions = [], []
    for shard in builtin_split_shards("test"):
        with tarfile.open(shard) as archive:
            members = {m.name: m for m in archive.getmembers()}
            for name in sorted(members):
                stem, ext = name.rsplit(".", 1)
                if ext not in ("png", "jpg", "jpeg") or f"{stem}.txt" not in members:
                    continue
                image = Image.open(io.BytesIO(archive.extractfile(members[name]).read())).convert("RGB")
                images.append(image)
                captions.append(archive.extractfile(members[f"{stem}.txt"]).read().decode().split("\n")[0])
                if len(images) >= count:
                    return images, captions
    return images, captions


def bench_model(name: str, args: argparse.Namespace, pairs, folder: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = load_model(name)
    export_onnx(model, folder)
    transform = clipforge.get_transforms(model)
    images = torch.stack([transform(image) for image in pairs[0][: args.image_batch]])
    tokens = clipforge.get_tokenizer(model, on_overflow="truncate")(pairs[1][: args.text_batch])
    runtimes = {
        level: OnnxCLIP(folder, threads=args.threads, optimization=level) for level in args.optimization
    }
    result: dict[str, Any] = {"image_batch": len(images), "text_batch": len(tokens)}
    lengths = tokens.argmax(-1) + 1
    result["text_tokens"] = {"mean": float(lengths.float().mean()), "max": int(lengths.max())}
    for tower, inputs in (("image", images), ("text", tokens)):
        encode = "encode_image" if tower == "image" else "encode_text"

        def torch_call(encode=encode, inputs=inputs):
            with torch.inference_mode():
                return getattr(model, encode)(inputs)

        cases = {"pytorch": torch_call}
        for level, runtime in runtimes.items():
            cases[f"ort-{level}"] = lambda r=runtime, e=encode, x=inputs: getattr(r, e)(x)
        reference = torch_call()
        deltas = {case: max_abs_diff(fn(), reference) for case, fn in cases.items() if case != "pytorch"}
        timings = time_alternating(cases, repeats=args.repeats, warmup=1, progress=False)
        per_second = {case: len(inputs) / timings.median(case) for case in cases}
        result[tower] = {
            "per_second": per_second,
            "ratio_ort_over_pytorch": {
                c: v / per_second["pytorch"] for c, v in per_second.items() if c != "pytorch"
            },
            "max_abs_diff": deltas,
            "seconds": timings.seconds,
        }
        best = max(result[tower]["ratio_ort_over_pytorch"].items(), key=lambda item: item[1])
        print(f"{name} {tower}: pytorch {per_second['pytorch']:.1f}/s, best ORT ({best[0]}) {best[1]:.2f}x")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="small,ViT-B-32", help="comma-separated architectures")
    parser.add_argument("--threads", type=int, default=2, help="threads for both backends (default 2)")
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians reported)")
    parser.add_argument("--optimization", default="all,basic", help="onnxruntime graph optimisation levels")
    parser.add_argument("--quick", action="store_true", help="small only, 3 rounds")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    args.optimization = args.optimization.split(",")
    models = ["small"] if args.quick else args.models.split(",")
    args.repeats = 3 if args.quick else args.repeats
    threads = set_threads(args.threads)
    info = machine_info(torch.device("cpu"), threads)
    print(describe_machine(info))
    pairs = real_pairs(max(args.image_batch, args.text_batch))
    results: dict[str, Any] = {"machine": info, "settings": vars(args), "data": "built-in test shards"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            results[name] = bench_model(name, args, pairs, Path(tmp) / name)
    rows = []
    for name in models:
        for tower in ("image", "text"):
            entry = results[name][tower]
            for case, ratio in entry["ratio_ort_over_pytorch"].items():
                rows.append((f"{name} {tower}", case, f"{entry['per_second']['pytorch']:.1f}",
                             f"{entry['per_second'][case]:.1f}", f"{ratio:.2f}x", f"{entry['max_abs_diff'][case]:.1e}"))  # fmt: skip
    print(table(rows, ["tower", "ORT case", "PyTorch /s", "ORT /s", "ORT/PyTorch", "max |Δ|"]))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
