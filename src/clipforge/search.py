"""Text-to-image search over a folder: rank image embeddings against a text query, an embedding cache of per-file
rows (each with its file's resolved path, size and mtime) under the features' identity
(:func:`clipforge.features.feature_identity` of the weights and the preprocessing), and a montage of the hits."""

from __future__ import annotations

import hashlib
import logging
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.features import (
    ImageEmbeddings,
    ImageTransform,
    encode_image_files,
    encode_texts,
    feature_identity,
)
from clipforge.files import atomic_path
from clipforge.images import ImageLoadError, load_image
from clipforge.model import CLIP
from clipforge.tokenizer import Tokenizer

log = logging.getLogger("clipforge.inference")  # the logger users already configure for model use
_CACHE_VERSION = "1"


@dataclass(frozen=True)
class SearchHit:
    key: str
    score: float  # cosine similarity of the query and the image embedding


def rank(
    query_features: torch.Tensor | np.ndarray, image_features: np.ndarray, keys: Sequence[str], top_k: int
) -> list[SearchHit]:
    """The ``top_k`` keys whose features [N, D] have the highest cosine similarity with the query [D], best
    first (ties keep input order)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    query = F.normalize(torch.as_tensor(np.asarray(query_features), dtype=torch.float32).reshape(-1), dim=0)
    images = F.normalize(torch.as_tensor(np.asarray(image_features), dtype=torch.float32), dim=-1)
    scores = (images @ query).numpy()
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [SearchHit(keys[i], float(scores[i])) for i in order]


@torch.inference_mode()
def search(
    model: CLIP,
    tokenizer: Tokenizer,
    query: str,
    image_features: np.ndarray,
    keys: Sequence[str],
    top_k: int = 8,
) -> list[SearchHit]:
    """The ``top_k`` images (features [N, D], keys) closest to the text ``query``, best first."""
    if not query.strip():
        raise ValueError("the search query is empty; pass some text to search for")
    query_features = torch.from_numpy(encode_texts(model, tokenizer, [query])[0])
    return rank(query_features, image_features, keys, top_k)


@dataclass(frozen=True)
class CacheStats:
    """How :func:`embed_images_cached` got its embeddings: ``reused`` from the cache, ``encoded`` now."""

    reused: int
    encoded: int
    note: str = ""  # why the cache was not used, when it was not


def _file_stamps(paths: Sequence[Path]) -> list[tuple[int, int]]:
    stamps = []
    for path in paths:
        try:
            stat = path.stat()
            stamps.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            stamps.append((-1, -1))  # missing: never matches, loading reports it
    return stamps


def _read_cache(path: Path, identity: str) -> tuple[dict[str, tuple[int, int, int]], np.ndarray | None, str]:
    """(resolved path -> (size, mtime_ns, row), embeddings, note); empty when the cache cannot be used."""
    if not path.is_file():
        return {}, None, "no cache yet"
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["version"]) != _CACHE_VERSION or str(data["identity"]) != identity:
                return {}, None, "made with other weights (or another clipforge cache version)"
            entries = {
                str(k): (int(s), int(m), row)
                for row, (k, s, m) in enumerate(zip(data["paths"], data["sizes"], data["mtimes"]))
            }
            return entries, np.array(data["embeddings"], dtype=np.float32), ""
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("%s: search cache unreadable (%s); rebuilding it", path, exc)
        return {}, None, f"unreadable ({type(exc).__name__})"


def embed_images_cached(
    model: CLIP,
    transform: ImageTransform,
    paths: Sequence[str | Path],
    cache_path: str | Path,
    identity: str,
    *,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> tuple[ImageEmbeddings, CacheStats]:
    """Normalised image embeddings like :func:`embed_images`, reusing the rows of ``cache_path`` whose file
    (resolved path, size, mtime) is unchanged and that were made with the same weights (``identity``: their
    :func:`~clipforge.features.model_fingerprint`) and preprocessing (``transform``); only new or changed images
    are encoded. The cache is rewritten (atomically) when anything changed. Images that fail to load are not
    cached: they are tried (and reported) again on every call."""
    paths = [Path(p) for p in paths]
    cache_path = Path(cache_path)
    identity = feature_identity(
        kind="image_rows", model=identity, transform=repr(transform), precision="fp32"
    )
    resolved = [str(p.resolve()) for p in paths]
    stamps = _file_stamps(paths)
    cached, cached_rows, note = _read_cache(cache_path, identity)
    rows: list[np.ndarray | None] = [None] * len(paths)
    todo = []
    for i, (key, (size, mtime)) in enumerate(zip(resolved, stamps)):
        hit = cached.get(key)
        if hit is not None and cached_rows is not None and hit[:2] == (size, mtime):
            rows[i] = cached_rows[hit[2]]
        else:
            todo.append(i)
    fresh = encode_image_files(
        model, transform, [paths[i] for i in todo], batch_size=batch_size, workers=workers, progress=progress
    )
    by_key = dict(zip(fresh.keys, fresh.embeddings))
    for i in todo:
        rows[i] = by_key.get(str(paths[i]))
    kept = [i for i, row in enumerate(rows) if row is not None]
    if not kept and paths:
        raise ValueError(f"all {len(paths)} images failed to load; the first: {fresh.failures[0].message}")
    embeddings = (
        np.stack([rows[i] for i in kept]) if kept else np.zeros((0, model.config.embed_dim), np.float32)
    )
    if todo or len(cached) != len(kept):
        with atomic_path(cache_path) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                version=np.array(_CACHE_VERSION),
                identity=np.array(identity),
                paths=np.array([resolved[i] for i in kept], dtype=str),
                sizes=np.array([stamps[i][0] for i in kept], dtype=np.int64),
                mtimes=np.array([stamps[i][1] for i in kept], dtype=np.int64),
                embeddings=embeddings.astype(np.float32),
            )
    result = ImageEmbeddings([str(paths[i]) for i in kept], embeddings.astype(np.float32), fresh.failures)
    return result, CacheStats(reused=len(paths) - len(todo), encoded=len(fresh.keys), note=note)


def default_cache_path(sources: Sequence[str | Path], identity: str, cache_root: str | Path) -> Path:
    """Where the search cache of the images under ``sources`` embedded with weights ``identity`` lives: one file
    per (sources, weights) pair under ``cache_root``, named after the first source."""
    resolved = [str(Path(source).resolve()) for source in sources]
    digest = hashlib.sha256("\n".join([*resolved, identity]).encode()).hexdigest()[:16]
    return Path(cache_root) / f"{Path(resolved[0]).name or 'root'}-{digest}.npz"


def write_montage(
    path: str | Path, query: str, hits: Sequence[SearchHit], *, columns: int = 4, thumb_inches: float = 2.2
) -> Path:
    """A PNG grid of the hits' images with the query as title and each rank, score and file name under its
    thumbnail. An image that no longer loads is drawn as an empty panel saying so."""
    from clipforge.plotting import new_figure, save_figure

    if not hits:
        raise ValueError("no search hits to draw")
    columns = max(1, min(columns, len(hits)))
    rows = math.ceil(len(hits) / columns)
    figure = new_figure(
        figsize=(columns * thumb_inches, rows * (thumb_inches + 0.5) + 0.6), layout="constrained"
    )
    figure.suptitle(f"“{query}”", fontsize=13)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for rank_number, (ax, hit) in enumerate(zip(axes.flat, hits), 1):
        name = Path(hit.key).name
        name = name if len(name) <= 28 else name[:25] + "..."
        try:
            image = load_image(hit.key)
            image.thumbnail((256, 256))
            ax.imshow(np.asarray(image))
        except ImageLoadError as exc:
            ax.text(0.5, 0.5, f"unreadable\n({exc.reason})", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"{rank_number}. {hit.score:.3f}\n{name}", fontsize=9)
    return save_figure(figure, path, format="png", dpi=100)


__all__ = [
    "CacheStats",
    "SearchHit",
    "default_cache_path",
    "embed_images_cached",
    "rank",
    "search",
    "write_montage",
]
