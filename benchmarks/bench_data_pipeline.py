"""Data pipeline: decode + augment throughput vs what the training step consumes, at the training benchmark's
config (``small``: 64 px crops, batch 256), with the trainer's default DataLoader workers (2).

1. Shards are written once from real images (Debian's tuxpaint-stamps PNGs with their English captions, the
   way ``clipforge data shards --resize 256`` writes them) or, where that package is absent, from synthetic
   320x240 JPEGs; ``--data`` uses your own shards or table instead.
2. Loader alone: ``TrainStream`` (read, decode, random-resized-crop, normalise, tokenize, batch) through a
   DataLoader as the trainer builds it; images/s after the first batch, for 0 and the default workers.
3. Trainer alone: ``compute_gradients`` + ``apply_update`` on one in-memory batch (bf16 autocast): pairs/s.
4. Both together, as training runs: the loader's workers and the step share the cores; the share of each
   step spent waiting for the next batch says whether training is data-bound.

    python benchmarks/bench_data_pipeline.py              # ~2 min on 2 cores
    python benchmarks/bench_data_pipeline.py --quick
    python benchmarks/bench_data_pipeline.py --data shards/ --model tiny --batch-size 128
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipforge.config import get_model_config
from clipforge.data.sources import open_source, write_shards
from clipforge.data.stream import Batch, SampleDecoder, TrainStream, default_weights
from clipforge.losses import ContrastiveLoss
from clipforge.model import CLIP, create_model
from clipforge.objectives.contrastive import compute_gradients
from clipforge.tokenizer import Tokenizer
from clipforge.train.config import DataConfig, OptimConfig
from clipforge.train.data import train_loader
from clipforge.train.optim import build_optimizer
from clipforge.train.step import apply_update
from clipforge.transforms import get_transforms
from common import (
    TUXPAINT_STAMPS,
    add_common_arguments,
    autocast_context,
    describe_machine,
    machine_info,
    pick_device,
    set_threads,
    table,
    write_json,
)


def real_image_table(folder: Path, limit: int) -> Path | None:
    """A CSV (image, caption) of tuxpaint stamps with an English first caption line, or None if absent."""
    rows = []
    for text_file in sorted(TUXPAINT_STAMPS.rglob("*.txt")) if TUXPAINT_STAMPS.is_dir() else []:
        image = text_file.with_suffix(".png")
        caption = text_file.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].strip()
        if image.is_file() and caption and "=" not in caption:
            rows.append((str(image), caption))
    if not rows:
        return None
    table_path = folder / "pairs.csv"
    with open(table_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows[:limit])
    return table_path


def synthetic_image_table(folder: Path, count: int) -> Path:
    """``count`` 320x240 JPEGs (smooth gradients plus noise, so they compress like photos) and a CSV."""
    rng = np.random.default_rng(0)
    table_path = folder / "pairs.csv"
    yy, xx = np.mgrid[0:240, 0:320]
    with open(table_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for index in range(count):
            base = rng.uniform(0, 255, size=3)
            slope = rng.uniform(-0.5, 0.5, size=(3, 2))
            pixels = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], -1)
            pixels = (pixels + rng.normal(0, 12, pixels.shape)).clip(0, 255).astype(np.uint8)
            path = folder / f"img_{index:05d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            writer.writerow([path.name, f"a synthetic picture number {index}"])
    return table_path


def prepare_shards(work: Path, count: int) -> tuple[str, str]:
    table_path = real_image_table(work, count)
    about = f"tuxpaint stamps ({TUXPAINT_STAMPS}, PNG with alpha)"
    if table_path is None:
        table_path = synthetic_image_table(work, count)
        about = "synthetic 320x240 JPEGs (tuxpaint-stamps-default not installed)"
    manifest = write_shards(open_source(table_path), work / "shards", resize=256, progress=False)
    return str(work / "shards"), f"{manifest.num_samples} {about}, shards written with resize=256"


def make_loader(spec: str, model, batch: int, workers: int, device: torch.device) -> Iterator[Batch]:
    """The trainer's input pipeline (``train/loop.py``): TrainStream through a DataLoader."""
    sources = [open_source(spec)]
    decoder = SampleDecoder(get_transforms(model, train=True), fill_color=model.config.preprocess.fill_color)
    tokenizer = Tokenizer(context_length=model.config.context_length)
    stream = TrainStream(
        sources, default_weights(sources), decoder, tokenizer, batch_size=batch, seed=0, num_workers=workers
    )
    return iter(train_loader(stream, workers, device))


def loader_throughput(spec: str, model, batch: int, workers: int, batches: int, device) -> float:
    """Images/s delivered after the first batch (worker start-up excluded)."""
    loader = make_loader(spec, model, batch, workers, device)
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch / (time.perf_counter() - start)


def training_step(model, batch: int, precision: str, device):
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5))
    loss_fn = ContrastiveLoss()

    def step(images: torch.Tensor, tokens: torch.Tensor) -> None:
        loss = compute_gradients(
            model, loss_fn, [(images, tokens)], lambda: autocast_context(precision, device)
        )
        apply_update(model, optimizer, loss, 1.0, after_update=CLIP.clamp_logit_scale_)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=None, help="shards or a table to read (default: build from real images)"
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=DataConfig().num_workers, help="DataLoader workers")
    parser.add_argument("--precision", default="bf16-autocast", choices=["fp32", "bf16-autocast"])
    parser.add_argument("--images", type=int, default=2000, help="images to write into the benchmark shards")
    add_common_arguments(parser)
    args = parser.parse_args()

    logging.getLogger("clipforge.tokenizer").setLevel(logging.ERROR)  # truncations are counted per batch
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    info = machine_info(device, threads)
    print(describe_machine(info))
    batches = 2 if args.quick else 6
    steps = 2 if args.quick else 5
    config = get_model_config(args.model)
    model = create_model(config).to(device)
    batch = args.batch_size

    with tempfile.TemporaryDirectory(prefix="clipforge-bench-data-") as tmp:
        if args.data:
            spec, about = args.data, args.data
        else:
            spec, about = prepare_shards(Path(tmp), args.images)
        print(f"data: {about}; model {config.name} ({config.image_size} px), batch {batch}")

        results: dict[str, float] = {}
        for workers in sorted({0, args.workers}):
            rate = loader_throughput(spec, model, batch, workers, batches, device)
            results[f"loader, {workers} workers (images/s)"] = rate
            print(f"loader alone, {workers} workers: {rate:.0f} images/s")

        step = training_step(model, batch, args.precision, device)
        loader = make_loader(spec, model, batch, 0, device)
        first = next(loader)
        images, tokens = first.images.to(device), first.tokens.to(device)
        step(images, tokens)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step(images, tokens)
        results[f"trainer alone, {args.precision} (pairs/s)"] = steps * batch / (time.perf_counter() - start)
        print(f"trainer alone: {results[f'trainer alone, {args.precision} (pairs/s)']:.0f} pairs/s")

        loader = make_loader(spec, model, batch, args.workers, device)
        first = next(loader)
        step(first.images.to(device), first.tokens.to(device))
        waited, start = 0.0, time.perf_counter()
        for _ in range(steps):
            wait_start = time.perf_counter()
            fed = next(loader)
            waited += time.perf_counter() - wait_start
            step(fed.images.to(device), fed.tokens.to(device))
        elapsed = time.perf_counter() - start
        together = f"trainer fed by the loader, {args.workers} workers"
        results[f"{together} (pairs/s)"] = steps * batch / elapsed
        results[f"{together}: share of time waiting for data"] = waited / elapsed

    rows = [[name, f"{value:.1%}" if "share" in name else f"{value:.0f}"] for name, value in results.items()]
    print()
    print(table(rows, ["measure", "value"]))
    loader_rate = results[f"loader, {args.workers} workers (images/s)"]
    consumed = results[f"trainer alone, {args.precision} (pairs/s)"]
    verdict = "not data-bound" if loader_rate > consumed else "DATA-BOUND"
    print(f"decode + augment {loader_rate:.0f} images/s vs training step {consumed:.0f} pairs/s: {verdict}")
    info["load_average_end"] = machine_info(device, threads)["load_average"]
    write_json(
        args.json, {"machine": info, "data": about, "model": config.name, "batch": batch, "results": results}
    )


if __name__ == "__main__":
    main()
