"""The paper's Fig. 2 experiment: zero-shot accuracy against images seen for three objectives trained with the
same image encoder, data, budget and seeds — caption prediction (a transformer LM), bag-of-words prediction,
and contrastive (CLIP).

Each (objective, seed) is an ordinary :func:`clipforge.train.train` run with an evaluation hook that scores a
fixed zero-shot set every ``eval_every`` steps with the objective's own zero-shot rule. Efficiency is compared
the paper's way: the images each objective needs to reach the same accuracy, interpolated on its seed-mean
curve; a ratio > 1 means the second objective needs fewer images.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.objectives import OBJECTIVES, get_objective
from clipforge.tokenizer import get_tokenizer
from clipforge.train import HookContext, resolve_train_config, train

log = logging.getLogger("clipforge.experiments")

LABELS = {"captioning": "transformer LM (captioning)", "bag_of_words": "bag-of-words prediction",
          "contrastive": "contrastive (CLIP)"}  # fmt: skip


@dataclass(frozen=True)
class ZeroShotSet:
    """A fixed evaluation set, already preprocessed with the model's eval transform."""

    images: torch.Tensor  # [N, 3, S, S]
    labels: torch.Tensor  # [N] class indices
    classnames: tuple[str, ...]
    templates: tuple[str, ...] = ("a photo of a {}.",)
    name: str = "eval"

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0] or self.images.shape[0] == 0:
            raise ValueError(
                f"zero-shot set {self.name!r}: {self.images.shape[0]} images, {self.labels.shape[0]} labels"
            )
        if int(self.labels.max()) >= len(self.classnames) or int(self.labels.min()) < 0:
            raise ValueError(f"zero-shot set {self.name!r}: labels outside 0..{len(self.classnames) - 1}")

    @property
    def chance(self) -> float:
        """Accuracy of always predicting the most frequent class."""
        return float(torch.bincount(self.labels).max()) / self.labels.shape[0]


@dataclass(frozen=True)
class ExperimentConfig:
    train_data: tuple[str, ...]
    model: str = "tiny"
    objectives: tuple[str, ...] = OBJECTIVES
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200
    batch_size: int = 64
    eval_every: int = 20
    lr: float = 5e-4
    target_accuracy: float | None = (
        None  # None: the midpoint between chance and the lowest best mean accuracy
    )
    eval_batch_size: int = 128
    train_overrides: dict[str, Any] = field(default_factory=dict)  # dotted TrainConfig keys for every run


@dataclass
class Curve:
    objective: str
    seed: int
    images_seen: list[int]
    accuracy: list[float]
    final_loss: float | None
    wall_time_s: float


def zero_shot_accuracy(
    objective_name: str, model: torch.nn.Module, data: ZeroShotSet, batch_size: int
) -> float:
    """Top-1 accuracy of ``model`` on ``data`` with the objective's zero-shot rule."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        scorer = get_objective(objective_name).zero_shot_scorer(
            model, get_tokenizer(model), data.classnames, data.templates
        )
        device = next(model.parameters()).device
        correct = 0
        for start in range(0, data.images.shape[0], batch_size):
            scores = scorer(data.images[start : start + batch_size].to(device))
            correct += int((scores.argmax(dim=1).cpu() == data.labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / data.images.shape[0]


def run_objectives_experiment(
    config: ExperimentConfig, data: ZeroShotSet, out_dir: str | Path
) -> dict[str, Any]:
    """Train every (objective, seed), evaluate along the way, write ``results.json``, ``results.md`` and
    ``fig2.png`` into ``out_dir``; returns the results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(config.objectives) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"objectives: unknown {unknown}; choose from {', '.join(OBJECTIVES)}")
    if config.steps % config.eval_every:
        raise ValueError(f"steps ({config.steps}) must be a multiple of eval_every ({config.eval_every})")
    started = time.perf_counter()
    curves: list[Curve] = []
    for objective in config.objectives:
        for seed in config.seeds:
            curves.append(_run_one(config, data, objective, seed, out / "runs"))
    results = summarise(curves, data, config)
    results["wall_time_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "fig2.png")
    return results


def _run_one(config: ExperimentConfig, data: ZeroShotSet, objective: str, seed: int, runs: Path) -> Curve:
    points: list[tuple[int, float]] = []

    def hook(ctx: HookContext) -> dict[str, float]:
        accuracy = zero_shot_accuracy(objective, ctx.model, data, config.eval_batch_size)
        points.append((ctx.samples_seen, accuracy))
        return {"zeroshot_top1": accuracy}

    overrides = {
        "model": config.model, "objective": objective, "seed": seed, "steps": config.steps,
        "data.train": list(config.train_data), "data.batch_size": config.batch_size, "optim.lr": config.lr,
        "run.eval_every": config.eval_every, "run.output_dir": str(runs), "run.name": f"{objective}-seed{seed}",
        "run.checkpoint_every": config.steps, "run.keep_last": 1,
        **config.train_overrides,
    }  # fmt: skip
    log.info("training %s, seed %d", objective, seed)
    summary = train(resolve_train_config(None, overrides), hooks=[hook])
    return Curve(objective, seed, [p[0] for p in points], [p[1] for p in points], summary.final_loss,
                 summary.wall_time_s)  # fmt: skip


def images_to_reach(images_seen: Sequence[int], accuracy: Sequence[float], target: float) -> float | None:
    """Images seen when ``accuracy`` first reaches ``target``: the first evaluation's count if it is already
    there, else linearly interpolated between the two evaluations around the crossing; None if it never does."""
    for i, (seen, value) in enumerate(zip(images_seen, accuracy)):
        if value >= target:
            if i == 0:
                return float(seen)
            before_seen, before = images_seen[i - 1], accuracy[i - 1]
            return before_seen + (target - before) / (value - before) * (seen - before_seen)
    return None


def summarise(curves: Sequence[Curve], data: ZeroShotSet, config: ExperimentConfig) -> dict[str, Any]:
    """Seed mean/min/max per objective, images to reach the target accuracy, and the efficiency ratios."""
    per_objective: dict[str, dict[str, Any]] = {}
    for objective in dict.fromkeys(c.objective for c in curves):
        runs = [c for c in curves if c.objective == objective]
        acc = np.array([c.accuracy for c in runs])
        per_objective[objective] = {
            "images_seen": runs[0].images_seen,
            "mean": acc.mean(0).tolist(),
            "min": acc.min(0).tolist(),
            "max": acc.max(0).tolist(),
            "std": acc.std(0).tolist(),
            "final_mean": float(acc[:, -1].mean()),
            "final_std": float(acc[:, -1].std()),
            "best_mean": float(acc.mean(0).max()),
        }
    chance = data.chance
    target = config.target_accuracy
    if target is None:  # halfway from chance to the weakest objective that beats chance at some point
        above = [v["best_mean"] for v in per_objective.values() if v["best_mean"] > chance]
        lowest_best = min(above) if above else max(v["best_mean"] for v in per_objective.values())
        target = chance + 0.5 * (lowest_best - chance)
    for value in per_objective.values():
        value["images_to_target"] = images_to_reach(value["images_seen"], value["mean"], target)
    ratios = {}
    pairs = [("captioning", "bag_of_words"), ("bag_of_words", "contrastive"), ("captioning", "contrastive")]
    for slow, fast in pairs:
        if slow in per_objective and fast in per_objective:
            ratios[f"{slow}/{fast}"] = _ratio(per_objective[slow]["images_to_target"],
                                              per_objective[fast]["images_to_target"], per_objective[slow])  # fmt: skip
    return {
        "config": {**asdict(config), "objectives": list(config.objectives), "seeds": list(config.seeds)},
        "eval_set": {
            "name": data.name,
            "images": int(data.images.shape[0]),
            "classes": len(data.classnames),
            "templates": list(data.templates),
            "chance": chance,
        },
        "target_accuracy": target,
        "objectives": per_objective,
        "efficiency_ratios": ratios,
        "runs": [asdict(c) for c in curves],
    }


def _ratio(slow: float | None, fast: float | None, slow_curve: dict[str, Any]) -> dict[str, Any]:
    """images(slow) / images(fast) at the target; a lower bound when the slow one never got there."""
    if fast is None or fast == 0:
        return {"value": None, "note": "the faster objective did not reach the target"}
    if slow is None:
        budget = slow_curve["images_seen"][-1]
        return {"value": budget / fast, "note": "lower bound: the slower objective never reached the target"}
    return {"value": slow / fast, "note": "exact (interpolated)"}


def markdown(results: dict[str, Any]) -> str:
    ev = results["eval_set"]
    lines = [
        "# Fig. 2: zero-shot accuracy vs images seen, by objective",
        "",
        f"Eval set `{ev['name']}`: {ev['images']} images, {ev['classes']} classes, chance {ev['chance']:.3f}; "
        f"seeds {results['config']['seeds']}; target accuracy {results['target_accuracy']:.3f}.",
        "",
        "| objective | final top-1 (mean ± std) | best mean | images to target |",
        "|---|---|---|---|",
    ]
    for name, v in results["objectives"].items():
        reach = f"{v['images_to_target']:,.0f}" if v["images_to_target"] is not None else "not reached"
        lines.append(f"| {LABELS.get(name, name)} | {v['final_mean']:.3f} ± {v['final_std']:.3f} | "
                     f"{v['best_mean']:.3f} | {reach} |")  # fmt: skip
    lines += ["", "| efficiency ratio (images needed) | value | note |", "|---|---|---|"]
    for key, r in results["efficiency_ratios"].items():
        value = f"{r['value']:.2f}×" if r["value"] is not None else "n/a"
        lines.append(f"| {key} | {value} | {r['note']} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, v in results["objectives"].items():
        x = np.array(v["images_seen"])
        ax.plot(x, v["mean"], marker="o", markersize=3, label=LABELS.get(name, name))
        ax.fill_between(x, v["min"], v["max"], alpha=0.2)
    ax.axhline(results["eval_set"]["chance"], color="gray", linestyle=":", label="chance")
    ax.axhline(results["target_accuracy"], color="black", linestyle="--", linewidth=0.8, label="target")
    ax.set_xlabel("images seen")
    ax.set_ylabel("zero-shot top-1 accuracy")
    ax.set_title(f"Objectives at equal images seen ({len(results['config']['seeds'])} seeds, min–max band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def load_zero_shot_set(spec: str, *, model: str = "tiny", split: str | None = None, classnames: str | None = None,
                       templates: Sequence[str] = ("a photo of a {}.",), max_images: int | None = None,
                       label_field: str = "label") -> ZeroShotSet:  # fmt: skip
    """Read a labelled evaluation set (any form :func:`clipforge.eval.datasets.open_eval_dataset` reads) and
    preprocess it once with ``model``'s eval transform. Images that fail to load are skipped and counted."""
    from clipforge.config import get_model_config
    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.transforms import get_transforms

    dataset = open_eval_dataset(spec, split=split, label_field=label_field, classnames=classnames)
    if not dataset.classnames:
        raise ValueError(f"{spec}: no class names found; pass --classnames FILE")
    transform = get_transforms(get_model_config(model))
    images, labels = [], []
    for sample in dataset:
        if sample.label is None:
            raise ValueError(f"{spec}: sample {sample.key} has no '{label_field}' label")
        images.append(transform(sample.image))
        labels.append(sample.label)
        if max_images is not None and len(images) >= max_images:
            break
    return ZeroShotSet(torch.stack(images), torch.tensor(labels), tuple(dataset.classnames), tuple(templates),
                       name=f"{spec}" + (f" [{split}]" if split else "") + (f" (first {len(images)})" if max_images else ""))  # fmt: skip
