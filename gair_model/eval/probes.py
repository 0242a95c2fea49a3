"""Linear and kNN probes on frozen embeddings, with the protocol of the location-encoder literature.

The protocol follows SatCLIP / GeoCLIP-style evaluations so that figures are comparable:

* rows whose target is missing (NaN / None) or whose features are not finite are dropped first (and counted);
* one 80/20 random split with seed 42 (:func:`sklearn.model_selection.train_test_split`, no stratification);
* features min-max scaled with statistics of the **training split only** (``MinMaxScaler(clip=True)``: test
  features outside the training range are clipped to [0, 1]; constant columns map to 0, never to inf);
* raw targets (no target scaling);
* regression: ``RidgeCV(alphas=(0.1, 1, 10), cv=3)`` -> R2 and MAE; classification:
  ``RidgeClassifierCV(alphas=(0.1, 1, 10), cv=3)`` -> accuracy and macro-F1;
* a kNN probe (``KNeighborsRegressor`` / ``KNeighborsClassifier``, k = 10 by default, capped at the training
  size) on the same scaled features.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeClassifierCV, RidgeCV
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.preprocessing import MinMaxScaler

SEED = 42
TEST_SIZE = 0.2
ALPHAS = (0.1, 1.0, 10.0)
RIDGE_CV = 3
KNN_K = 10
MIN_SAMPLES = 10
TASK_TYPES = ("regression", "classification")
PROBES = ("ridge", "knn")


class ProbeInputError(ValueError):
    """The samples cannot be probed (too few, a single class, wrong shapes, unknown task type)."""


@dataclass
class ProbeSplit:
    """Scaled train/test features and raw targets of one task.

    Attributes:
        x_train: ``n_train x D`` min-max scaled features (train statistics).
        x_test: ``n_test x D`` features scaled with the train statistics and clipped to [0, 1].
        y_train: Training targets (floats for regression, labels for classification).
        y_test: Test targets.
        task_type: ``regression`` or ``classification``.
        n_dropped: Rows dropped before the split (missing target or non-finite feature).
        seed: Seed of the split.
    """

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    task_type: str
    n_dropped: int = 0
    seed: int = SEED

    @property
    def n_train(self) -> int:
        """Training rows."""
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        """Test rows."""
        return len(self.y_test)


@dataclass
class ProbeResult:
    """One probe's outcome.

    Attributes:
        probe: ``ridge`` or ``knn``.
        task_type: ``regression`` or ``classification``.
        metrics: ``{"r2", "mae"}`` or ``{"accuracy", "macro_f1"}``.
        alpha: Ridge regularisation chosen by cross-validation (``None`` for kNN).
        k: Neighbours used by kNN (``None`` for ridge).
        n_train: Training rows.
        n_test: Test rows.
        n_dropped: Rows dropped before the split.
        wall_s: Seconds to fit and score the probe.
        extra: Free-form details (e.g. the class count).
    """

    probe: str
    task_type: str
    metrics: dict[str, float]
    alpha: float | None
    k: int | None
    n_train: int
    n_test: int
    n_dropped: int
    wall_s: float
    extra: dict[str, float | int | str] = field(default_factory=dict)


def _missing_mask(targets: np.ndarray) -> np.ndarray:
    """True where a target is missing (NaN, None, pandas NA)."""
    return np.asarray(pd.isna(pd.Series(targets, dtype=object)), dtype=bool)


def prepare_split(features: np.ndarray, targets: Sequence | np.ndarray, task_type: str, *,
                  seed: int = SEED, test_size: float = TEST_SIZE) -> ProbeSplit:
    """Drop unusable rows, split 80/20 and min-max scale with the training statistics.

    Args:
        features: ``N x D`` embeddings.
        targets: ``N`` targets (numbers for regression, labels for classification; NaN/None = missing).
        task_type: ``regression`` or ``classification``.
        seed: Seed of the random split.
        test_size: Fraction of rows held out.

    Returns:
        The scaled split.

    Raises:
        ProbeInputError: Unknown task type, mismatched lengths, fewer than :data:`MIN_SAMPLES` usable rows,
            or fewer than two classes for classification.
    """
    if task_type not in TASK_TYPES:
        raise ProbeInputError(f"unknown task type {task_type!r}; choose from {TASK_TYPES}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ProbeInputError(f"features must be N x D, got shape {x.shape}")
    y = np.asarray(targets, dtype=object)
    if len(y) != len(x):
        raise ProbeInputError(f"{len(x)} feature rows but {len(y)} targets")
    keep = ~_missing_mask(y) & np.isfinite(x).all(axis=1)
    n_dropped = int((~keep).sum())
    x, y = x[keep], y[keep]
    if task_type == "regression":
        try:
            y = y.astype(np.float64)
        except (TypeError, ValueError) as exn:
            raise ProbeInputError(f"regression targets must be numeric ({exn})") from None
    else:
        y = y.astype(str)
        n_classes = len(np.unique(y))
        if n_classes < 2:
            raise ProbeInputError(f"classification needs at least 2 classes, got {n_classes}")
    if len(y) < MIN_SAMPLES:
        raise ProbeInputError(f"only {len(y)} usable samples ({n_dropped} dropped); need at least {MIN_SAMPLES}")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, shuffle=True)
    scaler = MinMaxScaler(clip=True).fit(x_tr)
    return ProbeSplit(scaler.transform(x_tr), scaler.transform(x_te), y_tr, y_te, task_type, n_dropped, seed)


def _metrics(task_type: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    if task_type == "regression":
        return {"r2": float(r2_score(y_true, y_pred)), "mae": float(mean_absolute_error(y_true, y_pred))}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def _extra(split: ProbeSplit) -> dict[str, float | int | str]:
    if split.task_type == "classification":
        return {"n_classes": len(np.unique(np.concatenate([split.y_train, split.y_test])))}
    return {}


def ridge_probe(split: ProbeSplit, *, alphas: Sequence[float] = ALPHAS, cv: int = RIDGE_CV) -> ProbeResult:
    """Cross-validated ridge regression / classification on a prepared split.

    Args:
        split: Output of :func:`prepare_split`.
        alphas: Candidate regularisation strengths.
        cv: Folds of the alpha search (capped by the training size and, for classification, the smallest class).

    Returns:
        The probe result (``alpha`` is the chosen strength).
    """
    t0 = time.perf_counter()
    cv = min(cv, split.n_train)
    if split.task_type == "classification":
        cv = min(cv, int(np.unique(split.y_train, return_counts=True)[1].min()))
    if cv < 2:
        raise ProbeInputError(f"too few training samples per class for {RIDGE_CV}-fold (or even 2-fold) "
                              "cross-validation of the ridge alpha")
    model_cls = RidgeCV if split.task_type == "regression" else RidgeClassifierCV
    model = model_cls(alphas=tuple(alphas), cv=cv)
    with warnings.catch_warnings():
        # Tiny classes in a fold only warn; the score is still defined.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        model.fit(split.x_train, split.y_train)
    pred = model.predict(split.x_test)
    return ProbeResult("ridge", split.task_type, _metrics(split.task_type, split.y_test, pred), float(model.alpha_),
                       None, split.n_train, split.n_test, split.n_dropped, time.perf_counter() - t0, _extra(split))


def knn_probe(split: ProbeSplit, *, k: int = KNN_K) -> ProbeResult:
    """k-nearest-neighbour regression / classification (uniform weights, Euclidean) on a prepared split.

    Args:
        split: Output of :func:`prepare_split`.
        k: Neighbours (capped at the training size).

    Returns:
        The probe result (``k`` is the neighbour count actually used).
    """
    t0 = time.perf_counter()
    k = max(1, min(k, split.n_train))
    model_cls = KNeighborsRegressor if split.task_type == "regression" else KNeighborsClassifier
    model = model_cls(n_neighbors=k).fit(split.x_train, split.y_train)
    pred = model.predict(split.x_test)
    return ProbeResult("knn", split.task_type, _metrics(split.task_type, split.y_test, pred), None, k,
                       split.n_train, split.n_test, split.n_dropped, time.perf_counter() - t0, _extra(split))


def run_probes(features: np.ndarray, targets: Sequence | np.ndarray, task_type: str, *,
               probes: Sequence[str] = PROBES, k: int = KNN_K, seed: int = SEED) -> list[ProbeResult]:
    """Split once, then run each requested probe on the same split.

    Args:
        features: ``N x D`` embeddings.
        targets: ``N`` targets.
        task_type: ``regression`` or ``classification``.
        probes: Any of ``ridge`` and ``knn``.
        k: kNN neighbours.
        seed: Split seed.

    Returns:
        One result per probe, in the order asked.

    Raises:
        ProbeInputError: As :func:`prepare_split`, or for an unknown probe name.
    """
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ProbeInputError(f"unknown probe(s) {unknown}; choose from {PROBES}")
    split = prepare_split(features, targets, task_type, seed=seed)
    return [ridge_probe(split) if p == "ridge" else knn_probe(split, k=k) for p in probes]
