"""The ``clipforge`` command: one sub-command per job. Each parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from clipforge.checkpoint import FORMATS, CheckpointError
from clipforge.distributed import DistributedError
from clipforge.train import TrainingError

log = logging.getLogger("clipforge")


def _cmd_models(args: argparse.Namespace) -> int:
    from clipforge.config import get_model_config, list_models

    for name in list_models():
        config = get_model_config(name)
        v, t = config.vision, config.text
        tower = (
            f"ViT-{v.width}x{v.layers}/{v.patch_size}"
            if v.arch == "vit"
            else f"ResNet{list(v.layers)}x{v.width}"
        )
        print(
            f"{name:14s} {tower:26s} {v.image_size:4d}px  text {t.width}x{t.layers}  embed {config.embed_dim}  "
            f"{config.activation}"
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from clipforge.checkpoint import export_checkpoint, load_checkpoint

    start = time.perf_counter()
    model = load_checkpoint(args.src, format=args.from_format, config=args.model, activation=args.activation)
    out = export_checkpoint(model, args.dst, to=args.to)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"converted {args.src} -> {out} ({args.to}): {model.config.name}, {params:,} parameters, "
        f"{model.config.activation}, {time.perf_counter() - start:.1f}s"
    )
    if args.to == "open_clip" and out.is_dir():
        print(f"load it with: open_clip.create_model_and_transforms('local-dir:{out}')")
    if args.to == "hf":
        print(f"load it with: transformers.CLIPModel.from_pretrained('{out}')")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from clipforge.checkpoint import read_weights
    from clipforge.model import CLIP

    loaded = read_weights(
        args.checkpoint, format=args.from_format, config=args.model, activation=args.activation
    )
    with torch.device("meta"):  # counts parameters, not buffers such as BatchNorm statistics, without memory
        params = sum(p.numel() for p in CLIP(loaded.config).parameters())
    info = {
        "path": str(loaded.path),
        "format": loaded.format,
        "parameters": params,
        "config": loaded.config.to_dict(),
        "ignored_entries": loaded.dropped,
        "metadata": {k: v for k, v in loaded.metadata.items() if k != "config"},
    }
    print(json.dumps(info, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from clipforge import create_model, get_tokenizer, get_transforms
    from clipforge.images import load_image

    torch.manual_seed(0)
    model = create_model(args.model).eval()
    tokenizer, transform = get_tokenizer(model), get_transforms(model)
    if args.image:
        image, source = load_image(args.image), args.image
    else:
        size = 256
        ramp = torch.linspace(0, 255, size).to(torch.uint8)
        pixels = torch.stack(
            [ramp.expand(size, size), ramp.expand(size, size).t(), torch.full((size, size), 90)], -1
        )
        image, source = Image.fromarray(pixels.to(torch.uint8).numpy()), "a generated 256x256 gradient"
    labels = ["a photo of a cat.", "a photo of a dog.", "a diagram."]
    images = transform(image).unsqueeze(0)
    tokens = tokenizer(labels)
    with torch.no_grad():
        out = model(images, tokens)
    probs = (out.logit_scale * out.image_features @ out.text_features.T).softmax(dim=-1)[0]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model        {model.config.name}: {params:,} parameters (random weights), {model.config.activation}"
    )
    print(f"image        {source} -> tensor {tuple(images.shape)}")
    print(f"tokens       {len(labels)} prompts -> {tuple(tokens.shape)}; first: {tokens[0, :8].tolist()}")
    print(f"embeddings   image {tuple(out.image_features.shape)}, text {tuple(out.text_features.shape)}")
    print(f"logit scale  {out.logit_scale.item():.2f} (1/0.07 at initialisation)")
    for label, p in zip(labels, probs.tolist()):
        print(f"  p({label!r}) = {p:.3f}")
    return 0


# Shortcut flags of `clipforge train` and the config keys they set (everything else: --set key=value).
_TRAIN_SHORTCUTS = {
    "model": "model",
    "data": "data.train",
    "batch_size": "data.batch_size",
    "workers": "data.num_workers",
    "steps": "steps",
    "epochs": "epochs",
    "lr": "optim.lr",
    "warmup": "optim.warmup_steps",
    "precision": "precision",
    "accum_steps": "accum_steps",
    "seed": "seed",
    "output_dir": "run.output_dir",
    "name": "run.name",
    "checkpoint_every": "run.checkpoint_every",
    "init_from": "init_from",
}


def _cmd_train(args: argparse.Namespace) -> int:
    from clipforge.train import resolve_train_config, train
    from clipforge.train.config import parse_override

    overrides = dict(parse_override(o) for o in args.set)
    for flag, key in _TRAIN_SHORTCUTS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.resume:
        resume = args.resume
        if resume == "latest":
            if "run.name" not in overrides:
                print(
                    "error: --resume latest needs --name (the run folder's name) to find the run",
                    file=sys.stderr,
                )
                return 2
            resume = str(Path(overrides.get("run.output_dir", "runs")) / overrides["run.name"])
        overrides.pop("run.name", None)
        overrides.pop("run.output_dir", None)
        summary = train(resume=resume, overrides=overrides)
    else:
        summary = train(resolve_train_config(args.config, overrides))
    if summary.model_path:
        print(f"run folder: {summary.run_dir}")
        print(f"model:      {summary.model_path}")
        print(f"summary:    {Path(summary.run_dir) / 'summary.json'}")
    return 0


def _cmd_data_shards(args: argparse.Namespace) -> int:
    from clipforge.data.sources import open_source, source_notes, write_shards

    options = {
        k: v
        for k, v in {
            "image_column": args.image_column,
            "caption_column": args.caption_column,
            "caption_separator": args.caption_separator,
            "root": args.root,
        }.items()
        if v is not None
    }
    if args.report_bad_rows:
        options["on_bad_row"] = "report"
    source = open_source(args.src, **options)
    for note in source_notes(source):
        print(f"note: {note}", file=sys.stderr)
    manifest = write_shards(
        source,
        args.out,
        prefix=args.prefix,
        max_bytes=int(args.max_shard_mb * 2**20),
        max_samples=args.max_samples,
        resize=args.resize,
        jpeg_quality=args.jpeg_quality,
        num_workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    dropped = sum(n for r, n in manifest.dropped.items() if r != "empty_caption_text")
    print(f"wrote {manifest.num_samples:,} samples in {len(manifest.shards)} shards to {args.out}")
    print(f"dropped {dropped:,} inputs" + (":" if manifest.dropped else ""))
    for reason, n in sorted(manifest.dropped.items()):
        print(f"  {reason:<24} {n:,}")
    if manifest.oversized_samples:
        print(
            f"{manifest.oversized_samples} samples were larger than --max-shard-mb alone (each in its own shard)"
        )
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the named architectures")
    p.set_defaults(func=_cmd_models)

    def add_source_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--from",
            dest="from_format",
            default="auto",
            choices=["auto", *FORMATS],
            help="source format (default: detected from the file)",
        )
        p.add_argument(
            "--model",
            default=None,
            help="architecture name or config file, for bare state dicts that do not describe themselves",
        )
        p.add_argument(
            "--activation",
            default=None,
            choices=["quick_gelu", "gelu"],
            help="activation of OpenAI/open_clip-layout state dicts (not recorded in those files)",
        )

    p = sub.add_parser(
        "convert", help="convert a checkpoint between clipforge, OpenAI, open_clip and HF formats"
    )
    p.add_argument("src", help="checkpoint file or folder")
    p.add_argument(
        "dst", help="output file (clipforge, openai, open_clip .safetensors/.pt) or folder (hf, open_clip)"
    )
    p.add_argument("--to", required=True, choices=FORMATS)
    add_source_options(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("info", help="print what a checkpoint holds (format, architecture, parameter count)")
    p.add_argument("checkpoint")
    add_source_options(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "train",
        help="contrastive pretraining (torchrun --nproc_per_node N -m clipforge train ... for several processes)",
        description="Train a CLIP model. Config layering: defaults -> --config FILE -> shortcut flags and --set.",
    )
    p.add_argument("--config", default=None, help="YAML/JSON training config")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set optim.lr=1e-3 --set model_overrides.vision.layers=2",
    )
    p.add_argument("--model", default=None, help="architecture name or model config file")
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="SPEC",
        help="training source (shard folder/pattern, CSV/TSV/JSONL table, captioned folder); repeatable",
    )
    p.add_argument("--batch-size", type=int, default=None, help="global pairs per optimizer step")
    p.add_argument("--workers", type=int, default=None, help="data loader workers per process")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--accum-steps", type=int, default=None, help="micro-batches per step (batch stays whole)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--output-dir", default=None, help="parent folder of run folders (default: runs)")
    p.add_argument("--name", default=None, help="run folder name")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between training checkpoints")
    p.add_argument("--init-from", default=None, help="start from these weights instead of random init")
    p.add_argument(
        "--resume", default=None, help="'latest' (with --name), a run folder, or a checkpoint file"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="prepare training data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "shards",
        help="write webdataset shards from a CSV/TSV/JSONL table, an image folder with .txt captions, or shards",
    )
    p.add_argument("src", help="table, image folder or shards (several joined with '::')")
    p.add_argument("out", help="output folder (gets shard-000000.tar, ... and manifest.json)")
    p.add_argument("--max-shard-mb", type=float, default=256.0, help="shard size bound in MiB (default 256)")
    p.add_argument(
        "--max-samples", type=int, default=10_000, help="samples per shard at most (default 10000)"
    )
    p.add_argument(
        "--resize", type=int, default=None, help="downscale images so the shorter side is at most S"
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs (default 90)")
    p.add_argument(
        "--image-column", default=None, help="table column holding image paths (default: detected)"
    )
    p.add_argument("--caption-column", default=None, help="table column holding captions (default: detected)")
    p.add_argument("--caption-separator", default=None, help="split a caption field into several captions")
    p.add_argument("--root", default=None, help="folder image paths are relative to (default: the table's)")
    p.add_argument("--report-bad-rows", action="store_true", help="count malformed rows instead of stopping")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    p.add_argument("--workers", type=int, default=0, help="decode images in this many processes")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data_shards)

    p = sub.add_parser("demo", help="build a model, tokenize, preprocess one image, print shapes")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--image", default=None, help="an image file (default: a generated gradient)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, DistributedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Path", "build_parser", "main"]
