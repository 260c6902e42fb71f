"""Intervals for evaluation figures, so every accuracy is reported with its uncertainty.

* :func:`proportion_interval`: a share of successes (top-1, R@1) — the Wilson score interval.
* :func:`mean_per_class_interval`: mean per-class accuracy — a normal interval from the per-class binomial
  variances, sum_k p_k (1 - p_k) / n_k / K^2 (classes are independent samples), with each p_k shrunk as in
  Agresti–Coull so a class at 0 or 1 still has variance.
* :func:`paired_difference_interval`: the difference of two classifiers' mean per-class accuracy on the *same*
  images (prompt ensemble vs single prompt): per class, the variance of the per-image differences, so the
  correlation between the two is used rather than ignored.
* :func:`seed_interval`: mean ± std over training seeds, with a Student-t 95% interval of the mean.

All intervals are 95% by default (``z = 1.96``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval ``[low, high]``."""

    value: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def proportion_interval(successes: int, total: int, z: float = Z95) -> Interval:
    """The Wilson score interval of ``successes / total``."""
    if total <= 0:
        raise ValueError(f"an interval needs at least one trial, got total={total}")
    if not 0 <= successes <= total:
        raise ValueError(f"successes={successes} must lie in [0, total={total}]")
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return Interval(p, max(0.0, centre - spread), min(1.0, centre + spread))


def _per_class(correct: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    correct = np.asarray(correct, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if correct.shape != labels.shape:
        raise ValueError(f"correct ({correct.shape}) and labels ({labels.shape}) must have the same length")
    if correct.size == 0:
        raise ValueError("an interval needs at least one sample")
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    hits = np.bincount(inverse, weights=correct)
    return classes, counts, hits


def mean_per_class_interval(correct: Sequence[bool] | np.ndarray, labels: Sequence[int] | np.ndarray,
                            z: float = Z95) -> Interval:  # fmt: skip
    """Mean over the classes present in ``labels`` of each class's share of ``correct`` samples."""
    _, counts, hits = _per_class(np.asarray(correct), np.asarray(labels))
    recall = hits / counts
    shrunk = (hits + z * z / 2) / (counts + z * z)  # Agresti–Coull centre: a class at 0 or 1 keeps a variance
    variance = float(np.sum(shrunk * (1 - shrunk) / counts)) / len(counts) ** 2
    value = float(recall.mean())
    spread = z * math.sqrt(variance)
    return Interval(value, max(0.0, value - spread), min(1.0, value + spread))


def paired_difference_interval(
    correct_a: Sequence[bool] | np.ndarray,
    correct_b: Sequence[bool] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    z: float = Z95,
) -> Interval:
    """Mean per-class accuracy of ``a`` minus that of ``b``, judged on the same samples."""
    a = np.asarray(correct_a, dtype=np.float64).ravel()
    b = np.asarray(correct_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"correct_a ({a.shape}) and correct_b ({b.shape}) must have the same length")
    labels = np.asarray(labels).ravel()
    _, counts, hits_a = _per_class(a, labels)
    _, _, hits_b = _per_class(b, labels)
    _, inverse = np.unique(labels, return_inverse=True)
    difference = a - b
    mean_k = np.bincount(inverse, weights=difference) / counts
    square_k = np.bincount(inverse, weights=difference**2) / counts
    # Per-class sample variance of the differences; at least that of one discordant pair, so a class where the
    # two always agree does not claim certainty.
    var_k = np.maximum(square_k - mean_k**2, 1.0 / (counts + 1)) * counts / np.maximum(counts - 1, 1)
    variance = float(np.sum(var_k / counts)) / len(counts) ** 2
    value = float(np.mean(hits_a / counts - hits_b / counts))
    spread = z * math.sqrt(variance)
    return Interval(value, value - spread, value + spread)


@dataclass(frozen=True)
class SeedSummary:
    """A figure over training seeds: mean, sample standard deviation, and a 95% t-interval of the mean."""

    mean: float
    std: float
    count: int
    interval: Interval

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f} (n={self.count})"

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "n": self.count, "low": self.interval.low,
                "high": self.interval.high}  # fmt: skip


def seed_interval(values: Sequence[float]) -> SeedSummary:
    """Mean ± std (ddof 1) of one figure over seeds, with the Student-t 95% interval of the mean."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no values: a seed summary needs at least one run")
    mean = float(data.mean())
    if data.size == 1:
        return SeedSummary(mean, float("nan"), 1, Interval(mean, float("nan"), float("nan")))
    std = float(data.std(ddof=1))
    from scipy.stats import t as student_t

    t = float(student_t.ppf(0.975, data.size - 1))
    spread = t * std / math.sqrt(data.size)
    return SeedSummary(mean, std, int(data.size), Interval(mean, mean - spread, mean + spread))
