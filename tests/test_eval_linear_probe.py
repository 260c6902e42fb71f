"""Linear-probe protocol: the C search, the refit, k-shot sampling, and input checks (small synthetic data)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from clipforge.eval.linear_probe import (
    DEFAULT_ONE_SHOT_C,
    LinearProbeError,
    c_at,
    few_shot,
    linear_probe,
    mean_per_class_recall,
    parametric_search,
    sample_k_shot,
    search_c,
    stratified_split,
)

STARTS = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """L-BFGS on these small problems is BLAS-call bound; on a busy 2-core machine threaded BLAS spins and runs
    up to ~100x slower (measured: 2 s vs 0.03 s per fit), so the tests pin BLAS/OpenMP to one thread."""
    with threadpool_limits(limits=1):
        yield


def blobs(num_classes=4, dim=8, per_class=30, spread=1.5, seed=0):
    """Gaussian clusters around random centres: overlapping, so accuracy depends on C."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    y = np.repeat(np.arange(num_classes), per_class)
    x = (centres[y] + spread * rng.normal(size=(len(y), dim))).astype(np.float32)
    order = rng.permutation(len(y))
    return x[order], y[order]


def grid_index(c: float) -> float:
    return math.log10(c) * 8


def direct_fit(x, y, c):
    return LogisticRegression(C=c, max_iter=1000, random_state=0).fit(x, y)


# ----------------------------------------------------------------------------------------------------------------
# lambda <-> C


def test_sklearn_objective_is_c_times_summed_loss_plus_half_squared_norm():
    """The documented mapping C = 1/lambda rests on sklearn minimising C * sum(CE) + ||W||^2 / 2: the gradient
    of that objective vanishes at sklearn's solution, while the 'mean loss' reading's gradient does not."""
    x, y = blobs(num_classes=3, per_class=40)
    x = x.astype(np.float64)
    targets = np.eye(3)[y]
    for c in (0.05, 2.0):
        model = LogisticRegression(C=c, tol=1e-12, max_iter=10_000).fit(x, y)
        logits = x @ model.coef_.T + model.intercept_
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        loss_grad = (probs - targets).T @ x
        assert np.abs(c * loss_grad + model.coef_).max() < 1e-5
        assert np.abs(loss_grad / len(y) + model.coef_ / c).max() > 1e-2
        assert np.abs((probs - targets).sum(axis=0)).max() < 1e-5  # the intercept is not penalised


# ----------------------------------------------------------------------------------------------------------------
# The search itself, on known score functions


def test_search_visits_starts_then_halves_around_the_peak():
    calls = []

    def score(c):
        calls.append(c)
        return -abs(grid_index(c) - 13)  # unimodal, peak at C = 10 ** (13 / 8)

    best, search = parametric_search(score)
    # starts; step 8 around 16 (-> 8, 24); step 4 (-> 12, 20); 12 best; step 2 (-> 10, 14), tie 12 vs 14 keeps
    # the smaller C; step 1 around 12 (-> 11, 13).
    expected = [-48, -32, -16, 0, 16, 32, 48, 8, 24, 12, 20, 10, 14, 11, 13]
    assert [round(grid_index(c)) for c, _ in search] == expected
    assert calls == [c for c, _ in search]
    assert best == c_at(13)
    assert tuple(c for c, _ in search[:7]) == STARTS


@pytest.mark.parametrize("peak", [-48, -47, -31, 0, 5, 29, 47, 48])
def test_search_finds_the_exact_grid_peak_of_a_unimodal_score(peak):
    best, search = parametric_search(lambda c: -abs(grid_index(c) - peak))
    assert best == c_at(peak)
    assert len(search) <= 15
    indices = [grid_index(c) for c, _ in search]
    assert all(abs(i - round(i)) < 1e-9 and -48 <= round(i) <= 48 for i in indices)  # on the 1/8-decade grid
    assert len(set(np.round(indices))) == len(indices)  # nothing scored twice
    # 8 steps per decade reached: both grid neighbours of the winner were tried (unless past the range).
    tried = {round(i) for i in indices}
    assert all(n in tried for n in (peak - 1, peak + 1) if -48 <= n <= 48)


def test_search_ties_pick_the_smallest_c():
    best, search = parametric_search(lambda c: 1.0)
    assert best == 1e-6
    assert [round(grid_index(c)) for c, _ in search] == [-48, -32, -16, 0, 16, 32, 48, -40, -44, -46, -47]
    best, _ = parametric_search(lambda c: 1.0 if 1e-2 <= c <= 1e2 else 0.0)  # a plateau: its low edge wins
    assert best == 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Linear probe against a direct scikit-learn fit


def test_probe_equals_direct_sklearn_fit_on_train_plus_val():
    x, y = blobs(per_class=45)
    train_x, train_y, val_x, val_y, test_x, test_y = x[:80], y[:80], x[80:120], y[80:120], x[120:], y[120:]
    result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y)

    model = direct_fit(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), result.c)
    predictions = model.predict(test_x)
    assert result.test_accuracy == np.mean(predictions == test_y)
    assert result.test_mean_per_class == pytest.approx(
        np.mean([np.mean(predictions[test_y == k] == k) for k in np.unique(test_y)]), abs=1e-12
    )
    # Every searched score is a direct fit on train scored on val; the chosen C has the best (smallest on ties).
    for c, accuracy in result.search:
        assert accuracy == np.mean(direct_fit(train_x, train_y, c).predict(val_x) == val_y)
    best = max(acc for _, acc in result.search)
    assert result.c == min(c for c, acc in result.search if acc == best)
    assert result.val_accuracy == best
    assert (result.num_train, result.num_val, result.num_test, result.num_classes) == (80, 40, 60, 4)
    assert 0.3 < result.test_accuracy < 1.0  # overlapping blobs: a non-trivial problem
    assert len({acc for _, acc in result.search}) > 2  # C mattered


def test_probe_without_val_uses_a_reproducible_stratified_split_of_train():
    x, y = blobs(per_class=30)
    train_x, train_y, test_x, test_y = x[:90], y[:90], x[90:], y[90:]
    result = linear_probe(train_x, train_y, test_x, test_y, val_fraction=0.25, seed=3)
    fit_idx, val_idx = stratified_split(train_y, val_fraction=0.25, seed=3)
    assert (
        result.search
        == linear_probe(
            train_x[fit_idx], train_y[fit_idx], test_x, test_y, val_x=train_x[val_idx], val_y=train_y[val_idx]
        ).search
    )
    order = np.concatenate([fit_idx, val_idx])
    model = direct_fit(train_x[order], train_y[order], result.c)
    assert result.test_accuracy == np.mean(model.predict(test_x) == test_y)
    assert result.num_train + result.num_val == 90


def test_standardize_equals_a_scaler_fit_on_the_fitting_data():
    x, y = blobs(per_class=40, seed=2)
    x = x * np.linspace(0.01, 100, x.shape[1], dtype=np.float32)  # very unequal feature scales
    train_x, train_y, val_x, val_y, test_x, test_y = x[:70], y[:70], x[70:110], y[70:110], x[110:], y[110:]
    result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y, standardize=True)
    c, accuracy = result.search[3]
    scaler = StandardScaler().fit(train_x)
    assert accuracy == np.mean(
        direct_fit(scaler.transform(train_x), train_y, c).predict(scaler.transform(val_x)) == val_y
    )
    fit_x = np.concatenate([train_x, val_x])
    scaler = StandardScaler().fit(fit_x)
    model = direct_fit(scaler.transform(fit_x), np.concatenate([train_y, val_y]), result.c)
    assert result.test_accuracy == np.mean(model.predict(scaler.transform(test_x)) == test_y)


@pytest.mark.slow
def test_search_is_deterministic_and_accepts_torch_tensors():
    x, y = blobs(per_class=25, seed=4)
    first = search_c(x[:60], y[:60], x[60:], y[60:])
    second = search_c(torch.from_numpy(x[:60]), torch.from_numpy(y[:60]), x[60:], y[60:])
    assert first == second
    c, search = first
    assert tuple(c_tried for c_tried, _ in search[:7]) == STARTS
    assert 7 < len(search) <= 15
    assert c in dict(search)


def test_separable_problem_reaches_full_accuracy():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(5), 20)
    x = (np.eye(5, 12)[y] * 10 + 0.1 * rng.normal(size=(100, 12))).astype(np.float32)
    result = linear_probe(x[::2], y[::2], x[1::2], y[1::2])
    assert result.test_accuracy == 1.0
    assert result.test_mean_per_class == 1.0
    assert result.val_accuracy == 1.0
    assert result.c == 1e-6  # every C is perfect, and ties go to the strongest regularisation


def test_mean_per_class_recall_known_value():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    predictions = np.array([0, 0, 0, 1, 0, 2, 0])
    assert mean_per_class_recall(labels, predictions) == pytest.approx((3 / 4 + 0 + 1 / 2) / 3)


def test_non_convergence_is_counted_and_logged(caplog):
    x, y = blobs(per_class=20, seed=5)
    with caplog.at_level(logging.WARNING, logger="clipforge.eval.linear_probe"):
        result = linear_probe(x[:60], y[:60], x[60:], y[60:], max_iter=1)
    assert len(result.not_converged) >= 10  # one iteration converges for nothing but the tiniest C
    assert "max_iter=1" in caplog.text
    json.dumps(result.to_dict())


def test_to_dict_is_json_ready():
    x, y = blobs(per_class=15, seed=6)
    record = json.loads(json.dumps(linear_probe(x[:40], y[:40], x[40:], y[40:]).to_dict()))
    assert set(record) >= {
        "c",
        "val_accuracy",
        "test_accuracy",
        "test_mean_per_class",
        "search",
        "num_classes",
    }
    assert record["search"][0] == {"c": 1e-6, "val_accuracy": record["search"][0]["val_accuracy"]}


# ----------------------------------------------------------------------------------------------------------------
# Splits and k-shot sampling


def test_stratified_split_counts_and_determinism():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 2)
    fit_idx, val_idx = stratified_split(labels, val_fraction=0.2, seed=7)
    assert sorted(np.concatenate([fit_idx, val_idx]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val_idx], minlength=4).tolist() == [
        2,
        1,
        0,
        1,
    ]  # 10*0.2=2; >=1; single stays; 1
    again = stratified_split(labels, val_fraction=0.2, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((fit_idx, val_idx), again))
    assert not np.array_equal(val_idx, stratified_split(labels, val_fraction=0.2, seed=8)[1])


def test_sample_k_shot_takes_exactly_k_per_class_and_seeds_differ():
    labels = np.repeat(np.arange(6), [5, 7, 9, 4, 8, 6])
    picks = {seed: sample_k_shot(labels, 4, seed=seed) for seed in range(3)}
    for picked in picks.values():
        assert np.bincount(labels[picked]).tolist() == [4] * 6
        assert len(set(picked.tolist())) == len(picked)
    assert len({tuple(p) for p in picks.values()}) == 3
    assert np.array_equal(picks[1], sample_k_shot(labels, 4, seed=1))
    # A class's draw does not depend on the other classes.
    only_class_2 = np.flatnonzero(labels == 2)
    assert np.array_equal(
        picks[0][labels[picks[0]] == 2], only_class_2[sample_k_shot(labels[only_class_2], 4, seed=0)]
    )


@pytest.mark.slow
def test_few_shot_runs_equal_direct_fits_on_their_subsets():
    x, y = blobs(num_classes=3, per_class=30, seed=8)
    train_x, train_y, test_x, test_y = x[:60], y[:60], x[60:], y[60:]
    result = few_shot(train_x, train_y, test_x, test_y, k=4, seeds=(0, 1, 2))
    assert [run.seed for run in result.runs] == [0, 1, 2]
    assert len({run.train_indices for run in result.runs}) == 3
    for run in result.runs:
        picked = np.array(run.train_indices)
        assert np.array_equal(picked, sample_k_shot(train_y, 4, seed=run.seed))
        assert np.bincount(train_y[picked]).tolist() == [4, 4, 4]
        fit_idx, val_idx = stratified_split(train_y[picked], seed=run.seed)
        assert (run.c, run.search) == search_c(
            train_x[picked][fit_idx],
            train_y[picked][fit_idx],
            train_x[picked][val_idx],
            train_y[picked][val_idx],
        )
        model = direct_fit(train_x[picked], train_y[picked], run.c)
        assert run.test_accuracy == np.mean(model.predict(test_x) == test_y)
    accuracies = np.array(result.accuracies)
    assert result.mean_accuracy == pytest.approx(accuracies.mean())
    assert result.std_accuracy == pytest.approx(accuracies.std(ddof=1))
    json.dumps(result.to_dict())


def test_one_shot_uses_the_fixed_c():
    x, y = blobs(num_classes=3, per_class=10, seed=9)
    result = few_shot(x[:15], y[:15], x[15:], y[15:], k=1, seeds=(5,))
    (run,) = result.runs
    assert run.c == DEFAULT_ONE_SHOT_C and run.val_accuracy is None and run.search == ()
    picked = np.array(run.train_indices)
    model = direct_fit(x[:15][picked], y[:15][picked], DEFAULT_ONE_SHOT_C)
    assert run.test_accuracy == np.mean(model.predict(x[15:]) == y[15:])
    assert result.std_accuracy == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Input errors


def test_input_errors_name_the_problem():
    x, y = blobs(per_class=10)
    with pytest.raises(LinearProbeError, match="train_x has 40 rows but train_y has 39"):
        linear_probe(x, y[:-1], x, y)
    with pytest.raises(LinearProbeError, match="test_x has 7 features per row but train_x has 8"):
        linear_probe(x, y, x[:, :7], y)
    with pytest.raises(LinearProbeError, match="2-D"):
        linear_probe(x[0], y, x, y)
    with pytest.raises(LinearProbeError, match="negative class id"):
        linear_probe(x, np.where(y == 0, -1, y), x, y)
    with pytest.raises(LinearProbeError, match="integer class ids"):
        linear_probe(x, y.astype(np.float32), x, y)
    with pytest.raises(LinearProbeError, match=r"test_y has 1 class\(es\) with no training example \(3\)"):
        linear_probe(x[y < 3], y[y < 3], x, y)
    with pytest.raises(LinearProbeError, match=r"val_y has 1 class\(es\) with no training example \(3\)"):
        search_c(x[y < 3], y[y < 3], x, y)
    bad = x.copy()
    bad[5, 2] = np.nan
    with pytest.raises(LinearProbeError, match="non-finite.*row 5"):
        linear_probe(bad, y, x, y)
    with pytest.raises(LinearProbeError, match="single class"):
        search_c(x[y == 0], y[y == 0], x[y == 0], y[y == 0])
    with pytest.raises(LinearProbeError, match="both val_x and val_y"):
        linear_probe(x, y, x, y, val_x=x)
    with pytest.raises(LinearProbeError, match="val_fraction"):
        linear_probe(x, y, x, y, val_fraction=1.0)
    with pytest.raises(LinearProbeError, match=r"k=11 shots.*4 class\(es\) have fewer \(class 0: 10"):
        few_shot(x, y, x, y, k=11)
    with pytest.raises(LinearProbeError, match="distinct"):
        few_shot(x, y, x, y, k=2, seeds=(1, 1))
    with pytest.raises(LinearProbeError, match="k must be an int"):
        few_shot(x, y, x, y, k=0)
