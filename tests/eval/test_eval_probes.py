"""Probe protocol: planted signals are recovered, noise scores at chance, scaling uses the train split only."""

import numpy as np
import pytest
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import MinMaxScaler

from gair_model.eval.probes import ProbeInputError, knn_probe, prepare_split, ridge_probe, run_probes


def _embeddings(n: int = 800, latent: int = 3, dim: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings living near a low-dimensional latent space (so both ridge and kNN can read them)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, latent))
    x = z @ rng.normal(size=(latent, dim)) + 0.01 * rng.normal(size=(n, dim))
    return x, z


def test_regression_recovers_planted_linear_signal():
    x, z = _embeddings()
    y = 3.0 * z[:, 0] - 2.0 * z[:, 1] + 0.5 * z[:, 2] + 10.0
    ridge, knn = run_probes(x, y, "regression")
    assert ridge.probe == "ridge" and knn.probe == "knn"
    assert ridge.metrics["r2"] > 0.9 and knn.metrics["r2"] > 0.9
    assert ridge.alpha in (0.1, 1.0, 10.0) and knn.alpha is None and knn.k == 10
    assert (ridge.n_train, ridge.n_test) == (640, 160)
    assert ridge.metrics["mae"] < 0.5 * np.abs(y - y.mean()).mean()


def test_regression_on_noise_scores_chance():
    x, _ = _embeddings()
    y = np.random.default_rng(1).normal(size=len(x))
    ridge, knn = run_probes(x, y, "regression")
    assert ridge.metrics["r2"] <= 0.05
    assert knn.metrics["r2"] <= 0.05


def test_classification_recovers_planted_classes_and_noise_is_chance():
    x, z = _embeddings(n=1000)
    labels = np.array(["a", "b", "c", "d"])[np.argmax(z @ np.random.default_rng(2).normal(size=(3, 4)), axis=1)]
    ridge, knn = run_probes(x, labels, "classification")
    assert ridge.metrics["accuracy"] > 0.8 and knn.metrics["accuracy"] > 0.9
    assert ridge.metrics["macro_f1"] > 0.6 and ridge.extra["n_classes"] == 4
    noise = np.random.default_rng(3).integers(0, 4, size=len(x)).astype(str)
    for res in run_probes(x, noise, "classification"):
        assert abs(res.metrics["accuracy"] - 0.25) < 0.1, res


def test_minmax_uses_training_split_only():
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, size=(100, 3))
    x[:, 2] = 5.0  # a constant column must not give inf / nan
    y = rng.normal(size=100)
    _, test_idx = train_test_split(np.arange(100), test_size=0.2, random_state=42)
    x[test_idx[0], 0] = 1e6  # an extreme test value: scaling on all rows would squash the training column
    split = prepare_split(x, y, "regression")
    x_tr, x_te, y_tr, _ = train_test_split(x, y, test_size=0.2, random_state=42)
    expected = MinMaxScaler(clip=True).fit(x_tr)
    np.testing.assert_allclose(split.x_train, expected.transform(x_tr))
    np.testing.assert_allclose(split.x_test, expected.transform(x_te))
    np.testing.assert_array_equal(split.y_train, y_tr)  # raw targets, no scaling
    assert split.x_train[:, 0].min() == 0.0 and split.x_train[:, 0].max() == 1.0
    assert split.x_test.max() <= 1.0 and split.x_test.min() >= 0.0  # clipped to the training range
    assert np.isfinite(split.x_test).all() and np.all(split.x_train[:, 2] == 0.0)
    assert not np.allclose(split.x_train, MinMaxScaler().fit(x).transform(x_tr))


def test_missing_targets_are_dropped_and_counted():
    x, z = _embeddings(n=200)
    y = z[:, 0].copy()
    y[:7] = np.nan
    split = prepare_split(x, y, "regression")
    assert split.n_dropped == 7 and split.n_train + split.n_test == 193
    labels = np.array(["a", "b"] * 100, dtype=object)
    labels[:3] = None
    res = ridge_probe(prepare_split(x, labels, "classification"))
    assert res.n_dropped == 3 and res.n_train + res.n_test == 197
    assert knn_probe(prepare_split(x[:12], z[:12, 0], "regression"), k=50).k == 9  # capped at n_train


@pytest.mark.parametrize(
    ("n", "targets", "task_type", "match"),
    [
        (9, None, "regression", "at least 10"),
        (50, "one-class", "classification", "at least 2 classes"),
        (50, None, "ranking", "unknown task type"),
        (50, "strings", "regression", "numeric"),
    ],
)
def test_unusable_inputs_raise_clear_errors(n, targets, task_type, match):
    x = np.random.default_rng(5).normal(size=(n, 4))
    y = {"one-class": np.array(["x"] * n), "strings": np.array(["p"] * n)}.get(targets, np.arange(n, dtype=float))
    with pytest.raises(ProbeInputError, match=match):
        run_probes(x, y, task_type)
    assert issubclass(ProbeInputError, ValueError)
