"""Where and in what precision a model runs: ``"auto"`` device resolution, the device a model is on, the
autocast context a precision name stands for, and torch's CPU thread count for the length of a job.
Training, evaluation, inference and the CLI all use these."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(requested: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` or ``None``: CUDA when a GPU is visible, else the CPU; any other name (``"cpu"``, ``"cuda:1"``)
    as given, unchecked (moving a model there raises if the device does not exist)."""
    if requested is None or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device``'s type for ``"bf16"``/``"fp16"``, a null context for ``"fp32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread pool at ``threads`` (0: leave it as it is), then restore the
    caller's count: a library call does not change the process's settings behind the caller."""
    if not threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
