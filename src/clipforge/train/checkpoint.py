"""Training checkpoints: everything needed to continue a run bitwise-identically (model, optimizer, scheduler,
grad scaler, RNG states, data-stream positions, counters), written atomically, the last K kept.

Files are ``<run>/checkpoints/step_00001234.pt`` written with ``torch.save`` and holding only tensors, numbers,
strings and containers, so they load with ``torch.load(weights_only=True)``. The final weights are also exported
in clipforge's inference format (``<run>/model.safetensors``) by the trainer.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.checkpoint import CheckpointError
from clipforge.files import atomic_path, leftover_temporaries

FORMAT = "clipforge-train"
FORMAT_VERSION = 1
_NAME = re.compile(r"step_(\d{8})\.pt\Z")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete training checkpoints of a run, oldest first (temporary files of interrupted saves ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: Path) -> Path:
    """A run folder -> its newest checkpoint; a checkpoint file -> itself."""
    if resume.is_dir():
        found = list_checkpoints(resume)
        if not found:
            raise CheckpointError(
                f"{resume}: no training checkpoints in {resume / 'checkpoints'} to resume from"
            )
        return found[-1]
    if not resume.is_file():
        raise CheckpointError(f"{resume}: resume checkpoint or run folder not found")
    return resume


def rng_state() -> dict[str, Any]:
    """Every RNG the training process draws from, in weights_only-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write ``payload`` atomically as step ``step``'s checkpoint; then delete all but the newest ``keep_last``."""
    path = checkpoint_path(run_dir, step)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **payload}, tmp)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    for stale in leftover_temporaries(path.parent, "step_*"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    return path


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read the training checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a clipforge training checkpoint; to start from a model's weights use --init-from"
        )
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: training checkpoint version {state.get('format_version')} is not supported"
        )
    return state
