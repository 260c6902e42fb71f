"""The one training hook that scores zero-shot accuracy of the current weights every ``run.eval_every`` steps:
on a streamed labelled dataset (the training API), or on in-memory :class:`~clipforge.eval.zeroshot_set.ZeroShotSet`
s (the demo; the Fig. 2 experiment, with each objective's own zero-shot rule).

    from clipforge.eval.hook import zero_shot_hook
    train(config, hooks=[zero_shot_hook("data/builtin", split="val", max_samples=500)])

A dataset is opened once, when the hook is made (so a wrong path fails before training starts); each call builds
the classifier from the model's current text tower and classifies the images with its image tower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clipforge.eval.datasets import open_eval_dataset
from clipforge.eval.templates import get_templates, resolve_classnames
from clipforge.eval.zeroshot import build_classifier, zero_shot_classify
from clipforge.eval.zeroshot_set import METRICS, ScorerFactory, ZeroShotSet

log = logging.getLogger("clipforge.eval")

Hook = Callable[[Any], dict[str, float]]


def zero_shot_hook(
    data: str | Path | ZeroShotSet | Sequence[ZeroShotSet],
    *,
    classnames: Sequence[str] | str | Path | None = None,
    templates: str | Path = "generic",
    split: str | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    num_workers: int = 0,
    label_field: str = "label",
    dataset_name: str | None = None,
    prefix: str = "zeroshot",
    mode: str = "ensemble",
    scorer: ScorerFactory | None = None,
    metric: str = "mean_per_class",
    transform: Callable[..., Any] | None = None,
    keys: Sequence[str] | None = None,
) -> Hook:
    """A :data:`clipforge.train.Hook` (``context.model``: the current weights).

    ``data`` a dataset spec (any form :func:`~clipforge.eval.datasets.open_eval_dataset` reads): returns
    ``{"<prefix>_top1", "<prefix>_top5", "<prefix>_samples", "<prefix>_seconds"}``, the images streamed in
    batches. Class names: ``classnames`` (list or file), else the dataset's own, else the template set's
    (``templates``); they go through :func:`~clipforge.eval.templates.resolve_classnames` for ``dataset_name``
    (default: the template set's name). ``max_samples`` evaluates a fixed subset, the same each call.

    ``data`` one or more zero-shot sets (in memory; their own class names and templates): returns
    ``{"<prefix>_<set name>": accuracy}`` per set (``keys`` names them instead): without ``scorer``, the
    CLIP classifier's ``mode`` (``ensemble``/``single``) mean per-class accuracy (or ``metric="top1"``); with
    ``scorer`` (an objective's zero-shot rule), :meth:`ZeroShotSet.accuracy` by ``metric``, ``batch_size``
    images at a time, through ``transform`` (default: the model's).
    """
    if isinstance(data, (str, Path)):
        return _dataset_hook(data, classnames, templates, split, batch_size, max_samples, num_workers,
                             label_field, dataset_name, prefix)  # fmt: skip
    sets = [data] if isinstance(data, ZeroShotSet) else list(data)
    if metric not in METRICS:
        raise ValueError(f"metric: unknown {metric!r}; choose from {', '.join(METRICS)}")
    names = list(keys) if keys is not None else [f"{prefix}_{s.name}" for s in sets]
    if len(names) != len(sets):
        raise ValueError(f"zero_shot_hook: {len(names)} keys for {len(sets)} zero-shot sets")

    def score(model: Any, s: ZeroShotSet) -> float:
        if scorer is not None:
            from clipforge.tokenizer import get_tokenizer

            return s.accuracy(model, scorer, tokenizer=get_tokenizer(model), metric=metric,
                              batch_size=batch_size, transform=transform)  # fmt: skip
        result = s.evaluate(model, (mode,), transform=transform)[mode]
        return (result.mean_per_class if metric == "mean_per_class" else result.top1).value

    def sets_hook(context: Any) -> dict[str, float]:
        return {name: score(context.model, s) for name, s in zip(names, sets)}

    return sets_hook


def _dataset_hook(
    dataset_spec: str | Path,
    classnames: Sequence[str] | str | Path | None,
    templates: str | Path,
    split: str | None,
    batch_size: int,
    max_samples: int | None,
    num_workers: int,
    label_field: str,
    dataset_name: str | None,
    prefix: str,
) -> Hook:
    dataset = open_eval_dataset(dataset_spec, split=split, label_field=label_field, classnames=classnames)
    dataset = dataset.subset(max_samples)
    template_set = get_templates(templates)
    raw = dataset.classnames if dataset.classnames is not None else template_set.classnames
    if raw is None:
        raise ValueError(
            f"{dataset_spec}: no class names (none in the data, none in template set {template_set.name!r}); "
            "pass classnames=[...] or a file"
        )
    resolved = resolve_classnames(dataset_name or template_set.name, list(raw))

    def hook(context: Any) -> dict[str, float]:  # context: a clipforge.train.HookContext
        from clipforge.tokenizer import get_tokenizer
        from clipforge.transforms import get_transforms

        started = time.perf_counter()
        model = context.model
        classifier = build_classifier(model, get_tokenizer(model), resolved.names, template_set.templates)
        batches = dataset.batches(get_transforms(model), batch_size, num_workers)
        result = zero_shot_classify(model, classifier, batches, classnames=resolved.names)
        seconds = time.perf_counter() - started
        if result.skipped:
            log.info("zero-shot hook at step %d skipped %s", context.step, result.skipped)
        return {
            f"{prefix}_top1": result.top1,
            f"{prefix}_top5": result.top5,
            f"{prefix}_samples": float(result.num_samples),
            f"{prefix}_seconds": seconds,
        }

    return hook
