"""Training-step throughput: clipforge vs open_clip on the same config, weights, inputs and threads.

One step = forward of both towers, the contrastive loss, backward, gradient clipping (norm 1.0), AdamW, zero
grads, logit-scale clamp. clipforge runs its own trainer functions (``compute_gradients`` + ``apply_update``);
open_clip runs what its ``train_one_epoch`` does per step (``ClipLoss``, ``clip_grad_norm_``, the clamp) with
AdamW over its usual decay groups. Steps alternate between the libraries; medians are reported per precision:

* ``fp32`` and ``bf16-autocast`` keep fp32 weights (mixed precision): the headline compares the best of these;
* ``bf16-weights`` (``model.to(torch.bfloat16)``) changes the training numerics: compared only with itself.

Achieved GFLOP/s come from torch's FlopCounterMode on one fp32 step of each library (open_clip's count is the
textbook work of the architecture; clipforge's is what it executes) and are shown as a fraction of the bf16
matrix-product ceiling measured in the same process. Inputs: random images and real short captions.

    python benchmarks/bench_train_step.py                  # ~3 min on 2 cores
    python benchmarks/bench_train_step.py --quick          # ~30 s
    python benchmarks/bench_train_step.py --model tiny --batch-size 128 --precisions fp32
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from clipforge.config import get_model_config
from clipforge.losses import ContrastiveLoss
from clipforge.model import CLIP
from clipforge.objectives.contrastive import compute_gradients
from clipforge.tokenizer import Tokenizer
from clipforge.train.config import OptimConfig
from clipforge.train.optim import build_optimizer
from clipforge.train.step import apply_update
from common import (
    MIXED,
    PRECISIONS,
    BenchmarkError,
    add_common_arguments,
    autocast_context,
    caption_corpus,
    count_flops,
    describe_machine,
    machine_info,
    matmul_ceiling,
    model_dtype,
    paired_models,
    pick_device,
    set_threads,
    table,
    time_alternating,
    write_json,
)

GRAD_CLIP = 1.0
LR = 1e-5  # small: the benchmark runs many steps on random data and should stay finite


def open_clip_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW as open_clip's ``main.py`` builds it: no decay on gains, biases, norms and the logit scale."""

    def exclude(name: str, param: torch.Tensor) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = list(model.named_parameters())
    decay = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if exclude(n, p) and p.requires_grad]
    groups = [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=1e-6)


def clipforge_step(model, images, tokens, precision, device) -> Callable[[], None]:
    optimizer = build_optimizer(model, OptimConfig(lr=LR))
    loss_fn = ContrastiveLoss()

    def step() -> None:
        loss = compute_gradients(
            model, loss_fn, [(images, tokens)], lambda: autocast_context(precision, device)
        )
        apply_update(model, optimizer, loss, GRAD_CLIP, after_update=CLIP.clamp_logit_scale_)

    return step


def open_clip_step(model, images, tokens, precision, device) -> Callable[[], None]:
    from open_clip.loss import ClipLoss

    optimizer = open_clip_optimizer(model)
    loss_fn = ClipLoss()

    def step() -> None:
        with autocast_context(precision, device):
            image_features, text_features, logit_scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP, norm_type=2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def step_flops(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> int:
    """FLOPs of forward + backward of one fp32 step (the loss included, the optimizer not)."""

    def run() -> None:
        out = model(images, tokens)
        image_features, text_features, logit_scale = out
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (
            nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)
        ) / 2
        loss.backward()
        model.zero_grad(set_to_none=True)

    return count_flops(run)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small", help="clipforge config name (the issue's config: small)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per library and precision")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma list of {PRECISIONS}")
    add_common_arguments(parser)
    args = parser.parse_args()

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise BenchmarkError(f"--precisions: unknown {unknown}; choose from {list(PRECISIONS)}")
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    cpu = device.type == "cpu"
    repeats = args.repeats or ((2 if args.quick else 6) if cpu else (5 if args.quick else 20))
    batch = args.batch_size // 2 if cpu and args.quick and args.batch_size == 256 else args.batch_size
    config = get_model_config(args.model)
    info = machine_info(device, threads)
    print(f"{describe_machine(info)}")

    logging.getLogger("clipforge.tokenizer").setLevel(logging.ERROR)  # a few captions exceed the context
    captions, caption_source = caption_corpus(batch)
    tokens = Tokenizer(context_length=config.text.context_length)(captions).to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, config.image_size, config.image_size, generator=gen).to(device)
    lengths = tokens.argmax(dim=-1) + 1
    print(
        f"model {config.name} ({config.activation}), batch {batch}, {config.image_size} px, captions: "
        f"{caption_source}; text lengths mean {lengths.float().mean():.1f}, max {int(lengths.max())} "
        f"of {config.text.context_length}"
    )

    ours, theirs = paired_models(config)
    ours, theirs = ours.to(device), theirs.to(device)
    flops = {"clipforge": step_flops(ours, images, tokens), "open_clip": step_flops(theirs, images, tokens)}
    print(
        "FLOPs per pair (fp32 forward + backward): "
        + ", ".join(f"{k} {v / batch / 1e9:.3f} G" for k, v in flops.items())
    )
    ceiling = matmul_ceiling(torch.bfloat16, device)
    print(f"bf16 matmul ceiling now: {ceiling:.0f} GFLOP/s")

    results = []
    for precision in precisions:
        print(f"{precision}: {repeats} alternating steps per library after 1 warm-up")
        dtype = model_dtype(precision)
        pair = {"clipforge": ours, "open_clip": theirs}
        models = {}
        for name, model in pair.items():
            models[name] = model.to(dtype).train() if dtype != torch.float32 else model.float().train()
        step_images = images.to(dtype)
        cases = {
            "clipforge": clipforge_step(models["clipforge"], step_images, tokens, precision, device),
            "open_clip": open_clip_step(models["open_clip"], step_images, tokens, precision, device),
        }
        timings = time_alternating(cases, repeats, warmup=1, device=device)
        for name in cases:
            seconds = timings.median(name)
            results.append(
                {
                    "library": name,
                    "precision": precision,
                    "seconds": seconds,
                    "pairs_per_s": batch / seconds,
                    "gflops_executed": flops[name] / seconds / 1e9,
                    "gflops_effective": flops["open_clip"] / seconds / 1e9,
                    "min_max_s": timings.spread(name),
                }
            )
        ours.float(), theirs.float()

    rows = []
    for r in results:
        rows.append(
            [
                r["library"],
                r["precision"],
                f"{r['pairs_per_s']:.1f}",
                f"{r['seconds'] * 1e3:.0f}",
                f"{r['gflops_effective']:.0f}",
                f"{r['gflops_effective'] / ceiling:.0%}",
            ]
        )
    print()
    header = ["library", "precision", "pairs/s", "ms/step", "GFLOP/s*", "of bf16 ceiling"]
    print(table(rows, header))
    print(
        "* open_clip's FLOP count for both (the architecture's work); clipforge executes fewer (see above)."
    )

    summary = {}
    for group, modes in (("mixed precision", MIXED), ("bf16 weights", ("bf16-weights",))):
        best = {}
        for name in ("clipforge", "open_clip"):
            candidates = [r for r in results if r["library"] == name and r["precision"] in modes]
            if candidates:
                best[name] = max(candidates, key=lambda r: r["pairs_per_s"])
        if len(best) == 2:
            ratio = best["clipforge"]["pairs_per_s"] / best["open_clip"]["pairs_per_s"]
            summary[group] = {name: (r["precision"], r["pairs_per_s"]) for name, r in best.items()} | {
                "ratio": ratio
            }
            print(
                f"best {group}: clipforge {best['clipforge']['pairs_per_s']:.1f} pairs/s "
                f"({best['clipforge']['precision']}) vs open_clip {best['open_clip']['pairs_per_s']:.1f} "
                f"({best['open_clip']['precision']}): {ratio:.2f}x"
            )
    info["load_average_end"] = machine_info(device, threads)["load_average"]
    write_json(
        args.json,
        {
            "machine": info,
            "model": config.name,
            "batch": batch,
            "captions": caption_source,
            "flops_per_step": flops,
            "bf16_ceiling_gflops": ceiling,
            "results": results,
            "best": summary,
        },
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
