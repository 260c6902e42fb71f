"""`clipforge demo`: the main job — train a small CLIP from scratch and a locked-tower one, evaluate, report."""

from __future__ import annotations

import argparse

# A short budget with the same pipeline (CI and a first look): a few steps, a smaller batch, and 64 px images
# (the thumbnails' own size; the LiT preset's 128 px makes its locked EfficientNet ~5x slower per image).
QUICK = {"steps": 12, "data.batch_size": 32, "optim.warmup_steps": 4, "run.log_every": 4,
         "run.checkpoint_every": 12, "run.eval_every": 6, "model_overrides.vision.image_size": 64}  # fmt: skip


def _cmd_demo(args: argparse.Namespace) -> int:
    from clipforge.demo import DemoSettings, run_demo
    from clipforge.train.config import parse_override

    overrides = dict(QUICK) if args.quick else {}
    overrides.update(dict(parse_override(o) for o in args.set))
    if args.steps is not None:
        overrides["steps"] = args.steps
    presets = dict(item.split("=", 1) for item in args.preset)
    settings = DemoSettings(
        out_dir=args.out, models=tuple(args.models), presets=presets, overrides=overrides,
        progress=not args.quiet, probe_max_iter=200 if args.quick else 1000,
    )  # fmt: skip
    report = run_demo(settings)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a from-scratch and a locked-tower CLIP (CPU, <= 10 min of training), evaluate, report",
        description="The main job: build the pip datasets on first use, train a small CLIP from scratch and a LiT "
        "CLIP (locked pretrained towers), then zero-shot on a style shift and on held-out concepts (single prompt "
        "vs ensemble, 95%% intervals), retrieval, linear probes, and the raw-pixel baseline on digits.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "--models",
        nargs="+",
        default=["scratch", "lit"],
        choices=["scratch", "lit"],
        help="which models to train (default: both)",
    )
    p.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="MODEL=PRESET",
        help="training preset (name in configs/train or a YAML file) for a model, e.g. scratch=my.yaml",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps of every model (default: the presets')"
    )
    p.add_argument("--quick", action="store_true", help="a one-minute run of the same pipeline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
