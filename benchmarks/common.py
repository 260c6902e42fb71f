"""Shared helpers for the clipforge-vs-open_clip benchmarks: devices and threads, precision modes, paired models
with identical weights, alternating timing with medians, FLOP counts, the matmul ceiling, machine facts and
JSON output. Benchmarks import it as ``from common import ...`` (run them as ``python benchmarks/bench_*.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.config import ModelConfig
from clipforge.device import autocast_context as clipforge_autocast
from clipforge.device import resolve_device
from clipforge.model import CLIP, create_model
from clipforge.model.convert import from_openai

# What a user can pick: fp32, bf16 autocast around an fp32 model, or the model itself cast to bf16.
PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")
MIXED = ("fp32", "bf16-autocast")  # training modes that keep fp32 master weights


class BenchmarkError(ValueError):
    """A benchmark was asked for something it cannot do (bad option, missing reference package)."""


# ----------------------------------------------------------------------------------------------------------------
# Device, threads, precision


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU. ``cuda`` without a GPU raises."""
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return resolve_device(name)


def set_threads(threads: int) -> int:
    """Pin torch's intra-op pool (0: all cores); returns the count in force. Both libraries share it."""
    torch.set_num_threads(threads if threads > 0 else os.cpu_count() or 1)
    return torch.get_num_threads()


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in for ``precision`` (autocast only for ``bf16-autocast``)."""
    return clipforge_autocast(device, "bf16" if precision == "bf16-autocast" else "fp32")


def model_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-weights" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# Paired models


def import_open_clip():
    """open_clip, imported quietly; a clear error when the reference package is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import open_clip
            from open_clip.model import CLIP as OpenClipCLIP  # noqa: F401
    except ImportError as exc:
        raise BenchmarkError(
            f"open_clip is needed as the reference ({exc}); install the test extras: pip install -e '.[test]'"
        ) from exc
    return open_clip


def open_clip_model(config: ModelConfig) -> nn.Module:
    """An open_clip ``CLIP`` with exactly ``config``'s architecture (random weights, train mode)."""
    import_open_clip()
    from open_clip.model import CLIP as OpenClipCLIP

    vision, text = config.vision, config.text
    vision_cfg: dict[str, Any] = {"image_size": vision.image_size, "width": vision.width}
    if vision.arch == "resnet":
        vision_cfg["layers"] = list(vision.layers)  # type: ignore[arg-type]
    else:
        vision_cfg.update(layers=vision.layers, patch_size=vision.patch_size, head_width=vision.head_width)
        vision_cfg["mlp_ratio"] = vision.mlp_ratio
    text_cfg = {
        "context_length": text.context_length,
        "vocab_size": text.vocab_size,
        "width": text.width,
        "heads": text.heads,
        "layers": text.layers,
        "mlp_ratio": text.mlp_ratio,
    }
    return OpenClipCLIP(config.embed_dim, vision_cfg, text_cfg, quick_gelu=config.activation == "quick_gelu")


def paired_models(config: ModelConfig, seed: int = 0) -> tuple[CLIP, nn.Module]:
    """(clipforge, open_clip) models of ``config`` holding the same random weights (open_clip's init)."""
    torch.manual_seed(seed)
    reference = open_clip_model(config)
    ours = create_model(config)
    state, dropped = from_openai(reference.state_dict(), config)
    if dropped:
        raise BenchmarkError(f"weights that did not map from open_clip to clipforge: {dropped}")
    ours.load_state_dict(state, strict=True)
    return ours, reference


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")  # Debian's tuxpaint-stamps-default: ~800 real captions


def caption_corpus(n: int, seed: int = 0) -> tuple[list[str], str]:
    """``n`` short captions and where they came from.

    Real ones where the ``tuxpaint-stamps-default`` package is installed (each stamp's one-sentence English
    description, e.g. "A red and white anemone flower."), shuffled and repeated to ``n``; otherwise the
    seeded synthetic clip-art captions of ``bench_tokenizer.py``.
    """
    import random

    real = []
    if TUXPAINT_STAMPS.is_dir():
        for path in sorted(TUXPAINT_STAMPS.rglob("*.txt")):
            first = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].strip()
            if first and "=" not in first:
                real.append(first)
    if real:
        rng = random.Random(seed)
        rng.shuffle(real)
        captions = [real[i % len(real)] for i in range(n)]
        return captions, f"{len(real)} tuxpaint stamp descriptions ({TUXPAINT_STAMPS})"
    from bench_tokenizer import synthetic_captions

    return synthetic_captions(
        n, seed
    ), "synthetic clip-art captions (bench_tokenizer.py; tuxpaint not installed)"


# ----------------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timings:
    """Seconds per call for each case, collected in alternating order."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def spread(self, name: str) -> tuple[float, float]:
        values = self.seconds[name]
        return min(values), max(values)


def time_alternating(
    cases: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | None = None,
    progress: bool = True,
) -> Timings:
    """Run every case ``warmup`` times, then ``repeats`` rounds of one call each, rotating which goes first.

    Alternating in one process means a busy neighbour or a clock change hits both libraries alike; medians
    are robust to the odd slow round. CUDA work is synchronised before each clock read.
    """
    device = device or torch.device("cpu")
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    synchronize(device)
    timings = Timings({name: [] for name in names})
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            cases[name]()
            synchronize(device)
            timings.seconds[name].append(time.perf_counter() - start)
        if progress:
            done = ", ".join(f"{n} {timings.seconds[n][-1] * 1e3:.0f} ms" for n in names)
            print(f"  round {round_index + 1}/{repeats}: {done}", flush=True)
    return timings


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and the matmul ceiling


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def mm_gflops(
    m: int,
    k: int,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int = 10,
    min_seconds: float = 0.2,
) -> float:
    """Median GFLOP/s of [m, k] @ [k, n] products (each timed sample runs enough products for ``min_seconds``)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, generator=gen, device=device).to(dtype)
    b = torch.randn(k, n, generator=gen, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    synchronize(device)
    per_call = max(time.perf_counter() - start, 1e-6)
    inner = max(1, int(min_seconds / per_call))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        synchronize(device)
        samples.append((time.perf_counter() - start) / inner)
    return 2 * m * k * n / statistics.median(samples) / 1e9


def matmul_gflops(
    size: int, dtype: torch.dtype, device: torch.device, repeats: int = 10, min_seconds: float = 0.2
) -> float:
    """Median GFLOP/s of ``size``³ matrix products (:func:`mm_gflops` on square matrices)."""
    return mm_gflops(size, size, size, dtype, device, repeats, min_seconds)


def matmul_ceiling(dtype: torch.dtype, device: torch.device, sizes: Sequence[int] = (1024, 2048)) -> float:
    """The best median GFLOP/s over ``sizes``: what plain matrix products reach on this device, now."""
    return max(matmul_gflops(size, dtype, device) for size in sizes)


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """What a reader needs to compare figures: CPU or GPU model, threads, versions, date, load."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "torch": torch.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(BenchmarkError):
        info["open_clip"] = import_open_clip().__version__
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cores']} cores)"
    load = info.get("load_average")
    load_text = f", load average {load[0]:.1f}" if load else ""
    return f"{where}, {info['threads']} torch threads, torch {info['torch']}, {info['date']}{load_text}"


def write_json(path: str | Path | None, payload: Mapping[str, Any]) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def add_common_arguments(parser, quick_help: str = "a ~30 s run with fewer repeats") -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both libraries (0: all)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


@contextlib.contextmanager
def no_grad_mode() -> Iterator[None]:
    with torch.inference_mode():
        yield
