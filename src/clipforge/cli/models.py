"""`clipforge models`, `convert` and `info`: the architectures and checkpoint files."""

from __future__ import annotations

import argparse
import json
import time

from clipforge.checkpoint import FORMATS


def _cmd_models(args: argparse.Namespace) -> int:
    from clipforge.config import get_model_config, list_models

    for name in list_models():
        config = get_model_config(name)
        v, t = config.vision, config.text
        if v.tower:  # pretrained towers (LiT) print their names
            tower = f"{v.tower} (pretrained)"
        elif v.arch == "vit":
            tower = f"ViT-{v.width}x{v.layers}/{v.patch_size}"
        else:
            tower = f"ResNet{list(v.layers)}x{v.width}"
        text = f"{t.tower} (pretrained)" if t.tower else f"{t.width}x{t.layers}"
        print(
            f"{name:17s} {tower:31s} {v.image_size:4d}px  text {text}  embed {config.embed_dim}  "
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


def register(sub: argparse._SubParsersAction) -> None:
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
