"""Atomic writes (clipforge.files): the target is either the old file or the new one, never a partial one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipforge.files import (
    AtomicFile,
    atomic_directory,
    atomic_path,
    atomic_write_text,
    leftover_directories,
    leftover_temporaries,
)


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.startswith(".out.bin.")
        temporary.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_atomic_write_text_keeps_the_old_text_when_the_write_fails(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "summary.json"
    assert atomic_write_text(target, "old ✓\n") == target and target.read_text(encoding="utf-8") == "old ✓\n"

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text(encoding="utf-8") == "old ✓\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "summary.json"
    ]


def test_atomic_file_appears_only_when_committed(tmp_path: Path) -> None:
    target = tmp_path / "shard-000000.tar"
    writer = AtomicFile(target)
    writer.write(b"abc")
    writer.write(b"def")
    assert not target.exists()
    assert leftover_temporaries(tmp_path, "shard-*.tar") == [writer.temporary]
    assert writer.commit() == target and target.read_bytes() == b"abcdef"
    assert leftover_temporaries(tmp_path, "shard-*.tar") == []
    dropped = AtomicFile(tmp_path / "shard-000001.tar")
    dropped.write(b"partial")
    dropped.discard()
    dropped.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    with atomic_path(tmp_path / "atomic") as temporary:
        temporary.write_bytes(b"x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(plain).st_mode


def test_atomic_directory(tmp_path: Path) -> None:
    folder = tmp_path / "dataset"
    with atomic_directory(folder) as building:
        building.mkdir()
        (building / "a.txt").write_text("a")
        assert leftover_directories(folder) == [building]
    assert (folder / "a.txt").read_text() == "a" and leftover_directories(folder) == []
    other = tmp_path / "other"
    with pytest.raises(RuntimeError), atomic_directory(other) as building:
        building.mkdir()
        raise RuntimeError("build failed")
    assert not other.exists() and leftover_directories(other) == []
