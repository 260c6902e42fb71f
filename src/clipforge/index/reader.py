"""An index opened for search: ``Index.open(path)``, then search by vectors, text or an image file. A model whose
identity differs from the one that built the index is refused (:class:`ModelMismatchError`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipforge.features import ImageTransform, encode_image_files, encode_texts
from clipforge.index.approximate import ApproximateIndex, exact_top_k
from clipforge.index.errors import IndexFormatError
from clipforge.index.identity import ModelIdentity
from clipforge.index.layout import Item, Manifest, read_manifest, read_rows


@dataclass(frozen=True)
class Hit:
    """One result: the row id in the index, the file's path, and the cosine similarity with the query."""

    id: int
    path: str
    score: float


class Index:
    """A committed index: vectors [N, D] (memory-mapped), items, the model identity, and how it is searched."""

    def __init__(
        self, folder: Path, manifest: Manifest, vectors: np.ndarray, items: list[Item],
        approximate: ApproximateIndex | None,
    ) -> None:  # fmt: skip
        self.folder = folder
        self.manifest = manifest
        self.vectors = vectors
        self.items = items
        self.approximate = approximate
        self._checked: set[tuple[int, int | None]] = set()

    @classmethod
    def open(cls, path: str | Path, *, exact: bool = False) -> Index:
        """The index at ``path``; ``exact`` searches exactly even when an approximate index is stored."""
        folder = Path(path)
        if not folder.exists():
            raise IndexFormatError(f"{folder}: no such index folder; build one with clipforge index build")
        manifest = read_manifest(folder)
        if manifest is None:
            pending = " (a build was interrupted: run the same build command again to finish it)"
            raise IndexFormatError(
                f"{folder}: no index.json, so not a finished index"
                + (pending if (folder / "pending").is_dir() else "; build one with clipforge index build")
            )
        vectors, items = read_rows(manifest, folder)
        approximate = None
        if manifest.search.kind != "exact" and not exact:
            approximate = ApproximateIndex.load(manifest.file(folder, "approximate"), manifest.search)
        return cls(folder, manifest, vectors, items, approximate)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[str]:
        return [item.path for item in self.items]

    @property
    def identity(self) -> ModelIdentity:
        return self.manifest.model

    def check_model(self, model: nn.Module, transform: ImageTransform | None = None) -> None:
        """Refuse ``model`` (and ``transform``, for image queries) unless it is the one that built the index.
        The weights' fingerprint is computed once per model object."""
        key = (id(model), None if transform is None else id(transform))
        if key in self._checked:
            return
        other = ModelIdentity.of(model, transform, "fp32")  # text queries: the preprocessing is not compared
        self.identity.check_query_model(other, str(self.folder), images=transform is not None)
        self._checked.add(key)

    def search_batch(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> list[list[Hit]]:
        """The ``k`` best rows for each query [Q, D] (L2-normalised features), best first."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.identity.embed_dim:
            raise ValueError(
                f"queries must have shape [Q, {self.identity.embed_dim}] (the index's dimension), got "
                f"{list(queries.shape)}"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self))
        if self.approximate is not None:
            scores, rows = self.approximate.search(queries, k)
        else:
            scores, rows = exact_top_k(self.vectors, queries, k)
        return [
            [Hit(int(r), self.items[r].path, float(s)) for s, r in zip(score_row, row) if r >= 0]
            for score_row, row in zip(scores, rows)
        ]

    def search_vectors(self, query: np.ndarray | torch.Tensor, k: int = 10) -> list[Hit]:
        """The ``k`` best rows for one query vector [D], best first."""
        query = np.asarray(query, dtype=np.float32)
        if query.ndim != 1:
            raise ValueError("search_vectors takes one query of shape [D]; use search_batch for [Q, D]")
        return self.search_batch(query[None], k)[0]

    def search_row(self, row: int, k: int = 10) -> list[Hit]:
        """The ``k`` rows closest to the indexed image ``row`` (itself first)."""
        if not 0 <= row < len(self):
            raise ValueError(f"id {row} is not in the index (ids run from 0 to {len(self) - 1})")
        return self.search_vectors(np.asarray(self.vectors[row]), k)

    def search_text(
        self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], text: str, k: int = 10
    ) -> list[Hit]:
        if not text.strip():
            raise ValueError("the search text is empty; pass some text to search for")
        self.check_model(model)
        return self.search_vectors(encode_texts(model, tokenizer, [text])[0], k)

    def search_image(
        self, model: nn.Module, transform: ImageTransform, image: str | Path, k: int = 10
    ) -> list[Hit]:
        self.check_model(model, transform)
        result = encode_image_files(model, transform, [Path(image)], progress=False)
        if result.failures:
            raise ValueError(f"cannot search by image: {result.failures[0].message}")
        return self.search_vectors(result.embeddings[0], k)


__all__ = ["Hit", "Index"]
