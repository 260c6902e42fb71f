"""torch.compile vs eager for clipforge, in the same process: the training step (forward of both towers, the
contrastive loss, backward, AdamW) and each tower's inference forward.

Compiled runs the towers' reference computation (see ``clipforge.model.compile``); eager inference takes the
fast paths, as users get by default. Compile time is reported separately (first call), then steps alternate
between eager and compiled and medians are compared. Inputs: random images and real captions (Tux Paint stamp
descriptions when installed).

    python benchmarks/bench_compile.py                      # the demo's model, batch 128 (~5 min on 2 cores)
    python benchmarks/bench_compile.py --model ViT-B-32 --batch-size 32 --quick
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from clipforge.config import get_model_config
from clipforge.losses import ContrastiveLoss
from clipforge.model import create_model
from clipforge.model.compile import check_compilable
from clipforge.objectives.contrastive import compute_gradients
from clipforge.tokenizer import Tokenizer
from clipforge.train.config import OptimConfig
from clipforge.train.optim import build_optimizer
from clipforge.train.step import apply_update
from common import (
    add_common_arguments,
    caption_corpus,
    describe_machine,
    machine_info,
    pick_device,
    set_threads,
    table,
    time_alternating,
    write_json,
)


def _train_step(model, loss, optimizer, images, tokens):
    def step() -> None:
        total = compute_gradients(model, loss, [(images, tokens)])
        apply_update(model, optimizer, total, 1.0, None)

    return step


def _first_call_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small", help="clipforge config name (the demo's: small)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None)
    add_common_arguments(parser)
    args = parser.parse_args()
    device = pick_device(args.device)
    check_compilable(device)
    threads = set_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 8)
    config = get_model_config(args.model)
    info = machine_info(device, threads)
    print(describe_machine(info))
    logging.getLogger("clipforge.tokenizer").setLevel(logging.ERROR)
    captions, source = caption_corpus(args.batch_size)
    tokens = Tokenizer(context_length=config.text.context_length)(captions).to(device)
    images = torch.randn(args.batch_size, 3, config.image_size, config.image_size,
                         generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    print(f"model {config.name}, batch {args.batch_size}, captions: {source}")

    rows, payload = [], {"machine": info, "model": config.name, "batch": args.batch_size, "cases": {}}
    torch.manual_seed(0)
    eager = create_model(config).to(device)
    compiled_model = torch.compile(eager)
    loss = ContrastiveLoss()
    optimizer = build_optimizer(eager, OptimConfig())
    cases = {
        "train step": (
            _train_step(eager, loss, optimizer, images, tokens),
            _train_step(compiled_model, loss, optimizer, images, tokens),
        ),
    }
    inference = create_model(config).to(device).eval()
    encode_image, encode_text = torch.compile(inference.encode_image), torch.compile(inference.encode_text)

    def no_grad(fn, *inputs):
        def call() -> None:
            with torch.no_grad():
                fn(*inputs)

        return call

    cases["image tower (inference)"] = (
        no_grad(inference.encode_image, images),
        no_grad(encode_image, images),
    )
    cases["text tower (inference)"] = (no_grad(inference.encode_text, tokens), no_grad(encode_text, tokens))
    for name, (eager_fn, compiled_fn) in cases.items():
        compile_s = _first_call_seconds(compiled_fn)
        print(f"{name}: compiled in {compile_s:.1f} s; {repeats} alternating rounds")
        timings = time_alternating({"eager": eager_fn, "compiled": compiled_fn}, repeats, device=device,
                                   progress=False)  # fmt: skip
        e, c = timings.median("eager"), timings.median("compiled")
        rows.append([name, f"{e * 1e3:.0f}", f"{c * 1e3:.0f}", f"{e / c:.2f}x", f"{compile_s:.0f}"])
        payload["cases"][name] = {"eager_s": e, "compiled_s": c, "speedup": e / c, "compile_s": compile_s}
    print(table(rows, ["case", "eager ms", "compiled ms", "compiled speed-up", "compile s"]))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
