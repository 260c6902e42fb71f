"""Top-k search over an index's vectors: exact (a matrix product) or approximate (a faiss inverted-file index,
its probe count tuned at build time until its recall@10 against exact reaches a target).

faiss-cpu is optional (``pip install clipforge[index]``); without it exact search still works and asking for the
approximate index raises :class:`ApproximateUnavailableError` saying how to install it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.index.errors import ApproximateUnavailableError, IndexFormatError
from clipforge.index.layout import SearchSettings

log = logging.getLogger("clipforge.index")

#: Above this many vectors an index is searched approximately by default (see docs/using-models.md for the
#: measurements behind it: exact search of one query costs ~0.2-0.5 us per vector on 2 cores).
APPROXIMATE_THRESHOLD = 50_000
#: The recall@10 against exact the approximate index is tuned to reach at build time.
TARGET_RECALL = 0.95
APPROXIMATE_KIND = "faiss-ivf-flat"
_BLOCK_ROWS = 1 << 18  # rows scored at once by exact search (bounds the score matrix for many queries)


def require_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ApproximateUnavailableError(
            "the approximate index needs faiss-cpu, which is not installed: pip install 'clipforge[index]' "
            "(or faiss-cpu==1.15.1), or pass --exact to search exactly"
        ) from exc
    return faiss


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores [Q, k'] and rows [Q, k'] (k' = min(k, N)) of the rows of ``vectors`` [N, D] with the highest
    inner product with each query [Q, D], best first; equal scores keep row order."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    n = len(vectors)
    k = min(k, n)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start in range(0, n, _BLOCK_ROWS):
        block = np.asarray(vectors[start : start + _BLOCK_ROWS], dtype=np.float32)
        block_scores = queries @ block.T
        block_rows = np.broadcast_to(np.arange(start, start + len(block)), block_scores.shape)
        scores = np.concatenate([best_scores, block_scores], axis=1)
        rows = np.concatenate([best_rows, block_rows], axis=1)
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
        best_scores, best_rows = scores, rows
    order = np.lexsort((best_rows, -best_scores), axis=1)
    return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)


def recall_at_10(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean over queries of |top-10 found ∩ top-10 exact| / 10 (rows [Q, >=10]; -1 marks a missing result)."""
    hits = [len(set(t[:10].tolist()) & set(f[:10].tolist()) - {-1}) for t, f in zip(truth, found)]
    return float(np.mean(hits)) / min(10, truth.shape[1])


@dataclass
class ApproximateIndex:
    """A faiss IVF-Flat inner-product index over the vectors, with the probe count it searches with."""

    faiss_index: Any
    nprobe: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.faiss_index.nprobe = self.nprobe
        scores, rows = self.faiss_index.search(np.ascontiguousarray(np.atleast_2d(queries), np.float32), k)
        return scores, rows

    def save(self, path: Path) -> None:
        from clipforge.files import atomic_path

        faiss = require_faiss()
        with atomic_path(path) as tmp:
            faiss.write_index(self.faiss_index, str(tmp))

    @classmethod
    def load(cls, path: Path, settings: SearchSettings) -> ApproximateIndex:
        faiss = require_faiss()
        try:
            return cls(faiss.read_index(str(path)), int(settings.params["nprobe"]))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise IndexFormatError(f"{path}: cannot read the approximate index ({exc}); rebuild it") from exc


def _others(rows: np.ndarray, own: np.ndarray) -> np.ndarray:
    """The first 10 rows of each result [Q, 11] other than the query's own row (-1 pads a short result)."""
    kept = [[r for r in row if r != self][:10] for row, self in zip(rows.tolist(), own.tolist())]
    return np.array([row + [-1] * (10 - len(row)) for row in kept], dtype=np.int64)


def build_approximate(
    vectors: np.ndarray, *, queries: int = 200, target: float = TARGET_RECALL, seed: int = 0
) -> tuple[ApproximateIndex, SearchSettings]:
    """An IVF-Flat index of 4·√N lists (at most N/39, so each list has the 39 training vectors faiss asks for;
    trained on up to 40 vectors a list) whose probe count is doubled from 8 until recall@10 against exact search
    reaches ``target`` on ``queries`` sampled vectors (or every list is probed); returns it with its settings."""
    faiss = require_faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = vectors[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))]
    index.train(sample)
    index.add(vectors)
    # the queries are stored vectors; each is left out of its own results (finding itself is too easy)
    query_rows = rng.choice(n, min(n, queries), replace=False)
    picked = vectors[query_rows]
    truth = _others(exact_top_k(vectors, picked, 11)[1], query_rows)
    approximate, nprobe, recall = ApproximateIndex(index, 8), min(8, nlist), 0.0
    while True:
        approximate.nprobe = nprobe
        recall = recall_at_10(truth, _others(approximate.search(picked, 11)[1], query_rows))
        if recall >= target or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    log.info(
        "approximate index: IVF-Flat with %d lists, %d probed; recall@10 %.3f against exact on %d queries "
        "(built in %.1f s)", nlist, nprobe, recall, len(picked), time.perf_counter() - started,
    )  # fmt: skip
    settings = SearchSettings(APPROXIMATE_KIND, {"nlist": nlist, "nprobe": nprobe}, recall, len(picked))
    return approximate, settings


__all__ = [
    "APPROXIMATE_THRESHOLD",
    "TARGET_RECALL",
    "ApproximateIndex",
    "build_approximate",
    "exact_top_k",
    "recall_at_10",
    "require_faiss",
]
