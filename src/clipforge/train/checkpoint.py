"""Training checkpoints: everything needed to continue a run bitwise-identically (model, optimizer, scheduler,
grad scaler, RNG states, data-stream positions, counters), written atomically, the last K kept.

Files are ``<run>/checkpoints/step_00001234.pt`` written with ``torch.save`` and holding only tensors, numbers,
strings and containers, so they load with ``torch.load(weights_only=True)``. The final weights are also exported
in clipforge's inference format (``<run>/model.safetensors``) by the trainer.

Each checkpoint has a checksum beside it, ``step_00001234.sha256`` (``sha256sum -c`` reads it), written before
the checkpoint itself appears. Resuming from a run folder (:func:`load_resume`) takes the newest checkpoint whose
bytes match; a damaged one (truncated, a flipped byte) is renamed ``*.pt.damaged`` with a warning and the one
before it is used, so garbage is never loaded. A checkpoint from before checksums existed loads unverified.
"""

from __future__ import annotations

import hashlib
import logging
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
DAMAGED_SUFFIX = ".damaged"

log = logging.getLogger("clipforge.train")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete training checkpoints of a run, oldest first (temporary files of interrupted saves ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checksum_path(path: Path) -> Path:
    """Where checkpoint ``path``'s sha256 is recorded."""
    return path.with_suffix(".sha256")


def load_resume(resume: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to continue from and its contents: a run folder's newest intact checkpoint (damaged newer
    ones are renamed aside with a warning), or a checkpoint file, which must be intact."""
    if resume.is_dir():
        found = list_checkpoints(resume)
        if not found:
            raise CheckpointError(
                f"{resume}: no training checkpoints in {resume / 'checkpoints'} to resume from"
            )
        problems = []
        for path in reversed(found):
            try:
                return path, load_training_checkpoint(path)
            except CheckpointError as exc:
                problems.append(str(exc))
                aside = path.with_name(path.name + DAMAGED_SUFFIX)
                path.replace(aside)
                log.warning("%s; kept as %s, falling back to the checkpoint before it", exc, aside.name)
        raise CheckpointError(
            f"{resume}: no intact training checkpoint to resume from ({'; '.join(problems)}); start the run "
            "again, or --init-from its model.safetensors if it has one"
        )
    if not resume.is_file():
        raise CheckpointError(f"{resume}: resume checkpoint or run folder not found")
    try:
        return resume, load_training_checkpoint(resume)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}. To fall back to the newest intact checkpoint, resume from the run folder instead"
        ) from exc


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
    """Write ``payload`` atomically as step ``step``'s checkpoint, its checksum first; then delete all but the
    newest ``keep_last``. An ``OSError`` (disk full) leaves no partial file and the older checkpoints intact."""
    path = checkpoint_path(run_dir, step)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **payload}, tmp)
        with atomic_path(checksum_path(path)) as sums:
            sums.write_text(f"{file_sha256(tmp)}  {path.name}\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    folder = path.parent
    for stale in leftover_temporaries(folder, "step_*"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    for orphan in folder.glob("step_*.sha256"):  # its checkpoint was never published (killed in between)
        if not orphan.with_suffix(".pt").exists():
            orphan.unlink(missing_ok=True)
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: Path) -> bool:
    """True when ``path`` matches the checksum recorded at save time, False when none was recorded (a checkpoint
    from before checksums); raises CheckpointError when the bytes differ."""
    sums = checksum_path(path)
    if not sums.is_file():
        return False
    fields = sums.read_text(errors="replace").split()
    expected = fields[0].lower() if fields else ""
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: damaged (truncated or changed since it was saved): its sha256 is {actual[:16]}..., "
            f"{sums.name} recorded {expected[:16] or 'nothing'}..."
        )
    return True


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint's contents, after checking its bytes against the recorded checksum."""
    if not verify_checksum(path):
        log.warning("%s: no checksum recorded (saved before checksums existed); loading it unverified", path)
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
