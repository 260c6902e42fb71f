"""What a run leaves behind for people and programs: ``metrics.jsonl`` (one JSON object per log step, evaluation
records marked ``"kind": "eval"``), TensorBoard scalars when ``tensorboard`` is installed, and ``loss.png``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("clipforge.train")


class MetricsWriter:
    """Appends records to ``<run>/metrics.jsonl``. On resume, records after the resumed step (written by the
    interrupted process after its last checkpoint) are dropped first, so every step appears once."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tensorboard = None

    def write(self, record: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"kind": kind, **record}) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, record["step"])
            self._tensorboard.flush()


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
