"""The demo's data plan (``configs/demo/data.json``): which datasets it trains on, and the zero-shot sets it
evaluates on, none of which it ever trains on.

Sources are the built-in dataset (``builtin:<source>``) and the datasets built from pip packages on first use into
the user cache (:func:`clipforge.data.packs.ensure_datasets`, with the plan's split options: held-out classes).
An evaluation set joins one or more parts (a source's split and label field); classes with the same name in
several parts are one class.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.data.raw import DataError
from clipforge.eval.zeroshot_set import ZeroShotSet, load_zero_shot_set

PLAN_PATH = Path(__file__).resolve().parent / "configs" / "demo" / "data.json"
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class DemoData:
    """Where every source of the plan lives, and how long getting them took."""

    plan: dict[str, Any]
    roots: dict[str, Path]  # source name (as in the plan) -> dataset folder
    seconds: float  # ensure_datasets wall time: the first run builds, later runs verify the cache
    built: tuple[str, ...]  # sources built during this call (empty: all were cached)

    def train_specs(self) -> list[str]:
        """The training sources as data specs (shard folders) for ``data.train``."""
        return [str(self.roots[part["source"]] / part["split"]) for part in self.plan["train"]]

    def train_counts(self) -> dict[str, int]:
        counts = {}
        for part in self.plan["train"]:
            manifest = json.loads((self.roots[part["source"]] / part["split"] / "manifest.json").read_text())
            counts[part["source"].removeprefix(BUILTIN_PREFIX)] = int(manifest["num_samples"])
        return counts

    def eval_set(self, name: str, *, section: str = "evals") -> ZeroShotSet:
        return load_joined_set(name, self.plan[section][name], self.roots)


def load_plan(path: str | Path = PLAN_PATH) -> dict[str, Any]:
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot read the demo's data plan ({exc}); restore it from the repository"
        ) from exc
    for key in ("build", "train", "evals"):
        if key not in plan:
            raise DataError(f"{path}: the data plan has no {key!r} section")
    return plan


def prepare(plan: Mapping[str, Any] | None = None, *, progress: bool = True) -> DemoData:
    """Build (first run) or verify (later runs) every pip source of the plan; locate the built-in ones."""
    from clipforge.data.builtin import builtin_dataset_path
    from clipforge.data.packs import cache_root, ensure_datasets

    plan = dict(plan or load_plan())
    names = list(plan["build"])
    started = time.perf_counter()
    before = (
        {p.name for p in (cache_root() / "data").glob("*")} if (cache_root() / "data").is_dir() else set()
    )
    roots: dict[str, Path] = dict(ensure_datasets(names, options=plan["build"], progress=progress))
    after = {p.name for p in (cache_root() / "data").glob("*")}
    built = tuple(sorted(name for name in names if roots[name].name in after - before))
    seconds = time.perf_counter() - started
    used = {part["source"] for part in plan["train"]}
    used |= {
        p["source"]
        for section in ("evals", "validation")
        for e in plan.get(section, {}).values()
        for p in e["parts"]
    }
    for source in sorted(used):
        if source.startswith(BUILTIN_PREFIX):
            roots[source] = builtin_dataset_path(source.removeprefix(BUILTIN_PREFIX))
        elif source not in roots:
            raise DataError(f"data plan: source {source!r} is neither built-in nor in its 'build' section")
    return DemoData(plan, roots, seconds, built)


def load_joined_set(name: str, spec: Mapping[str, Any], roots: Mapping[str, Path]) -> ZeroShotSet:
    """One zero-shot set from the plan: its parts loaded and joined, classes merged by name (sorted)."""
    from clipforge.eval.templates import get_templates

    templates = tuple(get_templates(spec["templates"]).templates)
    parts = [
        load_zero_shot_set(roots[p["source"]], split=p["split"], label_field=p.get("label_field", "label"),
                           templates=templates)
        for p in spec["parts"]
    ]  # fmt: skip
    # Only classes with images here are candidates (a split's class list names every class of its dataset).
    classnames = sorted({part.classnames[label] for part in parts for label in set(part.labels.tolist())})
    index = {c: k for k, c in enumerate(classnames)}
    images, labels = [], []
    for part in parts:
        images += part.images
        labels += [index[part.classnames[label]] for label in part.labels]
    sources = ", ".join(f"{p['source']}/{p['split']}" for p in spec["parts"])
    return ZeroShotSet(
        name, images, np.asarray(labels), tuple(classnames), templates, spec.get("kind", ""), sources
    )
