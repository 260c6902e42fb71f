"""Where a run's scalars go besides ``metrics.jsonl``: TensorBoard and Weights & Biases (``run.report_to``).

Each reporter gets the same records the metrics file does (``kind`` "train" or "eval"); nested counts such as
``skipped`` become ``skipped/<reason>``. Only rank 0 reports. On resume, TensorBoard drops the events after the
resumed step (``purge_step``) so every step is shown once, and W&B continues the run under the id saved in
``<run>/wandb_id``. W&B runs offline by default (``run.wandb_mode``): nothing leaves the machine until you
``wandb sync <run>/wandb/offline-run-*``; ``online`` needs ``wandb login`` first.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from clipforge.config import ConfigError
from clipforge.files import atomic_write_text

log = logging.getLogger("clipforge.train")

REPORTERS = ("tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


class Reporter(Protocol):
    def write(self, kind: str, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def scalars_of(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The record's numbers (booleans, None, strings and ``step`` left out), nested mappings flattened with '/'."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(scalars_of(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            flat[name] = float(value)
    return flat


class TensorBoardReporter:
    """Scalars as ``<kind>/<name>`` in ``<run>/tensorboard``."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, kind: str, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(f"{kind}/{name}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbReporter:
    """One W&B run per training run (the run folder's name), its config the training config."""

    def __init__(self, run_dir: Path, settings: Any, config: Mapping[str, Any], resuming: bool) -> None:
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if resuming and id_file.exists() else secrets.token_hex(4)
        atomic_write_text(id_file, run_id + "\n")
        self._run = wandb.init(
            project=settings.wandb_project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
            mode=settings.wandb_mode, config=dict(config), settings=wandb.Settings(console="off", silent=True),
        )  # fmt: skip

    def write(self, kind: str, scalars: Mapping[str, float], step: int) -> None:
        self._run.log({f"{kind}/{name}": value for name, value in scalars.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


def check_reporters(report_to: tuple[str, ...], wandb_mode: str) -> None:
    """Config checks for ``run.report_to`` / ``run.wandb_mode``, on every rank before anything starts."""
    unknown = [name for name in report_to if name not in REPORTERS]
    if unknown:
        raise ConfigError(f"run.report_to: unknown {unknown}; choose from {list(REPORTERS)} (or [] for none)")
    if wandb_mode not in WANDB_MODES:
        raise ConfigError(f"run.wandb_mode: {wandb_mode!r}; choose one of {list(WANDB_MODES)}")
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "run.report_to: 'wandb' needs the wandb package: pip install wandb (or take it out of run.report_to)"
        )


def open_reporters(run_dir: Path, settings: Any, config_json: str, resume_step: int | None) -> list[Reporter]:
    """The reporters ``settings.report_to`` names (``settings``: the run's RunConfig). A missing tensorboard is
    a warning (it is the default); a missing wandb was refused by :func:`check_reporters`."""
    reporters: list[Reporter] = []
    for name in settings.report_to:
        if name == "tensorboard":
            try:
                reporters.append(TensorBoardReporter(run_dir, resume_step))
            except ImportError:
                log.warning("run.report_to: tensorboard is not installed; scalars go to metrics.jsonl only "
                            "(pip install tensorboard, or set run.report_to=[])")  # fmt: skip
        elif name == "wandb":
            reporters.append(
                WandbReporter(run_dir, settings, json.loads(config_json), resume_step is not None)
            )
    return reporters
