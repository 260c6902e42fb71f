"""A training hook that measures zero-shot accuracy of the current weights every ``run.eval_every`` steps.

    from clipforge.eval.hook import zero_shot_hook
    train(config, hooks=[zero_shot_hook("data/builtin", split="val", max_samples=500)])

The dataset is opened once, when the hook is made (so a wrong path fails before training starts); each call
builds the classifier from the model's current text tower and classifies the images with its image tower.
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

log = logging.getLogger("clipforge.eval")


def zero_shot_hook(
    dataset_spec: str | Path,
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
) -> Callable[[Any], dict[str, float]]:
    """A :data:`clipforge.train.Hook` returning ``{"zeroshot_top1", "zeroshot_top5", "zeroshot_samples",
    "zeroshot_seconds"}`` (the prefix is ``prefix``).

    Class names: ``classnames`` (list or file), else the dataset's own, else the template set's; they go
    through :func:`~clipforge.eval.templates.resolve_classnames` for ``dataset_name`` (default: the template
    set's name). ``max_samples`` evaluates a fixed subset (see :meth:`EvalDataset.subset`), the same each call.
    """
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
