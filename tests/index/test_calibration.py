"""Match probabilities: a logistic curve fitted on an index's own labelled hits (cbir.index.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.index.calibration import calibrate_scores, fit_logistic, match_probability


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_fit_logistic_recovers_a_known_curve_on_packed_cosines():
    """Cosines packed in [0.97, 1] (as a trained embedding gives them) with P(same) = sigmoid(400 s - 394)."""
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.97, 1.0, 20000)
    same = rng.random(len(scores)) < sigmoid(400 * scores - 394)
    a, b = fit_logistic(scores, same)
    assert a == pytest.approx(400, rel=0.1)
    grid = np.linspace(0.97, 1.0, 31)
    assert np.abs(sigmoid(a * grid + b) - sigmoid(400 * grid - 394)).max() < 0.04


def test_match_probability_is_the_curve_and_none_without_one():
    curve = {"a": 400.0, "b": -394.0}
    assert match_probability(0.985, curve) == pytest.approx(0.5)
    assert match_probability(1.0, curve) == pytest.approx(sigmoid(6.0))
    assert match_probability(-1.0, curve) == pytest.approx(0.0, abs=1e-12)  # no overflow far out
    assert match_probability(0.99, None) is None


def exact_search(database: np.ndarray):
    def search(queries: np.ndarray, k: int):
        scores = queries @ database.T
        order = np.argsort(-scores, axis=1)[:, :k]
        return np.take_along_axis(scores, order, axis=1), order
    return search


def planted_collection(rng, classes=6, per_class=40, spread=0.5, dim=16):
    centres = rng.normal(size=(classes, dim))
    vectors = np.repeat(centres, per_class, axis=0) + spread * rng.normal(size=(classes * per_class, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [f"c{i}" for i in np.repeat(np.arange(classes), per_class)]
    return vectors.astype(np.float32), labels


def test_calibration_from_an_index_says_what_its_hits_mean():
    rng = np.random.default_rng(1)
    both, both_labels = planted_collection(rng, per_class=80, spread=0.9)  # overlapping classes: right and wrong hits
    vectors, labels = both[0::2], both_labels[0::2]  # the index; the other half probes it
    probe, probe_labels = both[1::2], both_labels[1::2]
    ids = np.arange(100, 100 + len(vectors))  # ids need not start at 0
    search = exact_search(vectors)

    def id_search(queries, k):
        scores, rows = search(queries, k)
        return scores, ids[rows]

    curve = calibrate_scores(id_search, lambda positions: vectors[positions], ids, labels, k=10, sample=200)
    assert curve is not None and curve["a"] > 0  # closer = more likely the same class
    assert curve["queries"] == 200 and curve["pairs"] == 2000  # self left out, k hits each
    assert curve["brier"] < curve["base_rate"] * (1 - curve["base_rate"])  # better than guessing the base rate
    # calibrated: among held-out hits, predicted and observed same-class rates agree
    scores, rows = search(probe, 10)
    predicted = np.array([[match_probability(s, curve) for s in row] for row in scores])
    observed = np.array([[labels[r] == probe_labels[q] for r in row] for q, row in enumerate(rows)])
    assert abs(predicted.mean() - observed.mean()) < 0.1


def test_no_curve_without_labels_or_with_one_class():
    rng = np.random.default_rng(3)
    vectors, labels = planted_collection(rng)
    ids = np.arange(len(vectors))
    rows = lambda positions: vectors[positions]  # noqa: E731
    assert calibrate_scores(exact_search(vectors), rows, ids, [None] * len(vectors)) is None
    assert calibrate_scores(exact_search(vectors), rows, ids, ["one"] * len(vectors)) is None
    far_apart, far_labels = planted_collection(rng, spread=0.01)  # every hit is right: nothing to fit
    assert calibrate_scores(exact_search(far_apart), lambda p: far_apart[p], ids, far_labels, k=5) is None
