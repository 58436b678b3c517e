"""Match probabilities for search scores, fitted on a labelled collection when its index is built.

Cosine similarities are hard to read: with a well-trained embedding every top-10 hit can score 0.98-0.99,
right or wrong (on the demo index the median hit of the query's own class scores 0.992 and the median
other-class hit 0.988). An index built over a labelled collection therefore learns, once, what a score
means there: a sample of its own images searches the index (each leaving itself out), every top-k hit is a
pair labelled "same class" or not, and a logistic curve ``P(same | cosine) = 1 / (1 + exp(-(a * cosine + b)))``
is fitted to those pairs (Platt scaling). The curve is stored in the index's description
(``score_calibration``) and every hit then carries ``match``, the probability that it shows what the query
shows, as it was measured on this collection. A collection without labels gets no curve (``match`` is None).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_QUERIES = 2000  # images of the collection that search it to give the (score, same class) pairs
MIN_PAIRS_EACH = 20    # fewer same-class or other-class pairs than this: too little to fit a curve


def fit_logistic(scores: np.ndarray, same: np.ndarray, l2: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """``(a, b)`` of ``P(same) = sigmoid(a * score + b)`` by Newton's method on the mean log-loss (a small L2
    penalty keeps a perfectly separable sample finite). Scores are standardised first: cosines packed into
    [0.98, 1] would otherwise make the Hessian nearly singular."""
    x = np.asarray(scores, np.float64)
    y = np.asarray(same, np.float64)
    mean, std = float(x.mean()), float(x.std()) or 1.0
    z = (x - mean) / std
    design = np.stack([z, np.ones_like(z)], axis=1)
    weights = np.zeros(2)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(design @ weights)))
        gradient = design.T @ (p - y) / len(y) + l2 * np.array([weights[0], 0.0])
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(y) + l2 * np.diag([1.0, 0.0]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-8:
            break
    a = weights[0] / std
    return float(a), float(weights[1] - a * mean)


def match_probability(score: float, calibration: dict | None) -> float | None:
    """The fitted probability that a hit with this cosine ``score`` has the query's class (None: no curve)."""
    if not calibration:
        return None
    logit = float(calibration["a"]) * float(score) + float(calibration["b"])
    return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))


def calibrate_scores(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                     rows: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, labels: Sequence[str | None],
                     k: int = 10, sample: int = SAMPLE_QUERIES, seed: int = 0) -> dict | None:
    """Fit the score → match-probability curve of an index (see the module docstring).

    ``search(queries, k)`` is the index's own search (so the pairs are what users get, ANN included);
    ``rows(positions)`` reads the embeddings at sorted positions of the collection, whose ids are ``ids`` and
    labels ``labels`` (position-aligned). None when the collection has no labels, a single class, or too few
    pairs of either kind."""
    labelled = np.array([label is not None for label in labels])
    if not labelled.any() or len({label for label in labels if label is not None}) < 2:
        return None
    candidates = np.flatnonzero(labelled)
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(candidates, size=min(sample, len(candidates)), replace=False))
    label_of = dict(zip(np.asarray(ids).tolist(), labels))
    scores, found = search(np.ascontiguousarray(rows(positions), dtype=np.float32), k + 1)
    pair_scores, pair_same = [], []
    for own, row_scores, row_ids in zip(np.asarray(ids)[positions], scores, found):
        kept = [(s, i) for s, i in zip(row_scores.tolist(), row_ids.tolist()) if i >= 0 and i != own][:k]
        for score, hit in kept:
            hit_label = label_of.get(hit)
            if hit_label is not None:
                pair_scores.append(score)
                pair_same.append(hit_label == label_of[own])
    same = np.array(pair_same, bool)
    positives, negatives = int(same.sum()), int((~same).sum())
    if min(positives, negatives) < MIN_PAIRS_EACH:
        log.info("score calibration skipped: %d same-class and %d other-class pairs among the top-%d hits of %d "
                 "queries (need %d of each)", positives, negatives, k, len(positions), MIN_PAIRS_EACH)
        return None
    a, b = fit_logistic(np.array(pair_scores), same)
    predicted = 1.0 / (1.0 + np.exp(-(a * np.array(pair_scores) + b)))
    calibration = {"method": "logistic", "a": round(a, 6), "b": round(b, 6), "k": k, "queries": int(len(positions)),
                   "pairs": positives + negatives, "same_class_pairs": positives,
                   "brier": round(float(np.mean((predicted - same) ** 2)), 5),
                   "base_rate": round(positives / (positives + negatives), 5)}
    log.info("score calibration: P(same class) = sigmoid(%.3f * cosine %+.3f) from %d top-%d pairs (%.1f%% same "
             "class); Brier %.4f vs %.4f for the base rate", a, b, calibration["pairs"], k,
             100 * calibration["base_rate"], calibration["brier"],
             calibration["base_rate"] * (1 - calibration["base_rate"]))
    return calibration
