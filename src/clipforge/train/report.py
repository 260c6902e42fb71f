"""What a run leaves behind for people and programs: ``metrics.jsonl`` (one JSON object per log step, evaluation
records marked ``"kind": "eval"``), the same scalars in TensorBoard and W&B (``run.report_to``; see
:mod:`clipforge.train.loggers`), and ``loss.png``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipforge.files import atomic_write_text
from clipforge.train.loggers import Reporter, scalars_of

log = logging.getLogger("clipforge.train")


class MetricsWriter:
    """Appends records to ``<run>/metrics.jsonl`` and hands their scalars to the reporters. On resume, records
    after the resumed step (written by the interrupted process after its last checkpoint) are dropped first, so
    every step appears once. ``reporters``: a callable opening them (run only when ``enabled``)."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        resume_step: int | None = None,
        reporters: Callable[[], list[Reporter]] | None = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._reporters: list[Reporter] = []
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))  # a kill here loses nothing
        self._reporters = reporters() if reporters is not None else []

    def write(self, record: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"kind": kind, **record}) + "\n")
        scalars = scalars_of(record)
        for reporter in self._reporters:
            reporter.write(kind, scalars, record["step"])

    def close(self) -> None:
        """Flush and close the reporters (a W&B run is finished); safe to call twice."""
        reporters, self._reporters = self._reporters, []
        for reporter in reporters:
            reporter.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # an unreadable (half-written) line is dropped on resume


def read_metrics(run_dir: Path, kind: str | None = "train") -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records


def write_loss_plot(run_dir: Path) -> Path | None:
    """``loss.png``: training loss and logit scale against samples seen."""
    records = read_metrics(run_dir)
    if not records:
        return None
    from clipforge.plotting import new_figure, save_figure

    samples = [r["samples"] for r in records]
    fig = new_figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    ax.plot(samples, [r["loss"] for r in records], color="tab:blue", label="contrastive loss")
    ax.set_xlabel("image-text pairs seen")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    scale_axis = ax.twinx()
    scale_axis.plot(samples, [r["logit_scale"] for r in records], color="tab:orange", label="logit scale")
    scale_axis.set_ylabel("logit scale (1/τ)", color="tab:orange")
    ax.set_title(f"training: {run_dir.name}")
    fig.tight_layout()
    return save_figure(fig, run_dir / "loss.png")
