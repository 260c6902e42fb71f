"""Intervals against known answers and against their promised coverage on simulated data."""

from __future__ import annotations

import numpy as np
import pytest

from clipforge.eval.intervals import (
    mean_per_class_interval,
    paired_difference_interval,
    proportion_interval,
    seed_interval,
)


def test_wilson_interval_known_values():
    # Wilson 95% for 8/10 (e.g. Newcombe 1998, Table I): 0.4902 to 0.9433.
    interval = proportion_interval(8, 10)
    assert interval.value == 0.8
    assert interval.low == pytest.approx(0.4902, abs=1e-4) and interval.high == pytest.approx(
        0.9433, abs=1e-4
    )
    zero = proportion_interval(0, 20)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.1611, abs=1e-4)
    with pytest.raises(ValueError, match="at least one trial"):
        proportion_interval(0, 0)


def test_mean_per_class_value_and_width():
    labels = np.array([0] * 100 + [1] * 10)
    correct = np.array([True] * 90 + [False] * 10 + [True] * 5 + [False] * 5)
    interval = mean_per_class_interval(correct, labels)
    assert interval.value == pytest.approx((0.9 + 0.5) / 2)
    # Dominated by the small class: sd ≈ sqrt(0.5 * 0.5 / 10) / 2.
    assert interval.half_width == pytest.approx(1.96 * np.sqrt(0.5 * 0.5 / 10 + 0.09 / 100) / 2, rel=0.15)


def test_mean_per_class_interval_covers_the_truth_about_95_percent():
    rng = np.random.default_rng(0)
    truth = np.array([0.2, 0.5, 0.7, 0.9, 0.95, 0.6, 0.4, 0.8, 0.3])
    sizes = rng.integers(40, 200, size=len(truth))
    labels = np.repeat(np.arange(len(truth)), sizes)
    hits = 0
    trials = 2000
    for _ in range(trials):
        correct = rng.random(labels.size) < truth[labels]
        interval = mean_per_class_interval(correct, labels)
        hits += interval.low <= truth.mean() <= interval.high
    assert 0.93 <= hits / trials <= 0.97


def test_paired_difference_uses_the_pairing():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 100)
    a = rng.random(labels.size) < 0.6
    b = a.copy()
    flip = rng.random(labels.size) < 0.05  # b differs from a on 5% of the images
    b[flip] = ~b[flip]
    paired = paired_difference_interval(a, b, labels)
    unpaired_half_width = np.hypot(
        mean_per_class_interval(a, labels).half_width, mean_per_class_interval(b, labels).half_width
    )
    assert paired.half_width < unpaired_half_width / 3
    assert paired.low <= paired.value <= paired.high
    same = paired_difference_interval(a, a, labels)
    assert same.value == 0.0 and same.half_width > 0


def test_paired_difference_covers_the_truth():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(9), 120)
    hits, trials = 0, 1000
    for _ in range(trials):
        base = rng.random(labels.size)
        a = base < 0.55
        b = base < 0.50  # true difference 0.05 in every class
        noise = rng.random(labels.size) < 0.1
        b = np.where(noise, rng.random(labels.size) < 0.5, b)
        true_b = 0.9 * 0.50 + 0.1 * 0.5
        interval = paired_difference_interval(a, b, labels)
        hits += interval.low <= 0.55 - true_b <= interval.high
    assert 0.92 <= hits / trials <= 0.98


def test_seed_interval():
    summary = seed_interval([0.5, 0.6, 0.7])
    assert summary.mean == pytest.approx(0.6) and summary.std == pytest.approx(0.1)
    assert summary.interval.high - summary.mean == pytest.approx(4.303 * 0.1 / np.sqrt(3), rel=1e-3)
    single = seed_interval([0.4])
    assert single.count == 1 and np.isnan(single.std)
