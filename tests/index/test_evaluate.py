"""Metrics through an index (cbir.index.evaluate): exact where the index is exact, the ANN gap otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY
from cbir.evaluation.metrics import evaluate_embeddings
from cbir.index.builder import IndexOptions
from cbir.index.evaluate import metrics_through_index

KEYS = ["precision_at_1", "recall_at_1", "recall_at_4", "r_precision", "map_at_r"]


def labelled_set(n=1200, classes=40, seed=0, dim=32):
    """Unit vectors around one centre per class (spread so that neighbours are sometimes of another class)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    labels = np.arange(n) % classes
    x = centres[labels] + 0.6 * rng.standard_normal((n, dim))
    return torch.from_numpy((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)), torch.from_numpy(labels)


@pytest.mark.parametrize("protocol", ["all-vs-all", "query-vs-gallery"])
def test_a_flat_index_gives_the_exact_metrics(protocol):
    vectors, labels = labelled_set()
    roles = torch.full((len(labels),), ROLE_QUERY | ROLE_GALLERY)
    if protocol == "query-vs-gallery":
        roles[:300] = ROLE_QUERY
        roles[300:] = ROLE_GALLERY
    exact = evaluate_embeddings(vectors, labels, roles, ks=(1, 4))
    through, info = metrics_through_index(vectors, labels, roles, IndexOptions(kind="flat"), ks=(1, 4))
    assert info["kind"] == "flat"
    assert through["num_queries"] == exact["num_queries"]
    for key in KEYS:
        assert through[key] == pytest.approx(exact[key], abs=1e-6), key


def test_an_ivf_index_is_tuned_and_scored_as_it_would_be_served():
    """The IVF row is the index cbir index build makes (nprobe tuned to the target recall); its first hits agree
    with exact search at a high target. (Whole-class metrics can move either way through an ANN index: it misses
    near negatives as well as positives.)"""
    vectors, labels = labelled_set(3000, classes=60, seed=1)
    roles = torch.full((len(labels),), ROLE_QUERY | ROLE_GALLERY)
    exact = evaluate_embeddings(vectors, labels, roles, ks=(1, 4))
    through, info = metrics_through_index(vectors, labels, roles, IndexOptions(kind="ivf", target_recall=0.99,
                                                                               query_sample=200), ks=(1, 4))
    assert info["kind"] == "ivf" and info["search_params"]["nprobe"] >= 1 and info["recall_at_10"] >= 0.99
    assert through["precision_at_1"] == pytest.approx(exact["precision_at_1"], abs=0.01)
    assert all(0.0 <= through[key] <= 1.0 for key in KEYS)


def test_results_past_the_search_depth_count_as_misses():
    vectors, labels = labelled_set(400, classes=2)  # R = 199: deeper than the depth asked for
    roles = torch.full((len(labels),), ROLE_QUERY | ROLE_GALLERY)
    full, _ = metrics_through_index(vectors, labels, roles, IndexOptions(kind="flat"), ks=(1,))
    short, _ = metrics_through_index(vectors, labels, roles, IndexOptions(kind="flat"), ks=(1,), depth=50)
    assert short["search_depth"] == 50 and short["max_relevant"] == 199
    assert short["precision_at_1"] == pytest.approx(full["precision_at_1"])
    assert short["r_precision"] <= 50 / 199 + 1e-6 and short["r_precision"] < full["r_precision"]
    assert np.isfinite(short["map_at_r"])
