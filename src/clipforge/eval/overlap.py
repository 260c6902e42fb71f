"""Train/eval overlap (contamination) analysis, as in the paper's section 5: which evaluation images have a
near-duplicate in the training set, found by image-embedding cosine similarity and by a perceptual hash.

Perceptual hash recipe (:func:`perceptual_hash`, ``hash_size`` = h, default 8, giving h*h = 64 bits)
-----------------------------------------------------------------------------------------------------
1. Mode: the image is made 8-bit RGB by :func:`clipforge.images.to_rgb` (alpha composited on white), then grey
   with Pillow's ``convert("L")`` (ITU-R 601 luma, L = 0.299 R + 0.587 G + 0.114 B). ``L`` images are used as is.
2. Resize to (4h) x (4h) pixels (32 x 32 for h = 8) with Pillow's Lanczos filter, ignoring the aspect ratio.
3. 2-D DCT-II of the grey values (floats in [0, 255]), unnormalised, in scipy's convention
   ``y[k] = 2 * sum_n x[n] cos(pi k (2n + 1) / (2N))`` along each axis (``scipy.fft.dctn(x, type=2)``);
   computed here with numpy as ``C @ X @ C.T`` for the first h rows of the DCT matrix ``C``.
4. Keep the top-left h x h block (the lowest frequencies, row index = vertical frequency).
5. The threshold is the median of that block *without* the DC term (coefficient [0, 0], the mean brightness,
   which is far larger than the rest and would drag the median): the median of the other h*h - 1 values.
6. Bit = coefficient > threshold, for all h*h coefficients (the DC bit is 1 for any image that is not black,
   so it is constant and never contributes to a distance between two non-black images).
7. The bits, in row-major order of the block, are read as a binary number with the first (the DC bit) as the
   most significant: ``hash = sum(bit[i] << (h*h - 1 - i))``. An all-black (constant) image hashes to 0.

Distances are Hamming distances between hashes; see ``docs/eval-overlap.md`` for the measured distances of
near-duplicates (resized, JPEG-recompressed, brightened) vs distinct images that justify the default threshold.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from clipforge.images import to_rgb

#: Eval images whose best training cosine is at least this are counted as embedding near-duplicates.
DEFAULT_COSINE_THRESHOLD = 0.95
#: Eval images with a training image at most this many bits away (of 64) are counted as hash near-duplicates.
DEFAULT_HASH_THRESHOLD = 6
# Elements per search block (eval rows x training images [x hash words]): 256 MiB of float32 cosines or
# uint64 hash words, whatever chunk_size says, so memory stays bounded for large training sets.
_BLOCK_ELEMENTS = 1 << 26


class OverlapError(ValueError):
    """Inputs to the overlap analysis do not fit together; the message names the argument and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Perceptual hash


def perceptual_hash(image: Image.Image, *, hash_size: int = 8) -> int:
    """The DCT perceptual hash of ``image``: a ``hash_size**2``-bit int (recipe in the module docstring)."""
    if not isinstance(hash_size, int) or hash_size < 2:
        raise OverlapError(
            f"hash_size must be an int >= 2 (8 gives the usual 64-bit hash), got {hash_size!r}"
        )
    side = 4 * hash_size
    gray = image if image.mode == "L" else to_rgb(image).convert("L")
    pixels = np.asarray(gray.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float64)
    basis = _dct_basis(side, hash_size)
    block = basis @ pixels @ basis.T  # (hash_size, hash_size): the lowest 2-D frequencies
    coefficients = block.ravel()
    threshold = np.median(coefficients[1:])  # without the DC term
    value = 0
    for bit in coefficients > threshold:
        value = (value << 1) | int(bit)
    return value


@functools.lru_cache(maxsize=8)
def _dct_basis(n: int, rows: int) -> np.ndarray:
    """The first ``rows`` rows of the unnormalised DCT-II matrix (scipy's convention, factor 2 included)."""
    k = np.arange(rows)[:, None]
    positions = np.arange(n)[None, :]
    basis = 2.0 * np.cos(np.pi * k * (2 * positions + 1) / (2 * n))
    basis.setflags(write=False)
    return basis


def hamming(a: int, b: int) -> int:
    """The number of bits in which the non-negative ints ``a`` and ``b`` differ."""
    if a < 0 or b < 0:
        raise OverlapError(f"hashes must be non-negative ints, got {a} and {b}")
    return (int(a) ^ int(b)).bit_count()


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class OverlapMatch:
    """One (eval image, training image) pair: the embedding cosine and the hash distance of that pair."""

    eval_index: int
    train_index: int
    cosine: float
    hash_distance: int
    eval_key: str
    train_key: str


@dataclass(frozen=True)
class OverlapResult:
    """Near-duplicate counts for an eval set against a training set, and the pairs that back them.

    ``nearest`` holds, for each eval image in order, its ``k`` best training neighbours by cosine (best first;
    ``k = 1`` by default, so one entry per eval image). ``hash_matches`` holds, for each eval image flagged by the
    hash, its closest training image by Hamming distance (ties: the higher cosine, then the lower index).
    """

    num_eval: int
    num_train: int
    cosine_threshold: float
    hash_threshold: int
    duplicates_by_embedding: int  # eval images whose best cosine >= cosine_threshold
    duplicates_by_hash: int  # eval images with some training image within hash_threshold bits
    duplicates_either: int
    duplicates_both: int
    fraction_either: float
    nearest: tuple[OverlapMatch, ...]
    hash_matches: tuple[OverlapMatch, ...]

    def flagged(self) -> list[int]:
        """Eval indices flagged by the embedding or the hash, sorted."""
        by_embedding = {m.eval_index for m in self.nearest if m.cosine >= self.cosine_threshold}
        return sorted(by_embedding | {m.eval_index for m in self.hash_matches})

    def to_dict(self, top: int = 50) -> dict[str, Any]:
        """JSON-ready summary: counts, fractions, the flagged eval keys and the ``top`` closest pairs each way."""
        if top < 0:
            raise OverlapError(f"top must be >= 0, got {top}")
        keys = {m.eval_index: m.eval_key for m in (*self.nearest, *self.hash_matches)}
        flagged = self.flagged()
        return {
            "num_eval": self.num_eval,
            "num_train": self.num_train,
            "cosine_threshold": self.cosine_threshold,
            "hash_threshold": self.hash_threshold,
            "duplicates_by_embedding": self.duplicates_by_embedding,
            "duplicates_by_hash": self.duplicates_by_hash,
            "duplicates_either": self.duplicates_either,
            "duplicates_both": self.duplicates_both,
            "fraction_by_embedding": self.duplicates_by_embedding / self.num_eval,
            "fraction_by_hash": self.duplicates_by_hash / self.num_eval,
            "fraction_either": self.fraction_either,
            "flagged_eval_keys": [keys[index] for index in flagged],
            "closest_by_embedding": [asdict(m) for m in sort_matches(self.nearest, "cosine")[:top]],
            "closest_by_hash": [asdict(m) for m in sort_matches(self.hash_matches, "hash")[:top]],
        }


def sort_matches(
    matches: Iterable[OverlapMatch], order: Literal["cosine", "hash"] = "cosine"
) -> list[OverlapMatch]:
    """Closest pairs first: by cosine (then hash distance) or by hash distance (then cosine); ties by index."""
    if order == "cosine":
        return sorted(matches, key=lambda m: (-m.cosine, m.hash_distance, m.eval_index, m.train_index))
    if order == "hash":
        return sorted(matches, key=lambda m: (m.hash_distance, -m.cosine, m.eval_index, m.train_index))
    raise OverlapError(f"order must be 'cosine' or 'hash', got {order!r}")


# ----------------------------------------------------------------------------------------------------------------
# Search


def find_overlap(
    eval_features: Any,
    train_features: Any,
    eval_hashes: Sequence[int],
    train_hashes: Sequence[int],
    *,
    eval_keys: Sequence[str],
    train_keys: Sequence[str],
    cosine_threshold: float = DEFAULT_COSINE_THRESHOLD,
    hash_threshold: int = DEFAULT_HASH_THRESHOLD,
    chunk_size: int = 4096,
    k: int = 1,
) -> OverlapResult:
    """Exact near-duplicate search of every eval image against every training image, two ways.

    ``*_features``: (N, D) float arrays or tensors, L2-normalised here (so any scale works); rows must be finite
    and non-zero. Cosines are computed in float32, at most ``chunk_size`` eval rows at a time (fewer when a
    block would exceed 64M similarities, 256 MiB), so the full matrix is never held. ``*_hashes``: non-negative
    ints from :func:`perceptual_hash` (any bit width); distances are exact, on packed uint64 words, in blocks of
    bounded size. ``k`` best neighbours per eval image are kept in ``nearest``; the counts use the best one.
    """
    eval_matrix = _normalised(eval_features, "eval_features")
    train_matrix = _normalised(train_features, "train_features")
    num_eval, num_train = len(eval_matrix), len(train_matrix)
    _check_inputs(eval_matrix, train_matrix, eval_hashes, train_hashes, eval_keys, train_keys)
    if not -1.0 <= cosine_threshold <= 1.0:
        raise OverlapError(f"cosine_threshold must lie in [-1, 1], got {cosine_threshold}")
    if not isinstance(hash_threshold, (int, np.integer)) or hash_threshold < 0:
        raise OverlapError(f"hash_threshold must be an int >= 0 (bits), got {hash_threshold!r}")
    if chunk_size < 1:
        raise OverlapError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 1 <= k <= num_train:
        raise OverlapError(f"k must lie in [1, num_train={num_train}], got {k}")

    eval_words, train_words = _pack_hashes(eval_hashes, train_hashes)
    neighbours, cosines = _nearest_by_cosine(eval_matrix, train_matrix, chunk_size, k)
    hash_best, hash_distance = _nearest_by_hash(
        eval_words, train_words, eval_matrix, train_matrix, chunk_size, int(hash_threshold)
    )

    def match(eval_index: int, train_index: int, cosine: float, distance: int) -> OverlapMatch:
        return OverlapMatch(
            int(eval_index), int(train_index), float(cosine), int(distance), str(eval_keys[eval_index]),
            str(train_keys[train_index]),
        )  # fmt: skip

    pair_distances = _popcount(eval_words[:, None, :] ^ train_words[neighbours]).sum(axis=2)  # (num_eval, k)
    nearest = [
        match(row, neighbours[row, rank], cosines[row, rank], pair_distances[row, rank])
        for row in range(num_eval)
        for rank in range(k)
    ]
    by_embedding = cosines[:, 0] >= cosine_threshold
    by_hash = hash_distance <= hash_threshold
    hash_matches = [
        match(row, hash_best[row], eval_matrix[row] @ train_matrix[hash_best[row]], hash_distance[row])
        for row in np.flatnonzero(by_hash)
    ]
    either = int(np.count_nonzero(by_embedding | by_hash))
    return OverlapResult(
        num_eval=num_eval,
        num_train=num_train,
        cosine_threshold=float(cosine_threshold),
        hash_threshold=int(hash_threshold),
        duplicates_by_embedding=int(np.count_nonzero(by_embedding)),
        duplicates_by_hash=int(np.count_nonzero(by_hash)),
        duplicates_either=either,
        duplicates_both=int(np.count_nonzero(by_embedding & by_hash)),
        fraction_either=either / num_eval,
        nearest=tuple(nearest),
        hash_matches=tuple(hash_matches),
    )


def _normalised(features: Any, name: str) -> np.ndarray:
    """(N, D) float32, rows scaled to unit length; refuses non-finite values and zero rows by index."""
    if hasattr(features, "detach"):  # a torch tensor (bf16/fp16 included): float32 on the CPU first
        features = features.detach().float().cpu().numpy()
    matrix = np.asarray(features)
    if matrix.ndim != 2:
        raise OverlapError(f"{name} must be 2-D (num_images, dim), got shape {matrix.shape}")
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise OverlapError(f"{name} must hold numbers, got dtype {matrix.dtype}")
    matrix = matrix.astype(np.float32)
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise OverlapError(
            f"{name}: rows {_preview(np.flatnonzero(bad))} hold NaN or infinity; re-extract those features"
        )
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise OverlapError(
            f"{name}: rows {_preview(np.flatnonzero(zero))} are all zeros, so their cosine is undefined; "
            "re-extract those features or drop the images"
        )
    return matrix / norms


def _preview(indices: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return f"{shown} (and {len(indices) - limit} more)" if len(indices) > limit else shown


def _check_inputs(
    eval_matrix: np.ndarray,
    train_matrix: np.ndarray,
    eval_hashes: Sequence[int],
    train_hashes: Sequence[int],
    eval_keys: Sequence[str],
    train_keys: Sequence[str],
) -> None:
    for side, matrix, hashes, keys in (
        ("eval", eval_matrix, eval_hashes, eval_keys),
        ("train", train_matrix, train_hashes, train_keys),
    ):
        if len(matrix) == 0:
            raise OverlapError(
                f"{side}_features is empty: there is nothing to compare; check the {side} dataset"
            )
        if len(hashes) != len(matrix) or len(keys) != len(matrix):
            raise OverlapError(
                f"{side} inputs differ in length: {side}_features has {len(matrix)} rows, {side}_hashes "
                f"{len(hashes)}, {side}_keys {len(keys)}; they must describe the same images in the same order"
            )
    if eval_matrix.shape[1] != train_matrix.shape[1]:
        raise OverlapError(
            f"feature dimensions differ: eval_features has dim {eval_matrix.shape[1]}, train_features "
            f"{train_matrix.shape[1]}; embed both sets with the same model"
        )


def _nearest_by_cosine(
    eval_matrix: np.ndarray, train_matrix: np.ndarray, chunk_size: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(num_eval, k) training indices and cosines, best first (ties: the lower training index)."""
    num_eval = len(eval_matrix)
    neighbours = np.empty((num_eval, k), dtype=np.int64)
    cosines = np.empty((num_eval, k), dtype=np.float32)
    train_t = np.ascontiguousarray(train_matrix.T)
    rows = max(1, min(chunk_size, _BLOCK_ELEMENTS // len(train_matrix)))
    for start in range(0, num_eval, rows):
        similarity = eval_matrix[start : start + rows] @ train_t
        if k == 1:
            best = similarity.argmax(axis=1)[:, None]
        else:
            # The k-th largest value decides membership; take every column tied with it, then order exactly.
            kth = np.partition(similarity, -k, axis=1)[:, -k : -k + 1]
            best = np.empty((len(similarity), k), dtype=np.int64)
            for row, values in enumerate(similarity):
                candidates = np.flatnonzero(values >= kth[row, 0])
                order = np.lexsort((candidates, -values[candidates]))
                best[row] = candidates[order[:k]]
        neighbours[start : start + len(similarity)] = best
        cosines[start : start + len(similarity)] = np.take_along_axis(similarity, best, axis=1)
    return neighbours, cosines


def _pack_hashes(eval_hashes: Sequence[int], train_hashes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Both hash lists as (N, words) uint64, words = enough 64-bit words for the widest hash (at least 1)."""
    widest = 0
    for side, hashes in (("eval_hashes", eval_hashes), ("train_hashes", train_hashes)):
        for index, value in enumerate(hashes):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise OverlapError(
                    f"{side}[{index}] is {value!r}; hashes must be non-negative ints from perceptual_hash"
                )
            widest = max(widest, int(value).bit_length())
    words = max(1, math.ceil(widest / 64))

    def pack(hashes: Sequence[int]) -> np.ndarray:
        packed = np.empty((len(hashes), words), dtype=np.uint64)
        mask = (1 << 64) - 1
        for index, value in enumerate(hashes):
            value = int(value)
            for word in range(words):
                packed[index, words - 1 - word] = (value >> (64 * word)) & mask
        return packed

    return pack(eval_hashes), pack(train_hashes)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element (same shape, uint8)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words)
    as_bytes = words.view(np.uint8).reshape(*words.shape, 8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1, dtype=np.uint8)


_BYTE_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def _nearest_by_hash(
    eval_words: np.ndarray,
    train_words: np.ndarray,
    eval_matrix: np.ndarray,
    train_matrix: np.ndarray,
    chunk_size: int,
    hash_threshold: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per eval image, the closest training image by Hamming distance and that distance (exact search).

    For images within ``hash_threshold`` (the ones reported), ties in distance go to the higher cosine, then the
    lower training index, so the pair shown is the most convincing one; for the rest, to the lower index.
    """
    num_eval, num_train = len(eval_words), len(train_words)
    words = eval_words.shape[1]
    rows = max(1, min(chunk_size, _BLOCK_ELEMENTS // (num_train * words)))
    best = np.empty(num_eval, dtype=np.int64)
    best_distance = np.empty(num_eval, dtype=np.int64)
    for start in range(0, num_eval, rows):
        block = eval_words[start : start + rows]
        distances = _popcount(block[:, None, :] ^ train_words[None, :, :]).sum(axis=2, dtype=np.int32)
        best[start : start + len(block)] = distances.argmin(axis=1)
        lowest = distances.min(axis=1)
        best_distance[start : start + len(block)] = lowest
        for offset in np.flatnonzero(lowest <= hash_threshold):
            candidates = np.flatnonzero(distances[offset] == lowest[offset])
            if len(candidates) > 1:
                cosines = train_matrix[candidates] @ eval_matrix[start + offset]
                best[start + offset] = candidates[np.lexsort((candidates, -cosines))[0]]
    return best, best_distance


# ----------------------------------------------------------------------------------------------------------------
# Streaming analysis


def analyze_overlap(
    eval_items: Iterable[tuple[str, Image.Image]],
    train_items: Iterable[tuple[str, Image.Image]],
    embed: Callable[[list[Image.Image]], np.ndarray],
    *,
    batch_size: int = 64,
    cosine_threshold: float = DEFAULT_COSINE_THRESHOLD,
    hash_threshold: int = DEFAULT_HASH_THRESHOLD,
    progress: bool = True,
    hash_size: int = 8,
    chunk_size: int = 4096,
    k: int = 1,
) -> tuple[OverlapResult, np.ndarray, np.ndarray]:
    """Hash and embed both sets ``batch_size`` images at a time (only one batch of images is held), then run
    :func:`find_overlap`. ``embed`` maps a list of images to an (len(list), D) array (any scale).

    Returns the result and the eval and training features as float32 arrays, so a caller can cache them.
    """
    if batch_size < 1:
        raise OverlapError(f"batch_size must be >= 1, got {batch_size}")
    eval_keys, eval_hashes, eval_features = _hash_and_embed(
        eval_items, embed, batch_size, hash_size, "eval", progress
    )
    train_keys, train_hashes, train_features = _hash_and_embed(
        train_items, embed, batch_size, hash_size, "train", progress
    )
    result = find_overlap(
        eval_features,
        train_features,
        eval_hashes,
        train_hashes,
        eval_keys=eval_keys,
        train_keys=train_keys,
        cosine_threshold=cosine_threshold,
        hash_threshold=hash_threshold,
        chunk_size=chunk_size,
        k=k,
    )
    return result, eval_features, train_features


def _hash_and_embed(
    items: Iterable[tuple[str, Image.Image]],
    embed: Callable[[list[Image.Image]], np.ndarray],
    batch_size: int,
    hash_size: int,
    side: str,
    progress: bool,
) -> tuple[list[str], list[int], np.ndarray]:
    from tqdm.auto import tqdm

    keys: list[str] = []
    hashes: list[int] = []
    features: list[np.ndarray] = []
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with tqdm(total=total, unit="image", desc=f"overlap: {side}", disable=not progress) as bar:
        for batch in _batches(items, batch_size):
            images = [image for _, image in batch]
            batch_features = embed(images)
            if hasattr(batch_features, "detach"):
                batch_features = batch_features.detach().float().cpu().numpy()
            batch_features = np.asarray(batch_features, dtype=np.float32)
            first = len(keys)
            if batch_features.ndim != 2 or len(batch_features) != len(images):
                raise OverlapError(
                    f"embed returned shape {batch_features.shape} for {len(images)} {side} images "
                    f"(items {first}..{first + len(images) - 1}); it must return (num_images, dim)"
                )
            if features and batch_features.shape[1] != features[0].shape[1]:
                raise OverlapError(
                    f"embed returned dim {batch_features.shape[1]} for {side} items {first}.., "
                    f"but {features[0].shape[1]} before; it must return one fixed dimension"
                )
            keys.extend(str(key) for key, _ in batch)
            hashes.extend(perceptual_hash(image, hash_size=hash_size) for image in images)
            features.append(batch_features)
            bar.update(len(batch))
    if not features:
        raise OverlapError(f"the {side} set yielded no images; check the {side} dataset")
    return keys, hashes, np.concatenate(features)


def _batches(items: Iterable[tuple[str, Image.Image]], size: int) -> Iterator[list[tuple[str, Image.Image]]]:
    batch: list[tuple[str, Image.Image]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


__all__ = [
    "DEFAULT_COSINE_THRESHOLD",
    "DEFAULT_HASH_THRESHOLD",
    "OverlapError",
    "OverlapMatch",
    "OverlapResult",
    "analyze_overlap",
    "find_overlap",
    "hamming",
    "perceptual_hash",
    "sort_matches",
]
