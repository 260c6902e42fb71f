"""Stopping on request: SIGTERM (a scheduler preempting the job) or SIGINT (Ctrl-C) during training.

While :class:`StopSignals` is active, the first such signal only records itself; the trainer finishes the step
in progress (or drops it, if the data loader died with the signal), writes a checkpoint atomically and raises
:class:`~clipforge.train.errors.Preempted`; ``clipforge train`` exits with 128 + the signal's number. A second
signal stops at once (``SystemExit``), which is still safe: checkpoints are written under a temporary name and
renamed, so the previous one stays whole. Handlers are installed only in the main thread (Python allows no other)
and the previous handlers come back on exit. Under torchrun every rank gets the signal; the ranks agree on
stopping (:func:`agreed_signal`) so they all save the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger("clipforge.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Records the first SIGTERM / SIGINT while active (``signum``); see the module docstring."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        else:
            log.debug("training outside the main thread: SIGTERM/SIGINT keep their handlers")
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum
        log.warning(
            "%s received: stopping after this step with a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )


def agreed_signal(signals: StopSignals, device: torch.device) -> int:
    """The stop signal's number, or 0, the same on every rank: a signal seen by any rank counts. ``device``:
    where the process group's collectives run (the training device)."""
    return int(_max_over_ranks(float(signals.signum or 0), device))


def agreed_drop(dropped: bool, device: torch.device) -> bool:
    """Whether any rank dropped this step (its loader died with a stop signal); one all-reduce per step under
    torchrun, nothing in a single process."""
    return bool(_max_over_ranks(float(dropped), device))


def agreed_time_over(started: float, time_limit_s: float, device: torch.device) -> bool:
    """Whether ``time_limit_s`` (0: no limit) has passed since ``started``; rank 0's clock decides."""
    if not time_limit_s:
        return False
    over = time.perf_counter() - started > time_limit_s
    is_rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    return bool(_max_over_ranks(float(over and is_rank0), device))


def _max_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    flag = torch.tensor([value], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag.item())
