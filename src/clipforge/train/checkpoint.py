"""Training checkpoints: everything needed to continue a run bitwise-identically (model, optimizer, scheduler,
grad scaler, RNG states, data-stream positions, counters), written atomically, the last K kept.

Files are ``<run>/checkpoints/step_00001234.pt`` written with ``torch.save`` and holding only tensors, numbers,
strings and containers, so they load with ``torch.load(weights_only=True)``. The final weights are also exported
in clipforge's inference format (``<run>/model.safetensors``) by the trainer.

A sharded run (``parallel=fsdp``, :mod:`clipforge.train.fsdp`) writes folders instead, ``step_00001234/``: the
``torch.distributed.checkpoint`` shards of every rank, ``train_state.pt`` (the same counters, without the model
and optimizer) and ``SHA256SUMS`` over every file in it; the folder appears only once complete.

Each checkpoint file has a checksum beside it, ``step_00001234.sha256`` (``sha256sum -c`` reads it), written before
the checkpoint itself appears. Resuming from a run folder (:func:`load_resume`) takes the newest checkpoint whose
bytes match; a damaged one (truncated, a flipped byte) is renamed ``*.pt.damaged`` with a warning and the one
before it is used, so garbage is never loaded. A checkpoint from before checksums existed loads unverified.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.checkpoint import CheckpointError
from clipforge.files import BUILDING_INFIX, atomic_path, leftover_temporaries

FORMAT = "clipforge-train"
FORMAT_VERSION = 1
_NAME = re.compile(r"step_(\d{8})(\.pt)?\Z")
FOLDER_SUMS = "SHA256SUMS"  # in a sharded checkpoint folder
FOLDER_STATE = "train_state.pt"
DAMAGED_SUFFIX = ".damaged"

log = logging.getLogger("clipforge.train")


def checkpoint_path(run_dir: Path, step: int, sharded: bool = False) -> Path:
    """Step ``step``'s checkpoint: a file, or a folder for a sharded run."""
    return run_dir / "checkpoints" / (f"step_{step:08d}" if sharded else f"step_{step:08d}.pt")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete training checkpoints of a run (files, and sharded folders), oldest first (temporary files and
    folders of interrupted saves ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _NAME.match(p.name)) and (p.is_dir() if m.group(2) is None else p.is_file())
    ]
    return [p for _, p in sorted(found)]


def checksum_path(path: Path) -> Path:
    """Where checkpoint ``path``'s sha256 is recorded (a folder's: every file's, in the folder)."""
    return path / FOLDER_SUMS if path.is_dir() else path.with_suffix(".sha256")


def write_folder_checksums(folder: Path) -> None:
    """Record the sha256 of every file in a checkpoint folder, in ``sha256sum -c`` form."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != FOLDER_SUMS)
    lines = "".join(f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    (folder / FOLDER_SUMS).write_text(lines)


def load_resume(resume: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to continue from and its contents: a run folder's newest intact checkpoint (damaged newer
    ones are renamed aside with a warning), or a checkpoint file, which must be intact."""
    if resume.is_dir() and not (resume / FOLDER_STATE).is_file():  # a run folder, not a sharded checkpoint
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
    if not resume.exists():
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
    prune_checkpoints(run_dir, keep_last)
    return path


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and what killed saves left behind."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)
    folder = run_dir / "checkpoints"
    for building in folder.glob(f".step_*{BUILDING_INFIX}*"):  # sharded saves of killed processes
        shutil.rmtree(building, ignore_errors=True)
    for stale in leftover_temporaries(folder, "step_*"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    for orphan in folder.glob("step_*.sha256"):  # its checkpoint was never published (killed in between)
        if not orphan.with_suffix(".pt").exists():
            orphan.unlink(missing_ok=True)


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
    if path.is_dir():
        return _verify_folder(path, sums)
    fields = sums.read_text(errors="replace").split()
    expected = fields[0].lower() if fields else ""
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: damaged (truncated or changed since it was saved): its sha256 is {actual[:16]}..., "
            f"{sums.name} recorded {expected[:16] or 'nothing'}..."
        )
    return True


def _verify_folder(folder: Path, sums: Path) -> bool:
    for line in sums.read_text(errors="replace").splitlines():
        expected, _, name = line.partition("  ")
        file = folder / name
        actual = file_sha256(file) if file.is_file() else "missing"
        if actual != expected.lower():
            raise CheckpointError(
                f"{folder}: damaged (a file changed or went missing since it was saved): {name}'s sha256 is "
                f"{actual[:16]}..., {sums.name} recorded {expected[:16] or 'nothing'}..."
            )
    return True


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint's contents (a sharded folder's counters, with ``sharded`` set), after checking its
    bytes against the recorded checksums."""
    if path.is_dir() and not (path / FOLDER_SUMS).is_file():
        raise CheckpointError(f"{path}: a sharded checkpoint folder without {FOLDER_SUMS}; it is incomplete")
    if not verify_checksum(path):
        log.warning("%s: no checksum recorded (saved before checksums existed); loading it unverified", path)
    try:
        state = torch.load(
            path / FOLDER_STATE if path.is_dir() else path, map_location="cpu", weights_only=True
        )
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
