"""`clipforge experiment objectives`: the paper's Fig. 2 comparison of training objectives."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_objectives(args: argparse.Namespace) -> int:
    from clipforge.experiments.objectives import (
        ExperimentConfig,
        load_zero_shot_set,
        run_objectives_experiment,
    )
    from clipforge.train.config import parse_override

    if args.from_results:
        from clipforge.experiments.objectives import resummarise

        resummarise(args.from_results, args.out, args.target)
        print(Path(args.out, "results.md").read_text())
        print(f"results: {Path(args.out) / 'results.json'}\nplot:    {Path(args.out) / 'fig2.png'}")
        return 0

    data = args.data or [str(_builtin(source) / "train") for source in ("emoji", "openclipart")]
    eval_spec = args.eval_data or str(_builtin("openclipart"))
    eval_split = args.eval_split if args.eval_data or args.eval_split else "test"
    default_template = (
        "a photo of a {}." if args.eval_data else "a clip-art drawing of a {}"
    )  # built-in: clip art
    templates = tuple(t.strip() for t in args.template) if args.template else (default_template,)
    zero_shot = load_zero_shot_set(eval_spec, model=args.model, split=eval_split, classnames=args.classnames,
                                   templates=templates, max_images=args.eval_images,
                                   present_only=args.present_classes_only)  # fmt: skip
    overrides = dict(parse_override(o) for o in args.set)
    overrides.setdefault("data.num_workers", args.workers)
    overrides.setdefault("run.progress", not args.quiet)
    config = ExperimentConfig(
        train_data=tuple(data),
        model=args.model,
        objectives=tuple(o.strip() for o in args.objectives.split(",")),
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        steps=args.steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        lr=args.lr,
        target_accuracy=args.target,
        metric=args.metric,
        train_overrides=overrides,
    )
    results = run_objectives_experiment(config, zero_shot, args.out)
    out = Path(args.out)
    print((out / "results.md").read_text())
    print(
        f"results: {out / 'results.json'}\nplot:    {out / 'fig2.png'}\nwall time {results['wall_time_s']:.0f} s"
    )
    return 0


def _builtin(source: str) -> Path:
    from clipforge.data.builtin import builtin_dataset_path

    return builtin_dataset_path(source)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="reproduce the paper's comparisons on your data")
    exp_sub = p.add_subparsers(dest="experiment", required=True)
    p = exp_sub.add_parser(
        "objectives",
        help="Fig. 2: captioning vs bag-of-words vs contrastive at equal images seen",
        description="Train each objective with the same encoder, data, budget and seeds; evaluate zero-shot "
        "accuracy every --eval-every steps; write results.json, results.md and fig2.png.",
    )
    p.add_argument(
        "--data", action="append", default=None, help="training data (default: the built-in train splits)"
    )
    p.add_argument(
        "--eval-data",
        default=None,
        help="labelled zero-shot set (default: the built-in openclipart data, split test)",
    )
    p.add_argument("--eval-split", default=None, help="split folder of --eval-data (built-in default: test)")
    p.add_argument("--eval-images", type=int, default=None, help="use only the first N evaluation images")
    p.add_argument("--classnames", default=None, help="class names file for the evaluation set")
    p.add_argument(
        "--present-classes-only",
        action="store_true",
        help="classify among the classes that have evaluation images only (e.g. --eval-split test_heldout)",
    )
    p.add_argument("--template", action="append", default=None, help="prompt template(s), '{}' = class name")
    p.add_argument(
        "--model", default="tiny", help="architecture (the image tower is shared by all objectives)"
    )
    p.add_argument("--objectives", default="captioning,bag_of_words,contrastive")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--from-results",
        default=None,
        help="no training: summarise a finished run's results.json again (e.g. with another --target) into --out",
    )
    p.add_argument(
        "--metric",
        choices=("top1", "mean_per_class"),
        default="top1",
        help="zero-shot accuracy: top-1, or mean per-class (chance 1/K on unbalanced eval sets)",
    )
    p.add_argument(
        "--target", type=float, default=None, help="accuracy for the efficiency ratios (default: auto)"
    )
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    p.add_argument("--out", default="runs/objectives", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_objectives)
