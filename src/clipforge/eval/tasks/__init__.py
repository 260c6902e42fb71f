"""Evaluations as tasks: each is ``run(model, data, settings) -> Result`` with a typed settings dataclass, named
in one registry, so the CLI, the demo and a YAML/JSON file declare which evaluations to run.

A spec is plain data: ``{"task": "zeroshot", "data": "imgs/", "templates": "mnist"}`` (every other key is a
setting). :func:`run_tasks` runs a list of them on one model and writes one ``results.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clipforge.errors import ConfigError
from clipforge.eval.tasks.base import (
    DataSettings,
    EncodeSettings,
    EvalModel,
    Result,
    Task,
    make_settings,
    resolve_model,
)
from clipforge.eval.tasks.matching import OverlapSettings, OverlapTask, RetrievalSettings, RetrievalTask
from clipforge.eval.tasks.probes import LinearProbeSettings, LinearProbeTask, PixelSettings, PixelsTask
from clipforge.eval.tasks.zeroshot import (
    PAPER_BASELINE_TEMPLATE,
    ZeroShotSettings,
    ZeroShotTask,
    default_single_template,
)

TASKS: dict[str, Task] = {
    "zeroshot": ZeroShotTask(),
    "linear_probe": LinearProbeTask(),
    "retrieval": RetrievalTask(),
    "pixels": PixelsTask(),
    "overlap": OverlapTask(),
}


def get_task(name: str) -> Task:
    """The registered task ``name`` ("linear-probe", the CLI's spelling, is "linear_probe")."""
    task = TASKS.get(str(name).replace("-", "_"))
    if task is None:
        raise ConfigError(f"unknown evaluation task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return task


def run_specs(model: Any, specs: Sequence[Mapping[str, Any]], out_dir: str | Path | None = None, *,
              where: str = "evaluations") -> dict[str, tuple[Result, Any]]:  # fmt: skip
    """Run every spec on ``model`` (a module, an :class:`EvalModel` or a function returning one, loaded once);
    returns ``{name: (result, settings)}`` in spec order (``name``: the spec's, else its task's, numbered when
    repeated). Figures go to ``out_dir/<name>/`` (none without ``out_dir``). Every spec is checked before
    anything runs; ``where`` names the list in errors (e.g. the YAML file)."""
    planned = _plan(specs, where)
    loaded = resolve_model(model) if planned and model is not None else None
    results: dict[str, tuple[Result, Any]] = {}
    for name, task, data, settings in planned:
        out = None if out_dir is None else Path(out_dir) / name
        results[name] = (task.run(loaded, data, settings, out=out), settings)
    return results


def run_tasks(model: Any, specs: Sequence[Mapping[str, Any]], out_dir: str | Path, *,
              where: str = "evaluations") -> Path:  # fmt: skip
    """:func:`run_specs`, printing each task's lines, then one ``results.json`` in ``out_dir`` holding each
    task's record under its name (and the model's identity); returns its path."""
    from clipforge.eval.report import RESULTS_JSON, write_json
    from clipforge.version import __version__

    started = time.perf_counter()
    results = run_specs(model, specs, out_dir, where=where)
    records: dict[str, Any] = {}
    checkpoint: dict[str, Any] = {}
    for name, (result, settings) in results.items():
        for line in result.lines:
            print(f"{name}: {line}")
        records[name] = result.record(dataclasses.asdict(settings))
        if result.checkpoint.get("fingerprint"):
            checkpoint = result.checkpoint
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"tasks": records, "checkpoint": checkpoint, "clipforge_version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_time_s": time.perf_counter() - started}  # fmt: skip
    return write_json(out / RESULTS_JSON, record)


def _plan(specs: Sequence[Mapping[str, Any]], where: str) -> list[tuple[str, Task, Any, Any]]:
    if not isinstance(specs, Sequence) or isinstance(specs, (str, bytes)):
        raise ConfigError(f"{where}: expected a list of evaluations, got {type(specs).__name__}")
    planned, seen = [], set()
    for index, spec in enumerate(specs, 1):
        at = f"{where}: evaluation {index}"
        if not isinstance(spec, Mapping) or "task" not in spec:
            raise ConfigError(
                f"{at}: expected a mapping with a 'task' key (one of {sorted(TASKS)}), got {spec!r}"
            )
        if spec.get("data") is None:
            raise ConfigError(f"{at} ({spec['task']}): no 'data'; name the data to evaluate on")
        task = get_task(spec["task"])
        values = {k: v for k, v in spec.items() if k not in ("task", "data", "name")}
        name = str(spec.get("name") or task.name)
        base, n = name, 1
        while name in seen:
            n += 1
            name = f"{base}-{n}"
        seen.add(name)
        planned.append((name, task, spec["data"], make_settings(task, values, at)))
    return planned


def load_specs(path: str | Path) -> list[Any]:
    """The evaluation list of a YAML or JSON file: a list of specs, or a mapping with an ``evals`` list."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON ({exc})") from exc
    if isinstance(loaded, Mapping):
        loaded = loaded.get("evals")
    if not isinstance(loaded, list):
        raise ConfigError(
            f"{path}: expected a list of evaluations (or 'evals: [...]'), each with a 'task' key"
        )
    return loaded


__all__ = [
    "PAPER_BASELINE_TEMPLATE",
    "TASKS",
    "DataSettings",
    "EncodeSettings",
    "EvalModel",
    "LinearProbeSettings",
    "OverlapSettings",
    "PixelSettings",
    "Result",
    "RetrievalSettings",
    "Task",
    "ZeroShotSettings",
    "default_single_template",
    "get_task",
    "load_specs",
    "make_settings",
    "resolve_model",
    "run_specs",
    "run_tasks",
]
