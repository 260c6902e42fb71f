"""Linear probes on frozen features, following the CLIP paper's protocol (Appendix A.3), and k-shot probes.

Logistic regression (scikit-learn, L2, L-BFGS) is fit on frozen features; its inverse regularisation strength
``C`` is chosen on a validation split by the paper's parametric binary search over ``[1e-6, 1e6]`` at a final
resolution of 8 steps per decade; the chosen ``C`` is refit on train + validation and scored on the test set.

Mapping to the paper's lambda: scikit-learn's L2 logistic regression minimises
``C * sum_i CE(x_i, y_i) + 0.5 * ||W||^2`` (the sum, not the mean, of the per-example losses; the intercept is
not penalised), so ``C = 1 / lambda`` for the objective ``sum_i CE + (lambda / 2) ||W||^2``. The grid is symmetric
(``lambda`` and ``C`` both span ``10^-6 .. 10^6``), so the searched set is the same either way. The penalty does
not scale with the number of examples: a given ``C`` regularises a small training set relatively more.
See ``docs/eval-metrics.md`` for the reasons behind every choice here.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: log10 of the smallest and largest C searched (the paper's lambda range, 1e-6 .. 1e6).
C_MIN_EXPONENT, C_MAX_EXPONENT = -6, 6
#: The final resolution of the search: C values are 10 ** (i / STEPS_PER_DECADE) for integer i.
STEPS_PER_DECADE = 8
#: The search starts with every other decade: 1e-6, 1e-4, 1e-2, 1, 1e2, 1e4, 1e6.
START_STEP_DECADES = 2
# Independent random streams per (seed, class): one for k-shot draws, one for validation splits.
_SHOT_STREAM, _SPLIT_STREAM = 0, 1
#: C used for 1-shot probes, where no validation split can be drawn (the value in OpenAI's README example).
DEFAULT_ONE_SHOT_C = 0.316


class LinearProbeError(ValueError):
    """Inputs to a linear probe do not fit together; the message names the argument and the fix."""


@dataclass(frozen=True)
class LinearProbeResult:
    """The outcome of :func:`linear_probe`; accuracies are fractions in [0, 1]."""

    c: float  # chosen C (scikit-learn's inverse L2 strength)
    val_accuracy: float  # validation top-1 at the chosen C
    test_accuracy: float  # top-1 on test after refitting on train + validation
    test_mean_per_class: float  # mean per-class recall on test (over classes present in test)
    search: tuple[tuple[float, float], ...]  # (C, validation top-1) for every C tried, in the order tried
    num_train: int
    num_val: int
    num_test: int
    num_classes: int
    not_converged: tuple[float, ...] = ()  # Cs whose L-BFGS fit stopped at max_iter (search and refit)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the search as a list of ``{"c", "val_accuracy"}`` records)."""
        return {
            "c": self.c,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "test_mean_per_class": self.test_mean_per_class,
            "search": [{"c": c, "val_accuracy": acc} for c, acc in self.search],
            "num_train": self.num_train,
            "num_val": self.num_val,
            "num_test": self.num_test,
            "num_classes": self.num_classes,
            "not_converged": list(self.not_converged),
        }


@dataclass(frozen=True)
class FewShotRun:
    """One seed of a k-shot probe. ``val_accuracy`` is None for k = 1 (no validation split, fixed C)."""

    seed: int
    c: float
    val_accuracy: float | None
    test_accuracy: float
    test_mean_per_class: float
    search: tuple[tuple[float, float], ...]  # empty for k = 1
    train_indices: tuple[int, ...]  # rows of train_x forming the k-shot set (sorted); see sample_k_shot
    not_converged: tuple[float, ...] = ()  # Cs whose L-BFGS fit stopped at max_iter (search and refit)


@dataclass(frozen=True)
class FewShotResult:
    """The outcome of :func:`few_shot`: per-seed runs and their summary (std is the sample std, ddof=1)."""

    k: int
    runs: tuple[FewShotRun, ...]
    mean_accuracy: float
    std_accuracy: float  # 0.0 for a single seed
    mean_per_class: float  # mean over seeds of the test mean per-class recall
    num_classes: int
    num_test: int

    @property
    def accuracies(self) -> tuple[float, ...]:
        """Test top-1 per seed, in the order of ``runs``."""
        return tuple(run.test_accuracy for run in self.runs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict. Per-run ``train_indices`` are left out (``sample_k_shot(seed)`` rebuilds them)."""
        return {
            "k": self.k,
            "mean_accuracy": self.mean_accuracy,
            "std_accuracy": self.std_accuracy,
            "mean_per_class": self.mean_per_class,
            "num_classes": self.num_classes,
            "num_test": self.num_test,
            "runs": [
                {
                    "seed": run.seed,
                    "c": run.c,
                    "val_accuracy": run.val_accuracy,
                    "test_accuracy": run.test_accuracy,
                    "test_mean_per_class": run.test_mean_per_class,
                    "search": [{"c": c, "val_accuracy": acc} for c, acc in run.search],
                    "not_converged": list(run.not_converged),
                }
                for run in self.runs
            ],
        }


# ----------------------------------------------------------------------------------------------------------------
# The search over C, independent of what is being scored


def c_at(index: int) -> float:
    """The C at grid position ``index``: ``10 ** (index / STEPS_PER_DECADE)`` (index 0 is C = 1)."""
    return float(10.0 ** (index / STEPS_PER_DECADE))


def parametric_search(score: Callable[[float], float]) -> tuple[float, tuple[tuple[float, float], ...]]:
    """Maximise ``score(C)`` over the 97-point grid ``10 ** (i / 8)``, ``i = -48 .. 48``, the paper's way.

    Scores the 7 starting points 1e-6, 1e-4, ..., 1e6 (in that order), then repeatedly halves the step (2, 1,
    1/2, 1/4, 1/8 decades) and scores the two grid points one step either side of the current best, skipping
    points already scored or outside the range: at most 7 + 4 * 2 = 15 evaluations. The best is the highest
    score; among equal scores the smallest C (the strongest regularisation) wins, so the result is
    deterministic. Returns ``(best C, ((C, score), ...) in evaluation order)``. For a unimodal score this finds
    the grid maximum exactly; otherwise a local one near the best starting point, as the paper's search does.
    """
    lowest, highest = C_MIN_EXPONENT * STEPS_PER_DECADE, C_MAX_EXPONENT * STEPS_PER_DECADE
    step = START_STEP_DECADES * STEPS_PER_DECADE
    scores: dict[int, float] = {}
    order: list[int] = []

    def visit(index: int) -> None:
        if lowest <= index <= highest and index not in scores:
            scores[index] = float(score(c_at(index)))
            order.append(index)

    def best() -> int:  # highest score, then smallest index (smallest C)
        return min(scores, key=lambda index: (-scores[index], index))

    for index in range(lowest, highest + 1, step):
        visit(index)
    while step > 1:
        step //= 2
        peak = best()
        visit(peak - step)
        visit(peak + step)
    return c_at(best()), tuple((c_at(index), scores[index]) for index in order)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


def search_c(
    train_x: Any,
    train_y: Any,
    val_x: Any,
    val_y: Any,
    *,
    max_iter: int = 1000,
    standardize: bool = False,
    progress: bool = False,
) -> tuple[float, tuple[tuple[float, float], ...]]:
    """Choose C by fitting on ``train`` and scoring validation top-1 (:func:`parametric_search`).

    ``train_x``/``val_x`` are float [N, D] arrays (numpy or CPU torch), ``*_y`` int [N] class ids >= 0; every
    validation class must occur in train. With ``standardize`` the features are standardised with train's mean
    and std. Returns ``(chosen C, ((C, validation top-1), ...) in the order tried)``. Cs whose fit stopped at
    ``max_iter`` are logged as a warning.
    """
    train_x, train_y = _check_pair(train_x, train_y, "train")
    val_x, val_y = _check_pair(val_x, val_y, "val", dim=train_x.shape[1])
    _check_max_iter(max_iter)
    _check_classes(train_y, {"val_y": val_y})
    c, search, not_converged = _search(train_x, train_y, val_x, val_y, max_iter, standardize, progress)
    _warn_not_converged(not_converged, max_iter)
    return c, search


def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    val_x: Any = None,
    val_y: Any = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    standardize: bool = False,
    progress: bool = False,
) -> LinearProbeResult:
    """The paper's linear probe: choose C on validation, refit on train + validation, report test accuracy.

    Features are float [N, D] (numpy or CPU torch), labels int [N] class ids >= 0. Without ``val_x``/``val_y``
    the validation set is a stratified split of train (:func:`stratified_split` with ``val_fraction``, ``seed``).
    Every class of validation and test must occur in train (a class the probe never saw cannot be predicted).
    ``standardize`` standardises features with the mean/std of the data each model is fit on (train for the
    search, train + validation for the refit). The result equals ``LogisticRegression(C=result.c,
    max_iter=max_iter, random_state=0)`` fit on train + validation (see :func:`fit_logistic_regression`).
    """
    train_x, train_y = _check_pair(train_x, train_y, "train")
    test_x, test_y = _check_pair(test_x, test_y, "test", dim=train_x.shape[1])
    _check_max_iter(max_iter)
    if (val_x is None) != (val_y is None):
        raise LinearProbeError(
            "pass both val_x and val_y, or neither (then a split of train is the validation)"
        )
    if val_x is None:
        fit_idx, val_idx = stratified_split(train_y, val_fraction=val_fraction, seed=seed)
        train_x, val_x = train_x[fit_idx], train_x[val_idx]
        train_y, val_y = train_y[fit_idx], train_y[val_idx]
    else:
        val_x, val_y = _check_pair(val_x, val_y, "val", dim=train_x.shape[1])
    _check_classes(train_y, {"val_y": val_y, "test_y": test_y})

    c, search, not_converged = _search(train_x, train_y, val_x, val_y, max_iter, standardize, progress)
    val_accuracy = dict(search)[c]
    model, scaler, converged = _fit(
        np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), c, max_iter, standardize
    )
    if not converged:
        not_converged = (*not_converged, c)
    _warn_not_converged(not_converged, max_iter)
    predictions = model.predict(_transform(scaler, test_x))
    return LinearProbeResult(
        c=c,
        val_accuracy=val_accuracy,
        test_accuracy=float(np.mean(predictions == test_y)),
        test_mean_per_class=mean_per_class_recall(test_y, predictions),
        search=search,
        num_train=len(train_y),
        num_val=len(val_y),
        num_test=len(test_y),
        num_classes=len(np.unique(train_y)),
        not_converged=not_converged,
    )


def few_shot(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    k: int,
    seeds: Sequence[int] = (0, 1, 2),
    max_iter: int = 1000,
    val_fraction: float = 0.2,
    one_shot_c: float = DEFAULT_ONE_SHOT_C,
    standardize: bool = False,
) -> FewShotResult:
    """k-shot linear probes: per seed, k training examples per class, C chosen on a split of those k.

    For each seed, :func:`sample_k_shot` draws k rows per class of train. For k >= 2 the k-shot set is split
    per class (:func:`stratified_split`, ``val_fraction``, at least one validation and one fitting example per
    class), C is searched as in :func:`linear_probe` and the chosen C refit on all k. For k = 1 no split is
    possible (holding out a class's only example removes the class), so C is fixed at ``one_shot_c``. Every
    class of train must have at least k examples, and every test class must occur in train.
    """
    train_x, train_y = _check_pair(train_x, train_y, "train")
    test_x, test_y = _check_pair(test_x, test_y, "test", dim=train_x.shape[1])
    _check_max_iter(max_iter)
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise LinearProbeError(f"seeds must be a non-empty sequence of distinct ints, got {seeds!r}")
    if not (isinstance(one_shot_c, (int, float)) and math.isfinite(one_shot_c) and one_shot_c > 0):
        raise LinearProbeError(f"one_shot_c must be a positive finite float, got {one_shot_c!r}")
    _check_classes(train_y, {"test_y": test_y})

    runs = [
        _few_shot_run(
            train_x, train_y, test_x, test_y, k, seed, max_iter, val_fraction, one_shot_c, standardize
        )
        for seed in seeds
    ]
    accuracies = np.array([run.test_accuracy for run in runs])
    return FewShotResult(
        k=k,
        runs=tuple(runs),
        mean_accuracy=float(accuracies.mean()),
        std_accuracy=float(accuracies.std(ddof=1)) if len(runs) > 1 else 0.0,
        mean_per_class=float(np.mean([run.test_mean_per_class for run in runs])),
        num_classes=len(np.unique(train_y)),
        num_test=len(test_y),
    )


def _few_shot_run(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int,
    seed: int,
    max_iter: int,
    val_fraction: float,
    one_shot_c: float,
    standardize: bool,
) -> FewShotRun:
    shot_idx = sample_k_shot(train_y, k, seed=seed)
    shot_x, shot_y = train_x[shot_idx], train_y[shot_idx]
    if k == 1:
        c, search, val_accuracy, not_converged = float(one_shot_c), (), None, ()
    else:
        fit_idx, val_idx = stratified_split(shot_y, val_fraction=val_fraction, seed=seed)
        c, search, not_converged = _search(
            shot_x[fit_idx], shot_y[fit_idx], shot_x[val_idx], shot_y[val_idx], max_iter, standardize, False
        )
        val_accuracy = dict(search)[c]
    model, scaler, converged = _fit(shot_x, shot_y, c, max_iter, standardize)  # refit on all k per class
    if not converged:
        not_converged = (*not_converged, c)
    _warn_not_converged(not_converged, max_iter)
    predictions = model.predict(_transform(scaler, test_x))
    return FewShotRun(
        seed=int(seed),
        c=c,
        val_accuracy=val_accuracy,
        test_accuracy=float(np.mean(predictions == test_y)),
        test_mean_per_class=mean_per_class_recall(test_y, predictions),
        search=search,
        train_indices=tuple(int(i) for i in shot_idx),
        not_converged=not_converged,
    )


# ----------------------------------------------------------------------------------------------------------------
# Sampling and splitting


def sample_k_shot(labels: Any, k: int, *, seed: int) -> np.ndarray:
    """Indices (sorted) of ``k`` rows per class of ``labels``, drawn without replacement.

    Each class is drawn with its own generator ``np.random.default_rng((seed, class, 0))``, so one class's
    draw does not depend on which other classes exist. Raises if any class has fewer than k rows.
    """
    labels = _check_labels(labels, "labels")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise LinearProbeError(f"k must be an int >= 1, got {k!r}")
    _check_seed(seed)
    classes, counts = np.unique(labels, return_counts=True)
    short = [(int(c), int(n)) for c, n in zip(classes, counts) if n < k]
    if short:
        shown = ", ".join(f"class {c}: {n}" for c, n in short[:10])
        raise LinearProbeError(
            f"k={k} shots need at least {k} training examples per class; {len(short)} class(es) have fewer "
            f"({shown}{', ...' if len(short) > 10 else ''}): lower k or drop those classes"
        )
    picked = [
        np.random.default_rng((seed, int(c), _SHOT_STREAM)).choice(
            np.flatnonzero(labels == c), size=k, replace=False
        )
        for c in classes
    ]
    return np.sort(np.concatenate(picked))


def stratified_split(
    labels: Any, *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (fit, validation), per class, reproducibly.

    A class with n >= 2 rows sends ``min(n - 1, max(1, floor(val_fraction * n + 0.5)))`` rows to validation
    (at least one, and at least one stays for fitting); a class with a single row stays entirely in the fitting
    part. Rows are chosen by ``np.random.default_rng((seed, class, 1)).permutation`` (a stream apart from
    :func:`sample_k_shot`'s). Both outputs are sorted.
    """
    labels = _check_labels(labels, "labels")
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise LinearProbeError(f"val_fraction must be a float in (0, 1), got {val_fraction!r}")
    _check_seed(seed)
    fit_parts, val_parts = [], []
    for c in np.unique(labels):
        rows = np.random.default_rng((seed, int(c), _SPLIT_STREAM)).permutation(np.flatnonzero(labels == c))
        n_val = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, math.floor(val_fraction * len(rows) + 0.5)))
        val_parts.append(rows[:n_val])
        fit_parts.append(rows[n_val:])
    fit_idx, val_idx = np.sort(np.concatenate(fit_parts)), np.sort(np.concatenate(val_parts))
    if len(val_idx) == 0:
        raise LinearProbeError(
            "the validation split is empty: every class has a single training example; pass val_x/val_y"
        )
    return fit_idx, val_idx


def mean_per_class_recall(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of the fraction of that class predicted correctly."""
    classes, inverse = np.unique(labels, return_inverse=True)
    correct = np.bincount(inverse, weights=(predictions == labels).astype(np.float64), minlength=len(classes))
    return float(np.mean(correct / np.bincount(inverse, minlength=len(classes))))


# ----------------------------------------------------------------------------------------------------------------
# Fitting


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, c: float, *, max_iter: int = 1000) -> Any:
    """The probe's classifier: ``LogisticRegression(C=c, max_iter=max_iter, random_state=0)`` fit on (x, y).

    L2 penalty and the L-BFGS solver are scikit-learn's defaults (named neither, so no deprecation warning on
    scikit-learn >= 1.8, where ``penalty`` is deprecated); multinomial loss for 3+ classes, binary for 2.
    ConvergenceWarnings are silenced here; callers read ``n_iter_`` and report instead.
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the lock file
        raise ImportError(
            "linear probes need scikit-learn: pip install 'scikit-learn>=1.3' (it is in requirements/lock.txt)"
        ) from exc
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    model = LogisticRegression(C=c, max_iter=max_iter, random_state=0)
    # One BLAS thread: these fits are small, and BLAS threads fighting torch's OpenMP pool (still spinning after
    # feature extraction) made a fit take 2 s instead of 0.03 s on 2 cores (measured; docs/eval-metrics.md).
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, standardize: bool) -> tuple[Any, Any, bool]:
    scaler = None
    if standardize:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x)
        x = scaler.transform(x)
    model = fit_logistic_regression(x, y, c, max_iter=max_iter)
    return model, scaler, bool(np.max(model.n_iter_) < max_iter)


def _transform(scaler: Any, x: np.ndarray) -> np.ndarray:
    return x if scaler is None else scaler.transform(x)


def _search(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    max_iter: int,
    standardize: bool,
    progress: bool,
) -> tuple[float, tuple[tuple[float, float], ...], tuple[float, ...]]:
    if len(np.unique(train_y)) < 2:
        raise LinearProbeError(
            "the probe's training part has a single class; a classifier needs at least two"
        )
    if len(val_y) == 0:
        raise LinearProbeError("the validation set is empty; pass more data or a larger val_fraction")
    not_converged: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=15, desc="linear probe: C search", unit="fit")

    def score(c: float) -> float:
        model, scaler, converged = _fit(train_x, train_y, c, max_iter, standardize)
        if not converged:
            not_converged.append(c)
        if bar is not None:
            bar.update(1)
        # A count, not a float mean: equal accuracies compare exactly equal, so ties break by C alone.
        return int(np.count_nonzero(model.predict(_transform(scaler, val_x)) == val_y))

    try:
        c, counts = parametric_search(score)
    finally:
        if bar is not None:
            bar.close()
    search = tuple((c_tried, count / len(val_y)) for c_tried, count in counts)
    return c, search, tuple(not_converged)


def _warn_not_converged(not_converged: tuple[float, ...], max_iter: int) -> None:
    if not_converged:
        logger.warning(
            "L-BFGS stopped at max_iter=%d before converging for C in %s; results at those C may be "
            "slightly off (raise max_iter, or standardize the features)",
            max_iter,
            ", ".join(f"{c:.3g}" for c in not_converged),
        )


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
            return value.numpy()
        return value.float().numpy()  # numpy has no bfloat16
    return np.asarray(value)


def _check_features(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    x = _to_numpy(x)
    if x.ndim != 2:
        raise LinearProbeError(f"{name} must be a 2-D [N, D] feature array, got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise LinearProbeError(f"{name} must hold floats, got dtype {x.dtype}; cast with .astype(np.float32)")
    if dim is not None and x.shape[1] != dim:
        raise LinearProbeError(f"{name} has {x.shape[1]} features per row but train_x has {dim}")
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise LinearProbeError(
            f"{name} has {int(bad.sum())} non-finite values (NaN/inf), the first in row {row}"
        )
    return x


def _check_labels(y: Any, name: str) -> np.ndarray:
    y = _to_numpy(y)
    if y.ndim != 1:
        raise LinearProbeError(f"{name} must be a 1-D [N] array of class ids, got shape {tuple(y.shape)}")
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise LinearProbeError(f"{name} must hold integer class ids, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise LinearProbeError(f"{name} has a negative class id ({int(y.min())}); class ids must be >= 0")
    return y.astype(np.int64, copy=False)


def _check_pair(x: Any, y: Any, split: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    x = _check_features(x, f"{split}_x", dim)
    y = _check_labels(y, f"{split}_y")
    if len(x) != len(y):
        raise LinearProbeError(f"{split}_x has {len(x)} rows but {split}_y has {len(y)} labels")
    if len(y) == 0:
        raise LinearProbeError(f"{split}_x/{split}_y are empty")
    return x, y


def _check_classes(train_y: np.ndarray, others: dict[str, np.ndarray]) -> None:
    known = np.unique(train_y)
    for name, labels in others.items():
        missing = np.setdiff1d(np.unique(labels), known)
        if len(missing):
            shown = ", ".join(str(int(c)) for c in missing[:10])
            raise LinearProbeError(
                f"{name} has {len(missing)} class(es) with no training example ({shown}"
                f"{', ...' if len(missing) > 10 else ''}); a probe cannot predict a class it never saw: add "
                "training data for them or drop them from the evaluation"
            )


def _check_max_iter(max_iter: int) -> None:
    if not isinstance(max_iter, (int, np.integer)) or isinstance(max_iter, bool) or max_iter < 1:
        raise LinearProbeError(f"max_iter must be an int >= 1, got {max_iter!r}")


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise LinearProbeError(f"seed must be an int >= 0, got {seed!r}")
