"""Image <-> text retrieval metrics (Recall@K, median and mean rank) with several captions per image.

Scores are the dot products of the features as passed (cosine similarity when the caller L2-normalised them,
as ``encode_image(..., normalize=True)`` does; nothing is normalised here). Ranks are 1-based and pessimistic
about ties: a query's rank is ``1 + the number of wrong candidates scoring >= its best right candidate``, so a
tie never helps. Image -> text: an image's right candidates are all of its captions, and it is retrieved at K if
any of them is within the top K. Text -> image: a caption's single right candidate is its image. The score
matrix is computed in row chunks, so ``N_img x N_txt`` is never held at once. See ``docs/eval-metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class RetrievalError(ValueError):
    """Retrieval inputs do not fit together; the message names the argument and the fix."""


def retrieval_metrics(
    image_features: Any,
    text_features: Any,
    text_to_image: Any,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Recall@K and median/mean rank in both directions.

    Args:
        image_features: float [N_img, D] (torch tensor or numpy array).
        text_features: float [N_txt, D]; moved to ``image_features``' device if a tensor elsewhere.
        text_to_image: int [N_txt], the image index of each caption; every image needs at least one caption.
        ks: the K of Recall@K, positive ints.
        chunk_size: query rows scored at once; peak extra memory is one ``chunk_size x max(N_img, N_txt)``
            score block (4 bytes per score in float32).

    Returns:
        ``image_to_text_R@{k}`` and ``text_to_image_R@{k}`` for each k (fractions in [0, 1]),
        ``image_to_text_median_rank``, ``text_to_image_median_rank``, ``image_to_text_mean_rank``,
        ``text_to_image_mean_rank`` (1-based; the median of an even count is the mean of the two middle ranks).
        Scores are computed in float32 (float64 if either input is float64).
    """
    images, texts, owner = _check_inputs(image_features, text_features, text_to_image)
    ks = _check_ks(ks)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise RetrievalError(f"chunk_size must be an int >= 1, got {chunk_size!r}")

    image_ranks = _image_to_text_ranks(images, texts, owner, chunk_size)
    text_ranks = _text_to_image_ranks(images, texts, owner, chunk_size)
    metrics: dict[str, float] = {}
    for direction, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        for k in ks:
            metrics[f"{direction}_R@{k}"] = float(np.mean(ranks <= k))
    for direction, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        metrics[f"{direction}_median_rank"] = float(np.median(ranks))
        metrics[f"{direction}_mean_rank"] = float(np.mean(ranks))
    return metrics


def _image_to_text_ranks(
    images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor, chunk: int
) -> np.ndarray:
    """Per image: 1 + number of other images' captions scoring >= the image's best-scoring caption.

    Own captions are read from the score rows by index (no [chunk, N_txt] mask): the rank is all captions
    scoring >= the best own score minus the own captions that do (at least the best one itself).
    """
    by_image = torch.argsort(owner, stable=True)  # caption indices grouped by image, images in order
    offsets = torch.cat([owner.new_zeros(1), torch.bincount(owner, minlength=len(images)).cumsum(0)]).tolist()
    ranks = []
    for start in range(0, len(images), chunk):
        scores = images[start : start + chunk] @ texts.T  # [chunk, N_txt]
        captions = by_image[offsets[start] : offsets[start + len(scores)]]
        rows = owner[captions] - start
        own_scores = scores[rows, captions]  # the very values in `scores`, so ties compare exactly
        best_own = torch.full((len(scores),), float("-inf"), dtype=scores.dtype, device=scores.device)
        best_own = best_own.scatter_reduce(0, rows, own_scores, reduce="amax")
        own_ahead = torch.bincount(
            rows, weights=(own_scores >= best_own[rows]).to(scores.dtype), minlength=len(scores)
        )
        all_ahead = _count_at_least(scores, best_own.unsqueeze(1))
        ranks.append((all_ahead - own_ahead.long() + 1).cpu())
    return torch.cat(ranks).numpy()


def _text_to_image_ranks(
    images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor, chunk: int
) -> np.ndarray:
    """Per caption: 1 + number of other images scoring >= the caption's own image."""
    ranks = []
    for start in range(0, len(texts), chunk):
        scores = texts[start : start + chunk] @ images.T  # [chunk, N_img]
        own = owner[start : start + chunk].unsqueeze(1)
        own_score = scores.gather(1, own)
        # ">=" counts the own image too (a score equals itself), hence no "+ 1".
        ranks.append(_count_at_least(scores, own_score).cpu())
    return torch.cat(ranks).numpy()


def _count_at_least(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row, how many of ``scores`` are >= ``threshold`` [rows, 1]; overwrites ``scores`` with 0/1.

    In place, so no [rows, N] boolean or int64 tensor is allocated (``(a >= b).sum()`` makes both: 9 extra bytes
    per score). Summing 0/1 floats is exact while the count stays below 2**24 for float32; longer rows are
    summed in float64.
    """
    exact = torch.float64 if scores.shape[1] >= 2**24 else scores.dtype
    return scores.ge_(threshold).sum(dim=1, dtype=exact).long()


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.from_numpy(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise RetrievalError(f"{name} must be a torch tensor or a numeric numpy array: {exc}") from exc


def _check_inputs(image_features: Any, text_features: Any, text_to_image: Any) -> tuple[torch.Tensor, ...]:
    images = _as_tensor(image_features, "image_features")
    texts = _as_tensor(text_features, "text_features")
    owner = _as_tensor(text_to_image, "text_to_image")
    for name, features in (("image_features", images), ("text_features", texts)):
        if features.ndim != 2:
            raise RetrievalError(f"{name} must be 2-D [N, D], got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise RetrievalError(f"{name} must hold floats, got dtype {features.dtype}")
        if len(features) == 0:
            raise RetrievalError(f"{name} is empty")
    if images.shape[1] != texts.shape[1]:
        raise RetrievalError(
            f"image_features have D={images.shape[1]} but text_features have D={texts.shape[1]}; both must come "
            "from the same model's joint embedding space"
        )
    if owner.ndim != 1 or owner.is_floating_point() or owner.is_complex() or owner.dtype == torch.bool:
        raise RetrievalError(
            f"text_to_image must be a 1-D integer array [N_txt], got shape {tuple(owner.shape)}, dtype {owner.dtype}"
        )
    if len(owner) != len(texts):
        raise RetrievalError(
            f"text_to_image has {len(owner)} entries but text_features has {len(texts)} rows"
        )
    num_images = len(images)
    bad = torch.nonzero((owner < 0) | (owner >= num_images)).flatten()
    if len(bad):
        first = int(bad[0])
        raise RetrievalError(
            f"text_to_image[{first}] = {int(owner[first])} is not an image index in [0, {num_images}) "
            f"({len(bad)} such entries)"
        )
    counts = torch.bincount(owner.long().cpu(), minlength=num_images)
    captionless = torch.nonzero(counts == 0).flatten()
    if len(captionless):
        shown = ", ".join(str(int(i)) for i in captionless[:10])
        raise RetrievalError(
            f"{len(captionless)} image(s) have no caption in text_to_image (indices {shown}"
            f"{', ...' if len(captionless) > 10 else ''}); drop them from image_features or add their captions"
        )
    dtype = torch.promote_types(torch.promote_types(images.dtype, texts.dtype), torch.float32)
    images = images.to(dtype)
    texts = texts.to(device=images.device, dtype=dtype)
    for name, features in (("image_features", images), ("text_features", texts)):
        bad_rows = torch.nonzero(~torch.isfinite(features).all(dim=1)).flatten()
        if len(bad_rows):
            raise RetrievalError(
                f"{name} has {len(bad_rows)} row(s) with NaN/inf values, the first is row {int(bad_rows[0])}"
            )
    return images, texts, owner.to(device=images.device, dtype=torch.long)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks):
        raise RetrievalError(f"ks must be a non-empty sequence of ints >= 1, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise RetrievalError(f"ks has duplicates: {ks!r}")
    return tuple(int(k) for k in ks)
