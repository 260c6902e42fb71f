"""`clipforge train`: contrastive pretraining (also under torchrun)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    "compile": "compile",
    "lock_text": "lock.text",
    "lock_image": "lock.image",
    "text_unlocked_layers": "lock.text_unlocked_layers",
    "image_unlocked_layers": "lock.image_unlocked_layers",
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


def register(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--compile", action="store_const", const=True, default=None,
                   help="torch.compile the training step's model (compile=true; the CPU needs g++)")  # fmt: skip
    lit = p.add_argument_group("locked towers (LiT)")
    lit.add_argument("--lock-text", action="store_const", const=True, default=None,
                     help="freeze the text tower except its projection (lock.text)")  # fmt: skip
    lit.add_argument("--lock-image", action="store_const", const=True, default=None,
                     help="freeze the image tower except its projection (lock.image)")  # fmt: skip
    lit.add_argument("--text-unlocked-layers", type=int, default=None, metavar="N",
                     help="with --lock-text: its top N layers still train")  # fmt: skip
    lit.add_argument("--image-unlocked-layers", type=int, default=None, metavar="N",
                     help="with --lock-image: its top N blocks still train")  # fmt: skip
    p.add_argument(
        "--resume", default=None, help="'latest' (with --name), a run folder, or a checkpoint file"
    )
    p.set_defaults(func=_cmd_train)
