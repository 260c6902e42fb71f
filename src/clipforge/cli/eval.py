"""`clipforge eval zeroshot|linear-probe|retrieval|pixels|overlap|run`: the paper's evaluations on folders, tables
or shards; each writes ``results.json`` and ``results.md`` (and pictures) into ``--out`` and prints the path.

Each sub-command is parse → settings → :func:`clipforge.eval.tasks.get_task` ``.run`` → write; the evaluations
themselves live in :mod:`clipforge.eval.tasks`. ``run`` runs a YAML/JSON list of them on one model."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from clipforge.eval.tasks import default_single_template

# The single-template default, kept importable under its old name.
_default_single_template = default_single_template


def _load_model(args: argparse.Namespace) -> Any:
    """The model named by ``--model`` (a checkpoint, or a registered name with random weights: see
    :func:`clipforge.inference.load_model`) and its identity, as an :class:`~clipforge.eval.tasks.EvalModel`."""
    from clipforge.device import resolve_device
    from clipforge.eval.features import model_fingerprint
    from clipforge.eval.tasks import EvalModel
    from clipforge.inference import RANDOM_WEIGHTS_SEED, load_model

    spec = args.model
    path = Path(spec).expanduser()
    model = load_model(spec, activation=args.activation)
    identity: dict[str, Any] = {"spec": spec}
    if path.exists():
        identity.update(path=str(path.resolve()), random_weights=False)
    else:
        identity.update(random_weights=True, seed=RANDOM_WEIGHTS_SEED)
    device = resolve_device(args.device)
    model = model.to(device).eval()
    identity.update(
        architecture=model.config.name,
        activation=model.config.activation,
        image_size=model.config.vision.image_size,
        fingerprint=model_fingerprint(model),
        device=str(device),
    )
    return EvalModel(model, identity)


def _task_settings(task: Any, args: argparse.Namespace) -> Any:
    """The task's settings dataclass from the parsed flags of the same names."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(task.Settings) if hasattr(args, f.name)
    }
    return task.Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _task_data(args: argparse.Namespace) -> Any:
    """What the sub-command's task reads: one data spec, the probes' roles, or overlap's eval/train pair."""
    if args.eval_task in ("linear-probe", "pixels"):
        return {"root": args.data, "train": args.train_data, "val": args.val_data, "test": args.test_data}
    if args.eval_task == "overlap":
        return {"eval": args.data, "train": args.train_data}
    return args.data


def _recorded_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command") and not callable(v)}


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return Path("evals") / f"{args.eval_task}-{time.strftime('%Y%m%d-%H%M%S')}"


def _cmd_task(args: argparse.Namespace) -> int:
    """One evaluation sub-command: parse → settings → task → write."""
    from clipforge.eval.tasks import get_task

    task = get_task(args.eval_task)
    out = _out_dir(args)
    model = None if args.eval_task == "pixels" else (lambda: _load_model(args))
    result = task.run(model, _task_data(args), _task_settings(task, args), out=out)
    path = result.write(out, _recorded_settings(args))
    for line in result.lines:
        print(line)
    print(f"results: {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """``clipforge eval run --config evals.yaml``: every evaluation the file lists, one results.json."""
    from clipforge.eval.tasks import load_specs, run_tasks

    specs = load_specs(args.config)
    out = _out_dir(args)
    path = run_tasks(lambda: _load_model(args), specs, out, where=str(args.config))
    print(f"results: {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="checkpoint (any supported format) or an architecture "
                       "name (random weights, for testing the pipeline)")  # fmt: skip
        p.add_argument("--activation", choices=["quick_gelu", "gelu"], default=None,
                       help="activation of OpenAI/open_clip-layout state dicts (not recorded in those files)")  # fmt: skip
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
        p.add_argument(
            "--cache-dir", default=None, help="feature cache (default ~/.cache/clipforge/features)"
        )
        p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--label-field", default="label", help="label column / json field (default: label)")
    p.add_argument("--image-field", default=None, help="image-path column of a table (default: detected)")
    p.add_argument("--classnames", default=None, help="class names file (.txt one per line, or .json list)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many samples per set")
    p.add_argument("--out", default=None, help="output folder (default evals/<task>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="a folder with train/ and test/ (and val/) split subfolders")
    p.add_argument("--train-data", default=None)
    p.add_argument("--val-data", default=None, help="validation data for choosing C (default: val/ split, or a "
                   "stratified 20%% of train)")  # fmt: skip
    p.add_argument("--test-data", default=None)
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--test-split", "--split", dest="test_split", default="test")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="validation-split / k-shot seeds")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: zero-shot, linear probe, retrieval, pixels, overlap")
    tasks = p.add_subparsers(dest="eval_task", required=True)

    p = tasks.add_parser("zeroshot", help="zero-shot classification with prompt ensembles")
    p.add_argument("--data", required=True, help="class folders, a labelled table, or shards")
    p.add_argument("--split", default=None, help="subfolder of --data (e.g. test)")
    p.add_argument("--templates", default="generic", help="template set name or a .txt/.json file")
    p.add_argument("--dataset-name", default=None, help="dataset whose class-name overrides apply "
                   "(default: the template set's name)")  # fmt: skip
    p.add_argument("--single-template", nargs="?", const="", default=None, metavar="TEMPLATE",
                   help="also classify with one template (default: 'a photo of a {}.' if the set has it, else "
                   "its first) and report the ensemble's gain")  # fmt: skip
    _common(p)
    p.set_defaults(func=_cmd_task)

    p = tasks.add_parser("linear-probe", help="logistic regression on frozen features (the paper's protocol)")
    _probe_arguments(p)
    p.add_argument(
        "--few-shot", type=int, default=None, metavar="K", help="k examples per class, over --seeds"
    )
    _common(p)
    p.set_defaults(func=_cmd_task)

    p = tasks.add_parser("retrieval", help="image<->text retrieval Recall@K with several captions per image")
    p.add_argument(
        "--data", required=True, help="captioned data: table, shards, or images with .txt captions"
    )
    p.add_argument("--split", default=None)
    p.add_argument("--caption-field", nargs="+", default=None, help="caption column(s) (default: detected)")
    p.add_argument("--caption-separator", default=None, help="split a caption field into several captions")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    _common(p)
    p.set_defaults(func=_cmd_task)

    p = tasks.add_parser("pixels", help="logistic regression on raw pixels (the paper's MNIST yardstick)")
    _probe_arguments(p)
    p.add_argument("--size", type=int, default=16, help="pixels per side (default 16)")
    p.add_argument("--grayscale", action="store_true")
    _common(p, model=False)
    p.set_defaults(func=_cmd_task)

    p = tasks.add_parser("overlap", help="near-duplicates of evaluation images in the training data")
    p.add_argument("--data", required=True, help="the evaluation images")
    p.add_argument("--split", default=None)
    p.add_argument("--train-data", default=None, help="the training images")
    p.add_argument(
        "--threshold", type=float, default=0.95, help="cosine at or above which a pair is a duplicate"
    )
    p.add_argument("--hash-threshold", type=int, default=6, help="perceptual-hash distance at or below which")
    p.add_argument("--top", type=int, default=24, help="pairs drawn in overlap.png")
    _common(p)
    p.set_defaults(func=_cmd_task)

    p = tasks.add_parser("run", help="run the evaluations a YAML/JSON file lists (one results.json)")
    p.add_argument("--config", required=True, help="a YAML/JSON list of {task: ..., data: ..., <settings>}")
    p.add_argument("--model", required=True, help="checkpoint or architecture name (as for the other tasks)")
    p.add_argument("--activation", choices=["quick_gelu", "gelu"], default=None)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--out", default=None, help="output folder (default evals/run-<time>)")
    p.set_defaults(func=_cmd_run)
