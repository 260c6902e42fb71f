"""Pretrained towers (LiT): throughput of clipforge's EfficientNet-Lite0 and MiniLM-L6 towers against their
reference packages, on the same weights, inputs and threads, and what the locked-feature cache saves.

Cases: EfficientNet-Lite0 features (eval, no autograd) at 64, 96, 128 and 224 px, batch 32, fp32 and bf16
autocast, against ``efficientnet_lite_pytorch`` built for the same size; MiniLM sentence features on the built-in
dataset's real captions, batch 256, tokenization included, against ``sentence_transformers.encode``; and a
locked LiT forward (``lit-effnet-minilm`` at 128 px, both towers locked) with a cold and a warm feature cache.
Outputs are compared (max |Δ|) before timing.

    python benchmarks/bench_towers.py            # ~4 min on 2 cores
    python benchmarks/bench_towers.py --quick    # ~1 min
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

import clipforge
from clipforge.model.towers import TOWERS, package_folder, tower_files
from clipforge.train.feature_cache import FeatureCache
from common import (
    add_common_arguments,
    autocast_context,
    describe_machine,
    machine_info,
    max_abs_diff,
    pick_device,
    set_threads,
    table,
    time_alternating,
    write_json,
)

SIZES = (64, 96, 128, 224)


def builtin_captions(n: int) -> list[str]:
    """``n`` real captions from the built-in dataset's training shards (both sources, interleaved)."""
    from clipforge.data.builtin import builtin_split_shards
    from clipforge.data.raw import RawSample
    from clipforge.data.shards import iter_shard

    captions = [c for shard in builtin_split_shards("train") for s in iter_shard(shard)
                if isinstance(s, RawSample) for c in s.captions]  # fmt: skip
    captions = list(dict.fromkeys(captions))
    return [captions[i * 7 % len(captions)] for i in range(n)]


def image_rows(model, device, repeats: int, batch: int, precisions: list[str]) -> list[dict]:
    from efficientnet_lite_pytorch import EfficientNet

    spec = TOWERS["efficientnet-lite0"]
    weights = str(package_folder(spec) / spec.weights)
    ours = model.visual.encoder.to(device).eval()
    rows = []
    for size in SIZES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=weights, image_size=size
            )
        reference = reference.to(device).eval()
        images = torch.randn(batch, 3, size, size, device=device)
        with torch.inference_mode():
            expected = reference._avg_pooling(reference.extract_features(images)).flatten(1)
            diff = max_abs_diff(ours(images), expected)
        for precision in precisions:
            context = autocast_context(precision, device)

            def run(fn, images=images, context=context):
                with torch.inference_mode(), context:
                    fn(images)

            timings = time_alternating(
                {"clipforge": lambda: run(ours), "reference": lambda ref=reference: run(ref.extract_features)},
                repeats, device=device, progress=False,
            )  # fmt: skip
            mine, theirs = timings.median("clipforge"), timings.median("reference")
            best = timings.spread("clipforge")[0]  # the fastest call: what a quiet machine gives
            rows.append({"size": size, "precision": precision, "clipforge_img_s": batch / mine,
                         "clipforge_best_img_s": batch / best, "reference_img_s": batch / theirs,
                         "ratio": theirs / mine, "max_abs_diff": diff})  # fmt: skip
            print(
                f"  {size:3d} px {precision:13s} clipforge {batch / mine:7.1f} img/s, reference {batch / theirs:7.1f}"
            )
    return rows


def text_rows(model, device, repeats: int, batch: int) -> list[dict]:
    from sentence_transformers import SentenceTransformer

    texts = builtin_captions(batch)
    tokenizer = clipforge.get_tokenizer(model)
    encoder = model.text.encoder.to(device).eval()
    reference = SentenceTransformer(str(tower_files(TOWERS["minilm-l6"])), device=str(device))

    def ours():
        with torch.inference_mode():
            return encoder(tokenizer(texts).to(device))

    def theirs():
        return reference.encode(texts, batch_size=batch, convert_to_tensor=True)

    diff = max_abs_diff(ours(), theirs())
    timings = time_alternating(
        {"clipforge": ours, "reference": theirs}, repeats, device=device, progress=False
    )
    mine, ref = timings.median("clipforge"), timings.median("reference")
    lengths = (tokenizer(texts) != 0).sum(1).float()
    print(f"  MiniLM: clipforge {batch / mine:.0f} texts/s, sentence-transformers {batch / ref:.0f} texts/s")
    return [{"batch": batch, "mean_tokens": float(lengths.mean()), "clipforge_texts_s": batch / mine,
             "reference_texts_s": batch / ref, "ratio": ref / mine, "max_abs_diff": diff}]  # fmt: skip


def cache_rows(device, repeats: int, batch: int) -> list[dict]:
    model = clipforge.create_model("lit-effnet-minilm", vision={"image_size": 128}).to(device)
    model.lock("text")
    model.lock("image")
    model.eval()
    images = torch.randn(batch, 3, 128, 128, device=device)
    tokens = clipforge.get_tokenizer(model)(builtin_captions(batch)).to(device)

    def forward():
        with torch.no_grad():
            model(images, tokens)

    def cold():
        model.visual.feature_cache, model.text.feature_cache = FeatureCache(1 << 30), FeatureCache(1 << 30)
        forward()

    cold()  # leaves the caches filled for the warm case
    warm_caches = (model.visual.feature_cache, model.text.feature_cache)

    def warm():
        model.visual.feature_cache, model.text.feature_cache = warm_caches
        forward()

    timings = time_alternating({"cold": cold, "warm": warm}, repeats, device=device, progress=False)
    c, w = timings.median("cold"), timings.median("warm")
    print(
        f"  locked LiT forward, batch {batch} at 128 px: cold cache {c * 1e3:.0f} ms, warm {w * 1e3:.1f} ms"
    )
    return [{"batch": batch, "image_size": 128, "cold_ms": c * 1e3, "warm_ms": w * 1e3, "speedup": c / w}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per case (default 5, quick 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    precisions = ["fp32"] if args.quick else ["fp32", "bf16-autocast"]
    info = machine_info(device, threads)
    print(describe_machine(info))
    model = clipforge.create_model("lit-effnet-minilm")
    print("EfficientNet-Lite0 features, batch 32:")
    images = image_rows(model, device, repeats, 32, precisions)
    print("MiniLM-L6 sentence features, batch 256 (tokenization included):")
    texts = text_rows(model, device, repeats, 256)
    print("feature cache:")
    cache = cache_rows(device, repeats, 32)
    print(table([[r["size"], r["precision"], f"{r['clipforge_img_s']:.1f}", f"{r['clipforge_best_img_s']:.1f}",
                  f"{r['reference_img_s']:.1f}", f"{r['ratio']:.2f}x", f"{r['max_abs_diff']:.1e}"] for r in images],
                ["px", "precision", "clipforge img/s", "best call", "reference img/s", "ratio (medians)",
                 "max |Δ| fp32"]))  # fmt: skip
    write_json(args.json, {"machine": info, "image": images, "text": texts, "cache": cache})


if __name__ == "__main__":
    main()
