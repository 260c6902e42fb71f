"""How a training run stops early: :class:`TrainingError` (it cannot go on; exit status 1) and :class:`Preempted`
(a signal asked it to stop; a checkpoint was written; exit status 128 + the signal's number)."""

from __future__ import annotations

import signal
from pathlib import Path


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss kept being non-finite); the message says why and what to do."""


class Preempted(TrainingError):
    """SIGTERM or SIGINT stopped the run after a step; ``checkpoint`` holds that step (None: no step was taken
    since the start or the resume, so there was nothing new to save). ``--resume latest`` continues exactly."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        saved = (
            f"checkpoint {checkpoint} written"
            if checkpoint is not None
            else "no step was taken since the start, nothing new to save"
        )
        super().__init__(
            f"{name} received: stopped after step {step}, {saved}; continue with --resume latest (or --resume "
            "RUN_FOLDER)"
        )

    @property
    def exit_status(self) -> int:
        """128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a signalled job."""
        return 128 + self.signum
