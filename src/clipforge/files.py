"""Atomic file writes: a crash mid-write leaves either the old file (or folder) or the new one, never half of one.

Every writer in clipforge that must not leave a partial file goes through here: a temporary beside the target,
fsynced, then renamed over it (``os.replace`` is atomic on POSIX and Windows), then the directory fsynced so the
rename survives a power cut. Temporaries are hidden files named ``.{name}.{random}.tmp``;
:func:`leftover_temporaries` finds those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMPORARY_SUFFIX = ".tmp"
BUILDING_INFIX = ".building-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    For writers that take a file name (``torch.save``, ``safetensors``, ``savefig``). On an exception the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the new one, never a part."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


class AtomicFile:
    """A binary file written in pieces under a temporary name, which :meth:`commit` renames to ``path``.

    For writers whose file outlives one ``with`` block (a shard filled sample by sample). :meth:`discard`
    removes the temporary; ``path`` only ever appears complete.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.temporary = _temporary_beside(self.path)
        self._file: BinaryIO | None = open(self.temporary, "wb")  # noqa: SIM115 - closed by commit or discard

    def write(self, data: bytes) -> None:
        assert self._file is not None, f"{self.path}: already committed or discarded"
        self._file.write(data)

    def commit(self) -> Path:
        """Flush, fsync and close the temporary, then rename it over ``path``; returns ``path``."""
        assert self._file is not None, f"{self.path}: already committed or discarded"
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
            self._file = None
        try:
            _publish(self.temporary, self.path)
        except BaseException:
            self.temporary.unlink(missing_ok=True)
            raise
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary (idempotent); ``path`` is untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(folder: str | Path) -> Iterator[Path]:
    """Yield a hidden path beside ``folder`` (``.{name}.building-{pid}``) to build it in; on success rename it
    to ``folder``, which must not exist by then. On an exception, or if the rename fails, it is removed."""
    folder = Path(folder)
    building = folder.parent / f".{folder.name}{BUILDING_INFIX}{os.getpid()}"
    try:
        yield building
        os.replace(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def leftover_directories(folder: str | Path) -> list[Path]:
    """Folders :func:`atomic_directory` was building for ``folder`` in processes that were killed."""
    folder = Path(folder)
    return sorted(folder.parent.glob(f".{folder.name}{BUILDING_INFIX}*"))


def leftover_temporaries(directory: str | Path, name_pattern: str) -> list[Path]:
    """Temporaries of files matching the glob ``name_pattern`` in ``directory``, left by killed writers."""
    return sorted(Path(directory).glob(f".{name_pattern}.*{TEMPORARY_SUFFIX}"))


def _temporary_beside(path: Path) -> Path:
    """A new empty file ``.{name}.{random}.tmp`` beside ``path``, with the permissions a plain ``open(path,
    "wb")`` would give (0666 less the umask; ``tempfile.mkstemp`` would make it private, 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return temporary


def _publish(temporary: Path, path: Path) -> None:
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:  # nor fsync them
        pass
    finally:
        os.close(fd)
