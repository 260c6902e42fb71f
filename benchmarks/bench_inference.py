"""Inference throughput: clipforge vs open_clip ``encode_image`` / ``encode_text``, same weights, inputs, threads.

Cases (the issue's): ViT-B/32 and RN50 ``encode_image`` at 224 px, batch 32, and ViT-B/32 ``encode_text`` on
real short captions, batch 256. Each runs in every precision a user can pick — fp32, bf16 autocast, bf16 weights
(``model.to(torch.bfloat16)``) — under ``torch.inference_mode``, calls alternating between the libraries;
medians are reported and the best mode of each library is compared with the other's best. Before timing, the
fp32 outputs are compared (max |Δ|) so both do the same computation. GFLOP/s use open_clip's FLOP count (the
architecture's work) and are shown against the bf16 matrix-product ceiling measured in the same process.

    python benchmarks/bench_inference.py                       # ~3 min on 2 cores
    python benchmarks/bench_inference.py --quick               # ~40 s: one timed call each
    python benchmarks/bench_inference.py --cases rn50-image --precisions bf16-weights --repeats 5
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clipforge.config import get_model_config
from clipforge.tokenizer import Tokenizer
from common import (
    PRECISIONS,
    BenchmarkError,
    add_common_arguments,
    autocast_context,
    caption_corpus,
    count_flops,
    describe_machine,
    machine_info,
    matmul_ceiling,
    max_abs_diff,
    model_dtype,
    paired_models,
    pick_device,
    set_threads,
    table,
    time_alternating,
    write_json,
)


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    tower: str  # "image" or "text"
    batch: int


CASES = {
    "vit-b-32-image": Case("ViT-B/32 encode_image", "ViT-B-32", "image", 32),
    "rn50-image": Case("RN50 encode_image", "RN50", "image", 32),
    "vit-b-32-text": Case("ViT-B/32 encode_text", "ViT-B-32", "text", 256),
}


def make_inputs(case: Case, config, device: torch.device) -> tuple[torch.Tensor, str]:
    if case.tower == "image":
        gen = torch.Generator().manual_seed(0)
        size = config.image_size
        return torch.randn(case.batch, 3, size, size, generator=gen).to(device), "random images"
    captions, source = caption_corpus(case.batch)
    tokens = Tokenizer(context_length=config.text.context_length)(captions).to(device)
    lengths = tokens.argmax(dim=-1) + 1
    about = (
        f"{source}; tokens mean {lengths.float().mean():.1f}, max {int(lengths.max())} of {tokens.shape[1]}"
    )
    return tokens, about


def encoder(
    model: nn.Module, tower: str, inputs: torch.Tensor, precision: str, device
) -> Callable[[], torch.Tensor]:
    encode = model.encode_image if tower == "image" else model.encode_text

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast_context(precision, device):
            return encode(inputs)

    return run


def run_case(case: Case, precisions, repeats: int, warmup: int, device, ceiling: float) -> list[dict]:
    config = get_model_config(case.model)
    inputs, about = make_inputs(case, config, device)
    print(f"\n{case.name}: batch {case.batch}, {about}")
    ours, theirs = paired_models(config)
    ours, theirs = ours.eval().to(device), theirs.eval().to(device)
    with torch.inference_mode():
        diff = max_abs_diff(
            encoder(ours, case.tower, inputs, "fp32", device)(),
            encoder(theirs, case.tower, inputs, "fp32", device)(),
        )
    flops = count_flops(encoder(theirs, case.tower, inputs, "fp32", device))
    print(
        f"  fp32 outputs agree to max |diff| {diff:.2e}; {flops / case.batch / 1e9:.2f} GFLOP per item (open_clip)"
    )
    results = []
    for precision in precisions:
        dtype = model_dtype(precision)
        ours.to(dtype), theirs.to(dtype)
        step_inputs = inputs.to(dtype) if case.tower == "image" else inputs
        print(f"  {precision}: {repeats} alternating calls per library after {warmup} warm-up")
        cases = {
            "clipforge": encoder(ours, case.tower, step_inputs, precision, device),
            "open_clip": encoder(theirs, case.tower, step_inputs, precision, device),
        }
        timings = time_alternating(cases, repeats, warmup=warmup, device=device)
        for name in cases:
            seconds = timings.median(name)
            results.append(
                {
                    "case": case.name,
                    "library": name,
                    "precision": precision,
                    "seconds": seconds,
                    "items_per_s": case.batch / seconds,
                    "gflops": flops / seconds / 1e9,
                    "of_bf16_ceiling": flops / seconds / 1e9 / ceiling,
                    "min_max_s": timings.spread(name),
                }
            )
        ours.float(), theirs.float()
    return results


def best_of(results: list[dict], case: str, library: str) -> dict:
    return max(
        (r for r in results if r["case"] == case and r["library"] == library), key=lambda r: r["items_per_s"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma list of {PRECISIONS}")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per library and precision")
    add_common_arguments(parser, quick_help="one timed call per library and precision (~40 s)")
    args = parser.parse_args()

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [c for c in cases if c not in CASES] + [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise BenchmarkError(
            f"unknown case or precision {bad}; cases: {list(CASES)}, precisions: {list(PRECISIONS)}"
        )
    logging.getLogger("clipforge.tokenizer").setLevel(logging.ERROR)  # a few captions exceed 77 tokens
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    repeats = args.repeats or (
        (1 if args.quick else 3) if device.type == "cpu" else (5 if args.quick else 10)
    )
    info = machine_info(device, threads)
    print(describe_machine(info))
    ceiling = matmul_ceiling(torch.bfloat16, device)
    print(f"bf16 matmul ceiling now: {ceiling:.0f} GFLOP/s")

    results = []
    for key in cases:
        results += run_case(CASES[key], precisions, repeats, 1, device, ceiling)

    rows = [
        [
            r["case"],
            r["library"],
            r["precision"],
            f"{r['items_per_s']:.1f}",
            f"{r['seconds'] * 1e3:.0f}",
            f"{r['gflops']:.0f}",
            f"{r['of_bf16_ceiling']:.0%}",
        ]
        for r in results
    ]
    print()
    print(table(rows, ["case", "library", "precision", "items/s", "ms/batch", "GFLOP/s*", "of bf16 ceiling"]))
    print(
        "* open_clip's FLOP count for both libraries (clipforge skips padding and unused rows, so does less)."
    )
    summary = {}
    for key in cases:
        name = CASES[key].name
        ours, theirs = best_of(results, name, "clipforge"), best_of(results, name, "open_clip")
        ratio = ours["items_per_s"] / theirs["items_per_s"]
        summary[name] = {"clipforge": ours["precision"], "open_clip": theirs["precision"], "ratio": ratio}
        print(
            f"best {name}: clipforge {ours['items_per_s']:.1f}/s ({ours['precision']}) vs open_clip "
            f"{theirs['items_per_s']:.1f}/s ({theirs['precision']}): {ratio:.2f}x"
        )
    info["load_average_end"] = machine_info(device, threads)["load_average"]
    write_json(
        args.json, {"machine": info, "bf16_ceiling_gflops": ceiling, "results": results, "best": summary}
    )


if __name__ == "__main__":
    main()
