"""What every evaluation task shares: the settings every task reads (data opening and encoding), the model a task
is given (loaded now or on first use), the :class:`Result` it returns, and the steps from a data spec to
features."""

from __future__ import annotations

import dataclasses
import logging
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clipforge.errors import ConfigError

log = logging.getLogger("clipforge.eval")


@dataclass
class DataSettings:
    """How a task opens its data (a folder, table or shards; see :func:`clipforge.eval.open_eval_dataset`)."""

    label_field: str = "label"
    image_field: str | None = None
    classnames: str | tuple[str, ...] | None = None  # a class names file, or the names in label order
    max_samples: int | None = None  # at most this many samples per set
    batch_size: int = 64
    quiet: bool = False  # no progress bars


@dataclass
class EncodeSettings(DataSettings):
    """Data opening plus how images are encoded."""

    workers: int = 0  # DataLoader worker processes
    precision: str = "fp32"
    cache_dir: str | None = None  # feature cache (None: ~/.cache/clipforge/features)
    no_cache: bool = False


@dataclass
class EvalModel:
    """A model to evaluate and its identity as recorded in ``results.json`` (``spec``, ``fingerprint``, ...)."""

    module: Any
    identity: dict[str, Any]


# A task's ``model``: a module, an EvalModel, or a function returning one (loaded when the task first needs it,
# so that errors in the data or settings come before a slow or failing model load).
ModelArg = Any


def resolve_model(model: ModelArg) -> EvalModel:
    """The :class:`EvalModel` behind a task's ``model`` argument."""
    if model is None:
        raise ConfigError("this evaluation needs a model; pass one (a checkpoint or an architecture name)")
    from torch import nn

    if callable(model) and not isinstance(model, (nn.Module, EvalModel)):
        model = model()  # a loader
    if isinstance(model, EvalModel):
        return model
    from clipforge.eval.features import model_fingerprint

    config = getattr(model, "config", None)
    identity: dict[str, Any] = {"spec": getattr(config, "name", type(model).__name__)}
    if config is not None:
        identity.update(architecture=config.name, activation=config.activation,
                        image_size=config.vision.image_size)  # fmt: skip
    identity["fingerprint"] = model_fingerprint(model)
    return EvalModel(model, identity)


@dataclass
class Result:
    """One task's outcome: JSON-ready ``metrics`` (flat headline numbers), the lines printed for a person, and
    what ``results.json``/``results.md`` record besides (datasets by role, skip counts, details, extra tables,
    the figures written)."""

    task: str
    metrics: dict[str, Any]
    lines: list[str]
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, list[str], list[Any]]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    wall_time_s: float = 0.0

    def write(self, out_dir: str | Path, settings: Mapping[str, Any]) -> Path:
        """``results.json`` and ``results.md`` in ``out_dir`` (see :func:`clipforge.eval.report.write_results`)."""
        from clipforge.eval.report import write_results

        return write_results(out_dir, task=self.task, metrics=self.metrics, settings=settings,
                             datasets=self.datasets, checkpoint=self.checkpoint, skipped=self.skipped,
                             details=self.details, wall_time_s=self.wall_time_s, tables=self.tables)  # fmt: skip

    def record(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of ``results.json`` for this task (as one entry of ``clipforge eval run``'s file)."""
        return {"task": self.task, "metrics": self.metrics, "settings": dict(settings), "datasets": self.datasets,
                "checkpoint": self.checkpoint, "skipped": self.skipped, "details": self.details,
                "figures": [str(p) for p in self.figures], "wall_time_s": self.wall_time_s}  # fmt: skip


class Task(Protocol):
    """An evaluation: a name, a settings dataclass with defaults, and one ``run``.

    ``data``: what the task reads (a spec string or path, an opened ``EvalDataset``, or already-encoded
    ``EncodedImages``; the probes take a mapping of roles, ``{"train": ..., "test": ...}``). ``out``: where
    figures go (None: none are drawn).
    """

    name: str
    Settings: type

    def run(self, model: ModelArg, data: Any, settings: Any, *, out: Path | None = None) -> Result: ...


def make_settings(task: Task, values: Mapping[str, Any], where: str) -> Any:
    """``task.Settings`` from plain data (a YAML/JSON entry), checking each name and type; ``where`` names the
    entry in errors."""
    fields = {f.name: f for f in dataclasses.fields(task.Settings)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting(s) {unknown} for task {task.name!r}; known: {sorted(fields)}"
        )
    hints = typing.get_type_hints(task.Settings)
    for name, value in values.items():
        if not _fits(value, hints[name]):
            raise ConfigError(
                f"{where}: setting {name!r} of task {task.name!r} is {value!r} ({type(value).__name__}); "
                f"expected {_describe(hints[name])}"
            )
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return task.Settings(**converted)


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (tuple, list):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (tuple, list):
        return f"a list of {_describe(args[0])}"
    if args:
        return " or ".join(_describe(a) for a in args)
    return "null" if hint is type(None) else hint.__name__


# ----------------------------------------------------------------------------------------------------------------
# From a data spec to features


def open_data(data: Any, settings: DataSettings, split: str | None, **fields: Any) -> Any:
    """``data`` opened as an ``EvalDataset`` (a spec string or path), its notes logged, cut to
    ``settings.max_samples``; an opened dataset or encoded features pass through as they are."""
    from clipforge.eval.dataset import EvalDataset
    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.eval.features import EncodedImages

    if isinstance(data, (EvalDataset, EncodedImages)):
        return data
    dataset = open_eval_dataset(data, split=split, label_field=settings.label_field, classnames=settings.classnames,
                                image_field=settings.image_field, **fields)  # fmt: skip
    for note in dataset.notes:
        log.info("note: %s", note)
    return dataset.subset(settings.max_samples)


def encode(model: EvalModel, dataset: Any, settings: EncodeSettings) -> Any:
    """The dataset's image features (``EncodedImages`` pass through), through the feature cache unless
    ``settings.no_cache``."""
    from clipforge.eval.features import EncodedImages, FeatureCache, encode_images

    if isinstance(dataset, EncodedImages):
        return dataset
    return encode_images(
        model.module, dataset, batch_size=settings.batch_size, num_workers=settings.workers,
        precision=settings.precision, cache=None if settings.no_cache else FeatureCache(settings.cache_dir),
        fingerprint=model.identity.get("fingerprint"), progress=not settings.quiet,
    )  # fmt: skip


def describe(dataset: Any) -> dict[str, Any]:
    """The dataset's description for ``results.json`` (encoded features carry none of their own)."""
    if hasattr(dataset, "describe"):
        return dataset.describe()
    return {"spec": "encoded features", "num_samples": len(dataset.labels)}


def labelled(encoded: Any, role: str) -> tuple[Any, Any, dict[str, int]]:
    """Features and labels of the labelled samples, and the skip counts with the unlabelled ones added."""
    keep = encoded.labels >= 0
    dropped = int((~keep).sum())
    counts = dict(encoded.skipped)
    if dropped:
        counts["missing_label"] = counts.get("missing_label", 0) + dropped
        log.warning("%s data: %d samples have no label and are left out", role, dropped)
    return encoded.features[keep], encoded.labels[keep], counts


class Timer:
    """Seconds since the task started (``results.json``'s ``wall_time_s``)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.started
