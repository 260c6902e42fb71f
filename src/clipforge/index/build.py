"""Building and updating an index: scan the files, reuse every row whose file is unchanged (from the index or from
the committed chunks of a build that was killed), encode the rest in chunks through
:func:`clipforge.features.encode_image_files`, then publish a new generation (and its approximate index)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from clipforge.features import ImageTransform, encode_image_files, progress_bar
from clipforge.index.approximate import APPROXIMATE_THRESHOLD, build_approximate, require_faiss
from clipforge.index.errors import IndexFormatError
from clipforge.index.identity import ModelIdentity
from clipforge.index.layout import (
    PENDING,
    Chunk,
    Failure,
    Item,
    Manifest,
    SearchSettings,
    next_chunk_number,
    pending_folder,
    read_chunks,
    read_manifest,
    read_rows,
    remove_other_generations,
    write_chunk,
    write_manifest,
    write_rows,
)
from clipforge.inference import find_images

log = logging.getLogger("clipforge.index")


@dataclass(frozen=True)
class EncodeOptions:
    """How images are encoded and how often the work done is committed (``chunk_size`` images a chunk)."""

    batch_size: int = 32
    workers: int = 0
    precision: str = "fp32"
    chunk_size: int = 512
    progress: bool = True


@dataclass(frozen=True)
class SearchOptions:
    """``exact``: never build an approximate index; else one is built above ``threshold`` vectors."""

    exact: bool = False
    threshold: int = APPROXIMATE_THRESHOLD


@dataclass(frozen=True)
class BuildReport:
    """What a build or update did: rows ``reused`` (unchanged files, or chunks a killed run committed),
    ``encoded`` now, ``removed`` (files gone since the last generation), failures, and the search settings."""

    folder: Path
    count: int
    reused: int
    encoded: int
    removed: int
    failures: list[Failure]
    search: SearchSettings
    seconds: float
    notes: list[str] = field(default_factory=list)


def _scan(paths: Sequence[Path]) -> list[Item]:
    """Each file's resolved path and stamps, once (a file named twice, or through a symlink, is one row)."""
    items = []
    seen: set[Path] = set()
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        try:
            stat = resolved.stat()
            items.append(Item(str(resolved), stat.st_size, stat.st_mtime_ns))
        except OSError:
            items.append(Item(str(resolved), -1, -1))  # missing: encoding reports it
    return items


def build_index(
    sources: Sequence[str | Path],
    model: nn.Module,
    transform: ImageTransform,
    out: str | Path,
    *,
    model_spec: str,
    encode: EncodeOptions = EncodeOptions(),
    search: SearchOptions = SearchOptions(),
) -> BuildReport:
    """Index the images under ``sources`` (files or folders) at the folder ``out``. A build that was killed is
    continued by running it again: files in its committed chunks are not encoded twice."""
    folder = Path(out)
    if read_manifest(folder) is not None:
        raise ValueError(
            f"{folder}: already holds an index; run clipforge index update {folder} to add new or changed "
            "files, or pass another --out"
        )
    identity = ModelIdentity.of(model, transform, encode.precision)
    sources = [str(Path(s).resolve()) for s in sources] if sources else []
    paths = find_images(sources)
    base = Manifest(identity, model_spec, sources, 0, -1, SearchSettings())
    empty = np.zeros((0, identity.embed_dim), np.float32)
    return _refresh(folder, base, empty, [], paths, model, transform, encode, search)


def update_index(
    index: str | Path,
    model: nn.Module,
    transform: ImageTransform,
    sources: Sequence[str | Path] | None = None,
    *,
    encode: EncodeOptions | None = None,
    search: SearchOptions = SearchOptions(),
) -> BuildReport:
    """Re-scan ``sources`` (default: those the index was built from): encode new and changed files, drop removed
    ones, rebuild the approximate index. The model must be the one that built it; so is its precision."""
    folder = Path(index)
    manifest = read_manifest(folder)
    if manifest is None:
        raise IndexFormatError(
            f"{folder}: no index here (no index.json); build one with clipforge index build IMAGES... "
            f"--model M --out {folder}"
        )
    encode = encode or EncodeOptions()
    encode = EncodeOptions(encode.batch_size, encode.workers, manifest.model.precision, encode.chunk_size,
                           encode.progress)  # fmt: skip
    identity = ModelIdentity.of(model, transform, manifest.model.precision)
    manifest.model.check_query_model(identity, str(folder), images=True)
    if sources:
        manifest = Manifest(
            manifest.model, manifest.model_spec, [str(Path(s).resolve()) for s in sources], manifest.count,
            manifest.generation, manifest.search, manifest.failures,
        )  # fmt: skip
    vectors, items = read_rows(manifest, folder)
    paths = find_images(manifest.sources)
    return _refresh(folder, manifest, vectors, items, paths, model, transform, encode, search)


def _refresh(
    folder: Path,
    base: Manifest,
    base_vectors: np.ndarray,
    base_items: list[Item],
    paths: Sequence[Path],
    model: nn.Module,
    transform: ImageTransform,
    encode: EncodeOptions,
    search: SearchOptions,
) -> BuildReport:
    started = time.perf_counter()
    if not search.exact and len(paths) > search.threshold:
        require_faiss()  # fail before encoding, not after
    scanned = _scan(paths)
    pending = pending_folder(folder, base.model)
    chunks = read_chunks(pending)
    known, failed = _where_rows_are(base_items, chunks)
    reused = sum(1 for item in scanned if item in known)
    todo = [item for item in scanned if item not in known and item.path not in failed]
    chunks += _encode_chunks(pending, todo, model, transform, encode)
    known, failed = _where_rows_are(base_items, chunks)
    items = [item for item in scanned if item in known]
    if not items:
        first = next(iter(failed.values()), None)
        raise ValueError(
            f"none of the {len(scanned)} images could be encoded"
            + (f"; the first: {first.message}" if first else "")
        )
    removed = len({i.path for i in base_items} - {i.path for i in scanned})
    wants_exact = search.exact or len(items) <= search.threshold
    unchanged = items == base_items and not chunks and (base.search.kind == "exact") == wants_exact
    if unchanged and base.generation >= 0:  # nothing to do: keep the generation
        return BuildReport(
            folder, len(items), reused, 0, 0, base.failures, base.search, time.perf_counter() - started
        )
    vectors = _gather(base_vectors, chunks, [known[item] for item in items])
    failures = [failed[item.path] for item in scanned if item not in known and item.path in failed]
    settings = _search_settings(vectors, search)
    manifest = Manifest(
        base.model, base.model_spec, base.sources, len(items), base.generation + 1, settings[1], failures
    )
    _publish(folder, manifest, vectors, items, settings[0])
    return BuildReport(
        folder, len(items), reused, len(todo), removed, failures, settings[1], time.perf_counter() - started
    )


def _where_rows_are(
    base_items: list[Item], chunks: list[Chunk]
) -> tuple[dict[Item, tuple[int, int]], dict[str, Failure]]:
    """Where each (path, stamps) has a row, as (chunk number, or -1 for the index's own rows; row), later chunks
    winning; and the files the chunks could not encode."""
    known = {item: (-1, row) for row, item in enumerate(base_items)}
    failed: dict[str, Failure] = {}
    for number, chunk in enumerate(chunks):
        known.update({item: (number, row) for row, item in enumerate(chunk.items)})
        failed.update({f.path: f for f in chunk.failures})
    return known, failed


def _gather(base_vectors: np.ndarray, chunks: list[Chunk], where: list[tuple[int, int]]) -> np.ndarray:
    """The vectors [len(where), D] at (chunk number or -1, row), copied a source at a time."""
    numbers, rows = (np.array(column, dtype=np.int64).reshape(-1) for column in zip(*where))
    vectors = np.empty((len(where), base_vectors.shape[1]), np.float32)
    for number in np.unique(numbers):
        mask = numbers == number
        source = base_vectors if number < 0 else chunks[number].vectors
        vectors[mask] = source[rows[mask]]
    return vectors


def _encode_chunks(
    pending: Path, todo: list[Item], model: nn.Module, transform: ImageTransform, encode: EncodeOptions
) -> list[Chunk]:
    """Encode ``todo`` ``chunk_size`` files at a time, committing each chunk before the next is started."""
    if encode.chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {encode.chunk_size}")
    number = next_chunk_number(pending)
    chunks = []
    with progress_bar(len(todo), "indexing images", "img", encode.progress and bool(todo)) as bar:
        for start in range(0, len(todo), encode.chunk_size):
            part = todo[start : start + encode.chunk_size]
            result = encode_image_files(
                model, transform, [Path(item.path) for item in part], batch_size=encode.batch_size,
                workers=encode.workers, precision=encode.precision, progress=False,
            )  # fmt: skip
            by_path = dict(zip(result.keys, range(len(result.keys))))
            items = [item for item in part if item.path in by_path]
            vectors = result.embeddings[[by_path[item.path] for item in items]]
            failures = [Failure(f.key, f.reason, f.message) for f in result.failures]
            chunk = Chunk(vectors.reshape(len(items), -1), items, failures)
            write_chunk(pending, number, chunk)
            chunks.append(chunk)
            number += 1
            bar.update(len(part))
    return chunks


def _search_settings(vectors: np.ndarray, search: SearchOptions) -> tuple[object | None, SearchSettings]:
    if search.exact or len(vectors) <= search.threshold:
        return None, SearchSettings()
    return build_approximate(vectors)


def _publish(folder: Path, manifest: Manifest, vectors: np.ndarray, items: list[Item], approximate) -> None:
    """The new generation's files, then ``index.json`` (the commit), then the old generation and the chunks go."""
    write_rows(manifest, folder, vectors, items)
    if approximate is not None:
        approximate.save(manifest.file(folder, "approximate"))
    write_manifest(folder, manifest)
    remove_other_generations(folder, manifest.generation)
    shutil.rmtree(folder / PENDING, ignore_errors=True)


__all__ = ["BuildReport", "EncodeOptions", "SearchOptions", "build_index", "update_index"]
