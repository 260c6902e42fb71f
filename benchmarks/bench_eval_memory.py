"""Zero-shot evaluation streams: peak memory stays flat as the number of images grows.

Writes N small PNGs (sklearn's handwritten digits, upscaled to --size px with a random shift and noise, so every
file differs) into a class-per-folder tree of 10 classes in a temporary folder, then runs the library's zero-shot
path (open_eval_dataset -> build_classifier -> zero_shot_classify over DataLoader batches; no features kept)
with the tiny model, first on a fifth of the images, then on all of them. For each run it prints the peak
resident memory of the main process (VmHWM, reset between runs through /proc/self/clear_refs where the kernel
allows it, else ru_maxrss) and of the largest worker process, against what the images would take if held at once
(decoded RGB, and as preprocessed float32 tensors), and the images per second.

    python benchmarks/bench_eval_memory.py                       # 10,000 images of 128 px, 2 workers
    python benchmarks/bench_eval_memory.py --images 20000 --size 96 --workers 4
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 2**20
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    hwm = _status_kib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return hwm / 1024


def _rss_mib() -> float:
    rss = _status_kib("VmRSS")
    return (rss or 0) / 1024


def write_images(root: Path, count: int, size: int, seed: int = 0) -> int:
    """``count`` PNGs in root/<digit word>/; returns their total bytes on disk."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    total = 0
    for word in WORDS:
        (root / word).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        source = index % len(digits.images)
        gray = (255 - digits.images[source] * 255 / 16).clip(0, 255).astype(np.uint8)
        image = np.asarray(
            Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16
        )
        image = np.roll(image, tuple(rng.integers(-size // 8, size // 8 + 1, 2)), axis=(0, 1))
        image = (image + rng.integers(-12, 13, image.shape)).clip(0, 255).astype(np.uint8)
        path = root / WORDS[digits.target[source]] / f"{index:06d}.png"
        Image.fromarray(image).convert("RGB").save(path, optimize=False)
        total += path.stat().st_size
    return total


def evaluate(root: Path, max_samples: int, batch_size: int, workers: int) -> dict[str, float]:
    import torch

    import clipforge
    from clipforge.eval import build_classifier, get_templates, open_eval_dataset, zero_shot_classify

    torch.manual_seed(0)
    model = clipforge.create_model("tiny").eval()
    dataset = open_eval_dataset(root).subset(max_samples)
    classifier = build_classifier(
        model, clipforge.get_tokenizer(model), dataset.classnames, get_templates("generic").templates
    )
    reset = _reset_peak()
    before = _rss_mib()
    started = time.perf_counter()
    result = zero_shot_classify(
        model,
        classifier,
        dataset.batches(clipforge.get_transforms(model), batch_size, workers),
        classnames=dataset.classnames,
    )
    seconds = time.perf_counter() - started
    return {
        "images": result.num_samples,
        "skipped": sum(result.skipped.values()),
        "seconds": seconds,
        "rss_before_mib": before,
        "peak_mib": _peak_mib(),
        "peak_reset": reset,
        "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "image_size": model.config.vision.image_size,
        "top1": result.top1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=128, help="side of the generated PNGs in pixels")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the main process")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="clipforge-bench-eval-") as folder:
        root = Path(folder) / "images"
        started = time.perf_counter()
        disk = write_images(root, args.images, args.size)
        print(f"wrote {args.images:,} PNGs of {args.size}x{args.size} px ({disk / MIB:.1f} MiB on disk) in "
              f"{time.perf_counter() - started:.1f} s; torch {torch.__version__}, {os.cpu_count()} CPUs, "
              f"{args.workers} workers, batch {args.batch_size}")  # fmt: skip
        print(f"{'images':>8} {'decoded if held':>16} {'tensors if held':>16} {'RSS before':>11} {'peak RSS':>9} "
              f"{'peak worker':>12} {'images/s':>9}")  # fmt: skip
        for count in sorted({max(1, args.images // 5), args.images}):
            run = evaluate(root, count, args.batch_size, args.workers)
            decoded = run["images"] * args.size * args.size * 3 / MIB
            tensors = run["images"] * 3 * run["image_size"] ** 2 * 4 / MIB
            print(f"{run['images']:>8,} {decoded:>12.1f} MiB {tensors:>12.1f} MiB {run['rss_before_mib']:>7.1f} MiB "
                  f"{run['peak_mib']:>5.0f} MiB {run['worker_peak_mib']:>8.0f} MiB "
                  f"{run['images'] / run['seconds']:>9.1f}"
                  + ("" if run["peak_reset"] else "  (peak not resettable: process peak so far)")
                  + (f"  skipped {run['skipped']}" if run["skipped"] else ""))  # fmt: skip
    print(
        "peak RSS: the main process's high-water mark during the evaluation (model, classifier, a few batches);"
    )
    print("peak worker: the largest DataLoader worker's high-water mark (it decodes and preprocesses).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
