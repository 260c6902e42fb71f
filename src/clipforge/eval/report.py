"""What an evaluation leaves behind: ``results.json`` (metrics, settings, dataset and checkpoint identity, skip
counts, version, wall time), ``results.md`` (the same as markdown tables) and, for zero-shot, ``confusion.png``."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.files import atomic_write_text
from clipforge.version import __version__

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CONFUSION_PNG = "confusion.png"
MAX_LABELLED_CLASSES = 40


def jsonable(value: Any) -> Any:
    """``value`` with numpy values, paths and non-finite floats (-> None) made JSON-serialisable, recursively."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, record: Mapping[str, Any]) -> Path:
    """``record`` as indented JSON (made :func:`jsonable`), written atomically; returns ``path``."""
    path = Path(path)
    atomic_write_text(path, json.dumps(jsonable(record), indent=2) + "\n")
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table; floats with 4 decimals."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str | Path,
    *,
    task: str,
    metrics: Mapping[str, Any],
    settings: Mapping[str, Any],
    datasets: Mapping[str, Mapping[str, Any]],
    checkpoint: Mapping[str, Any],
    skipped: Mapping[str, Mapping[str, int]] | None = None,
    details: Mapping[str, Any] | None = None,
    wall_time_s: float | None = None,
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = (),
) -> Path:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns the JSON path.

    ``metrics``: headline numbers (flat). ``datasets``: per role ("data", "train", "test", ...) the dataset's
    :meth:`~clipforge.eval.dataset.EvalDataset.describe`. ``skipped``: per role, counts by reason. ``details``:
    anything else for programs (per-class recall, confusion, ...). ``tables``: extra (title, headers, rows)
    for the markdown.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "task": task,
        "metrics": dict(metrics),
        "settings": dict(settings),
        "datasets": {role: dict(d) for role, d in datasets.items()},
        "checkpoint": dict(checkpoint),
        "skipped": {role: dict(c) for role, c in (skipped or {}).items()},
        "details": dict(details or {}),
        "clipforge_version": __version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": wall_time_s,
    }
    path = write_json(out / RESULTS_JSON, record)
    atomic_write_text(out / RESULTS_MD, _markdown(record, tables))
    return path


def _markdown(
    record: Mapping[str, Any], tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]]
) -> str:
    checkpoint = record["checkpoint"]
    parts = [f"# clipforge eval {record['task']}\n\n"]
    wall = record.get("wall_time_s")
    parts.append(
        f"Model: `{checkpoint.get('spec', '?')}` ({checkpoint.get('architecture', '?')}, "
        f"fingerprint `{str(checkpoint.get('fingerprint', ''))[:16]}`)  \n"
        f"clipforge {record['clipforge_version']}, {record['created']}"
        + (f", {wall:.1f} s" if wall is not None else "")
        + "\n"
    )
    if checkpoint.get("random_weights"):
        parts.append("\n**Random weights** (an architecture name, not a checkpoint): for testing only.\n")
    parts.append("\n## Metrics\n\n")
    parts.append(markdown_table([(k, v) for k, v in record["metrics"].items()], ["metric", "value"]))
    rows = [
        (role, d.get("spec", ""), d.get("form", ""), d.get("num_samples", ""), d.get("num_classes", ""))
        for role, d in record["datasets"].items()
    ]
    parts.append("\n## Data\n\n")
    parts.append(markdown_table(rows, ["role", "spec", "form", "samples", "classes"]))
    skipped_rows = [
        (role, reason, n) for role, counts in record["skipped"].items() for reason, n in counts.items()
    ]
    parts.append("\n## Skipped\n\n")
    parts.append(markdown_table(skipped_rows, ["role", "reason", "count"]) if skipped_rows else "nothing\n")
    for title, headers, table_rows in tables:
        parts.append(f"\n## {title}\n\n")
        parts.append(markdown_table(table_rows, headers))
    parts.append("\n## Settings\n\n")
    parts.append(
        markdown_table(
            [(k, json.dumps(jsonable(v))) for k, v in record["settings"].items()], ["setting", "value"]
        )
    )
    return "".join(parts)


def write_confusion_png(
    path: str | Path, confusion: np.ndarray, classnames: Sequence[str] | None = None
) -> Path:
    """A row-normalised confusion matrix (true class down, predicted across) as a PNG; class names on the axes
    when there are at most 40 classes, otherwise an unlabelled heat map."""
    from clipforge.plotting import new_figure, save_figure

    confusion = np.asarray(confusion, dtype=np.float64)
    num_classes = confusion.shape[0]
    totals = confusion.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(totals > 0, confusion / totals, 0.0)
    labelled = classnames is not None and num_classes <= MAX_LABELLED_CLASSES
    size = 4 + (0.28 * num_classes if labelled else 4)
    figure = new_figure(figsize=(size + 1.5, size))
    axes = figure.subplots()
    image = axes.imshow(normalised, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if labelled:
        assert classnames is not None
        axes.set_xticks(range(num_classes), [str(n) for n in classnames], rotation=90, fontsize=7)
        axes.set_yticks(range(num_classes), [str(n) for n in classnames], fontsize=7)
    accuracy = np.trace(confusion) / max(1.0, confusion.sum())
    axes.set_title(f"zero-shot confusion ({num_classes} classes, top-1 {accuracy:.3f})")
    figure.tight_layout()
    return save_figure(figure, path, format="png", dpi=110)
