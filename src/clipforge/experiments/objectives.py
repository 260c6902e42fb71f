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

from clipforge.eval.hook import zero_shot_hook
from clipforge.eval.zeroshot_set import ZeroShotSet
from clipforge.eval.zeroshot_set import load_zero_shot_set as load_labelled_set
from clipforge.files import atomic_write_text
from clipforge.objectives import OBJECTIVES, get_objective
from clipforge.tokenizer import get_tokenizer
from clipforge.train import HookContext, resolve_train_config, train
from clipforge.transforms import get_transforms

log = logging.getLogger("clipforge.experiments")

METRICS = ("top1", "mean_per_class")
# Auto target: an objective "clearly leaves chance" when its best mean accuracy exceeds chance by this share of the
# best objective's gain over chance; the others count as never reaching it (their ratios become lower bounds).
AUTO_TARGET_MARGIN = 0.2
LABELS = {"captioning": "transformer LM (captioning)", "bag_of_words": "bag-of-words prediction",
          "contrastive": "contrastive (CLIP)"}  # fmt: skip


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
        None  # None: midpoint between chance and the lowest best mean of the objectives clearly above chance
    )
    eval_batch_size: int = 128
    metric: str = (
        "top1"  # or "mean_per_class": each class's accuracy averaged (chance 1/K on unbalanced sets)
    )
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
    objective_name: str, model: torch.nn.Module, data: ZeroShotSet, batch_size: int, metric: str = "top1"
) -> float:
    """Accuracy of ``model`` on ``data`` with the objective's zero-shot rule: ``top1`` (share of images right)
    or ``mean_per_class`` (each class's share right, averaged over the classes present)."""
    scorer = get_objective(objective_name).zero_shot_scorer
    return data.accuracy(model, scorer, metric=metric, batch_size=batch_size, tokenizer=get_tokenizer(model))


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
    if config.metric not in METRICS:
        raise ValueError(f"metric: unknown {config.metric!r}; choose from {', '.join(METRICS)}")
    if config.steps % config.eval_every:
        raise ValueError(f"steps ({config.steps}) must be a multiple of eval_every ({config.eval_every})")
    started = time.perf_counter()
    curves: list[Curve] = []
    for objective in config.objectives:
        for seed in config.seeds:
            curves.append(_run_one(config, data, objective, seed, out / "runs"))
    results = summarise(curves, describe(data, config.metric), config)
    results["wall_time_s"] = time.perf_counter() - started
    _write(results, out)
    return results


def describe(data: ZeroShotSet, metric: str) -> dict[str, Any]:
    """The evaluation set as recorded in ``results.json`` (name, size, templates, metric and its chance)."""
    return {
        "name": data.name,
        "images": len(data),
        "classes": len(data.classnames),
        "templates": list(data.templates),
        "chance": data.chance_for(metric),
        "metric": metric,
    }


def resummarise(
    results_path: str | Path, out_dir: str | Path, target_accuracy: float | None = None
) -> dict[str, Any]:
    """Recompute a finished experiment's summary from its ``results.json`` (the per-run curves), e.g. at another
    target accuracy, without training again; writes ``results.json``, ``results.md`` and ``fig2.png`` into
    ``out_dir`` and returns the results."""
    old = json.loads(Path(results_path).read_text())
    config = {**old["config"], "target_accuracy": target_accuracy}
    config.update({k: tuple(config[k]) for k in ("train_data", "objectives", "seeds")})
    results = summarise([Curve(**run) for run in old["runs"]], old["eval_set"], ExperimentConfig(**config))
    results["wall_time_s"] = old.get("wall_time_s")
    _write(results, Path(out_dir))
    return results


def _write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", markdown(results))
    plot(results, out / "fig2.png")


def _run_one(config: ExperimentConfig, data: ZeroShotSet, objective: str, seed: int, runs: Path) -> Curve:
    points: list[tuple[int, float]] = []
    key = f"zeroshot_{config.metric}"
    score = zero_shot_hook(data, scorer=get_objective(objective).zero_shot_scorer, metric=config.metric,
                           batch_size=config.eval_batch_size, transform=get_transforms(config.model), keys=[key])  # fmt: skip

    def hook(ctx: HookContext) -> dict[str, float]:
        record = score(ctx)
        points.append((ctx.samples_seen, record[key]))
        return record

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


def summarise(curves: Sequence[Curve], eval_set: dict[str, Any], config: ExperimentConfig) -> dict[str, Any]:
    """Seed mean/min/max per objective, images to reach the target accuracy, and the efficiency ratios.
    ``eval_set``: :func:`describe` of the evaluation set (its ``chance`` sets the auto target)."""
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
    chance = eval_set["chance"]
    target = config.target_accuracy
    if (
        target is None
    ):  # halfway from chance to the weakest objective that clearly leaves chance at some point
        top = max(v["best_mean"] for v in per_objective.values())
        clear = chance + AUTO_TARGET_MARGIN * (top - chance)
        above = [v["best_mean"] for v in per_objective.values() if v["best_mean"] > clear]
        lowest_best = min(above) if above else max(v["best_mean"] for v in per_objective.values())
        target = chance + 0.5 * (lowest_best - chance)
    for value in per_objective.values():
        value["images_to_target"] = images_to_reach(value["images_seen"], value["mean"], target)
    ratios = {}
    pairs = [("captioning", "bag_of_words"), ("bag_of_words", "contrastive"), ("captioning", "contrastive")]
    for slow, fast in pairs:
        if slow in per_objective and fast in per_objective:
            ratios[f"{slow}/{fast}"] = _ratio(per_objective[slow], per_objective[fast])
    return {
        "config": {**asdict(config), "objectives": list(config.objectives), "seeds": list(config.seeds)},
        "eval_set": eval_set,
        "target_accuracy": target,
        "objectives": per_objective,
        "efficiency_ratios": ratios,
        "runs": [asdict(c) for c in curves],
    }


def _ratio(slow_curve: dict[str, Any], fast_curve: dict[str, Any]) -> dict[str, Any]:
    """images(slow) / images(fast) at the target, with what kind of number it is: exact (both crossings
    interpolated between evaluations), or a lower bound when the slower one never got there (its budget is used)
    or the faster one was already there at the first evaluation (it may have got there sooner)."""
    slow, fast = slow_curve["images_to_target"], fast_curve["images_to_target"]
    if fast is None or fast == 0:
        return {"value": None, "note": "the faster objective did not reach the target"}
    bounds = []
    if slow is None:
        slow = slow_curve["images_seen"][-1]
        bounds.append("the slower objective never reached the target")
    if fast <= fast_curve["images_seen"][0]:
        bounds.append("the faster one was there at the first evaluation")
    note = "lower bound: " + "; ".join(bounds) if bounds else "exact (interpolated)"
    return {"value": slow / fast, "note": note}


def markdown(results: dict[str, Any]) -> str:
    ev = results["eval_set"]
    metric = {"top1": "top-1", "mean_per_class": "mean per-class accuracy"}[ev.get("metric", "top1")]
    lines = [
        "# Fig. 2: zero-shot accuracy vs images seen, by objective",
        "",
        f"Eval set `{ev['name']}`: {ev['images']} images, {ev['classes']} classes, chance {ev['chance']:.3f}; "
        f"seeds {results['config']['seeds']}; target accuracy {results['target_accuracy']:.3f}.",
        "",
        f"| objective | final {metric} (mean ± std) | best mean | images to target |",
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
    from clipforge.plotting import new_figure, save_figure

    fig = new_figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for name, v in results["objectives"].items():
        x = np.array(v["images_seen"])
        ax.plot(x, v["mean"], marker="o", markersize=3, label=LABELS.get(name, name))
        ax.fill_between(x, v["min"], v["max"], alpha=0.2)
    ax.axhline(results["eval_set"]["chance"], color="gray", linestyle=":", label="chance")
    ax.axhline(results["target_accuracy"], color="black", linestyle="--", linewidth=0.8, label="target")
    ax.set_xlabel("images seen")
    metric = results["eval_set"].get("metric", "top1")
    ax.set_ylabel("zero-shot " + ("top-1 accuracy" if metric == "top1" else "mean per-class accuracy"))
    ax.set_title(f"Objectives at equal images seen ({len(results['config']['seeds'])} seeds, min–max band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120, format="png")


def load_zero_shot_set(spec: str, *, model: str = "tiny", split: str | None = None, classnames: str | None = None,
                       templates: Sequence[str] = ("a photo of a {}.",), max_images: int | None = None,
                       label_field: str = "label", present_only: bool = False) -> ZeroShotSet:  # fmt: skip
    """The experiment's evaluation set: :func:`clipforge.eval.zeroshot_set.load_zero_shot_set` (``classnames``: a
    class names file), preprocessed once with ``model``'s eval transform and named after the data."""
    data = load_labelled_set(spec, split=split, classnames_file=classnames, templates=templates,
                             max_images=max_images, label_field=label_field, present_only=present_only)  # fmt: skip
    data.name = f"{spec}" + (f" [{split}]" if split else "") + (f" (first {len(data)})" if max_images else "")
    data.tensors(get_transforms(model))
    return data
