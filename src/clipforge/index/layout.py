"""The index folder on disk, and how it is written so that a kill at any moment leaves a usable state.

``INDEX/index.json`` is the commit point: it names one generation of ``vectors-G.npy`` (float32 [N, D], L2-
normalised), ``items-G.jsonl`` (one ``{"row", "path", "size", "mtime_ns"}`` per row) and, for a large index,
``approximate-G.faiss``. A build or update first publishes its work in ``pending/chunk-K.npz`` files (each written
atomically), then writes the new generation's files and finally ``index.json``; a kill before that leaves the old
index (or none) plus the committed chunks, which a rerun reuses.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.files import atomic_path, atomic_write_text
from clipforge.index.errors import IndexFormatError
from clipforge.index.identity import ModelIdentity

MANIFEST = "index.json"
PENDING = "pending"
FORMAT_NAME = "clipforge-image-index"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Item:
    """An indexed file: its resolved path and the stamps (size, mtime_ns) it had when it was encoded."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Failure:
    """A file that could not be encoded (it is left out of the index and tried again by the next update)."""

    path: str
    reason: str
    message: str


@dataclass(frozen=True)
class SearchSettings:
    """How the index is searched: ``exact`` (matrix product, top-k) or an approximate ``kind`` with its
    ``params`` and its recall@10 against exact, measured at build time on ``recall_queries`` queries."""

    kind: str = "exact"
    params: dict[str, Any] = field(default_factory=dict)
    recall_at_10: float | None = None
    recall_queries: int = 0


@dataclass(frozen=True)
class Manifest:
    """What ``index.json`` holds."""

    model: ModelIdentity
    model_spec: str  # what --model named (a checkpoint path or an architecture name), the update's default
    sources: list[str]  # the folders and files given to build: what an update re-scans
    count: int
    generation: int
    search: SearchSettings
    failures: list[Failure] = field(default_factory=list)

    def file(self, folder: Path, kind: str) -> Path:
        suffix = {"vectors": "npy", "items": "jsonl", "approximate": "faiss"}[kind]
        return folder / f"{kind}-{self.generation:06d}.{suffix}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model": self.model.to_json(),
            "model_spec": self.model_spec,
            "sources": self.sources,
            "count": self.count,
            "dim": self.model.embed_dim,
            "dtype": "float32",
            "generation": self.generation,
            "search": asdict(self.search),
            "failures": [asdict(f) for f in self.failures],
        }


def check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise IndexFormatError(f"{folder}: is a file, not an index folder; pass a folder (new or an index)")


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of the index at ``folder``, or None when no index has been committed there yet."""
    check_folder(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(
            f"{path}: not valid JSON ({exc}); the index is damaged: rebuild it with clipforge index build"
        ) from exc
    return _parse_manifest(data, str(path))


def _parse_manifest(data: Any, where: str) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise IndexFormatError(f'{where}: not a clipforge image index (no "format": "{FORMAT_NAME}")')
    if data.get("version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{where}: index format version {data.get('version')!r}; this clipforge reads version "
            f"{FORMAT_VERSION}: rebuild the index"
        )
    try:
        search = data["search"]
        return Manifest(
            model=ModelIdentity.from_json(data["model"], where),
            model_spec=str(data["model_spec"]),
            sources=[str(s) for s in data["sources"]],
            count=int(data["count"]),
            generation=int(data["generation"]),
            search=SearchSettings(
                str(search["kind"]),
                dict(search["params"]),
                search["recall_at_10"],
                int(search["recall_queries"]),
            ),
            failures=[Failure(str(f["path"]), str(f["reason"]), str(f["message"])) for f in data["failures"]],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(
            f"{where}: field {exc} is missing or malformed; the index is damaged: rebuild it"
        ) from exc


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n")


def write_rows(manifest: Manifest, folder: Path, vectors: np.ndarray, items: list[Item]) -> None:
    """The generation's vectors and items (each atomically; they count only once ``index.json`` names them)."""
    with atomic_path(manifest.file(folder, "vectors")) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(vectors, dtype=np.float32))
    lines = [json.dumps({"row": i, **asdict(item)}, ensure_ascii=False) for i, item in enumerate(items)]
    atomic_write_text(manifest.file(folder, "items"), "".join(line + "\n" for line in lines))


def read_rows(manifest: Manifest, folder: Path, *, mmap: bool = True) -> tuple[np.ndarray, list[Item]]:
    """The vectors [N, D] (memory-mapped unless ``mmap`` is False) and items of the committed generation."""
    vectors_path, items_path = manifest.file(folder, "vectors"), manifest.file(folder, "items")
    try:
        vectors = np.load(vectors_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        items = []
        for line in items_path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            items.append(Item(str(entry["path"]), int(entry["size"]), int(entry["mtime_ns"])))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{folder}: cannot read the index's rows ({exc}); rebuild the index") from exc
    expected = (manifest.count, manifest.model.embed_dim)
    if vectors.shape != expected or len(items) != manifest.count:
        raise IndexFormatError(
            f"{vectors_path}: {vectors.shape} vectors and {len(items)} items, but index.json says {expected}; "
            "the index is damaged: rebuild it"
        )
    return vectors, items


def remove_other_generations(folder: Path, keep: int) -> None:
    for kind, suffix in (("vectors", "npy"), ("items", "jsonl"), ("approximate", "faiss")):
        for path in folder.glob(f"{kind}-*.{suffix}"):
            if path.name != f"{kind}-{keep:06d}.{suffix}":
                path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Pending work: the committed chunks of a build or update that has not finished


@dataclass(frozen=True)
class Chunk:
    vectors: np.ndarray
    items: list[Item]
    failures: list[Failure]


def pending_folder(folder: Path, identity: ModelIdentity) -> Path:
    """``INDEX/pending``, emptied first when its chunks were made by another model (they cannot be reused)."""
    pending = folder / PENDING
    marker = pending / "identity.txt"
    if pending.is_dir() and (not marker.is_file() or marker.read_text().strip() != identity.key):
        for path in pending.iterdir():
            path.unlink()
    pending.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_text(marker, identity.key + "\n")
    return pending


def write_chunk(pending: Path, number: int, chunk: Chunk) -> None:
    with atomic_path(pending / f"chunk-{number:06d}.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            vectors=np.asarray(chunk.vectors, dtype=np.float32).reshape(len(chunk.items), -1),
            paths=np.array([i.path for i in chunk.items], dtype=str),
            sizes=np.array([i.size for i in chunk.items], dtype=np.int64),
            mtimes=np.array([i.mtime_ns for i in chunk.items], dtype=np.int64),
            failures=np.array(json.dumps([asdict(f) for f in chunk.failures])),
        )


def read_chunks(pending: Path) -> list[Chunk]:
    """Every committed chunk (a damaged one, which an atomic write never leaves, is dropped and redone)."""
    chunks = []
    for path in sorted(pending.glob("chunk-*.npz")):
        try:
            with np.load(path, allow_pickle=False) as data:
                items = [
                    Item(str(p), int(s), int(m))
                    for p, s, m in zip(data["paths"], data["sizes"], data["mtimes"])
                ]
                failures = [Failure(**f) for f in json.loads(str(data["failures"]))]
                chunks.append(Chunk(np.array(data["vectors"], dtype=np.float32), items, failures))
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)
    return chunks


def next_chunk_number(pending: Path) -> int:
    numbers = [int(p.stem.split("-")[1]) for p in pending.glob("chunk-*.npz")]
    return max(numbers, default=-1) + 1


__all__ = [
    "Chunk",
    "Failure",
    "Item",
    "Manifest",
    "SearchSettings",
    "read_chunks",
    "read_manifest",
    "read_rows",
    "write_chunk",
    "write_manifest",
    "write_rows",
]
