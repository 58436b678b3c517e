"""Retrieval metrics against brute-force references, hand-checked cases and pytorch-metric-learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbir.evaluation.metrics import retrieval_metrics, stable_topk_indices, unique_by_id


def brute_force(q, ql, g, gl, exclude_same_position: bool, ks=(1, 2, 4, 8)):
    """Literal definitions, one query at a time, with a full stable sort (ties: lower gallery index first)."""
    sums = {"precision_at_1": 0.0, "r_precision": 0.0, "map_at_r": 0.0, **{f"recall_at_{k}": 0.0 for k in ks}}
    n = 0
    for i in range(len(q)):
        sims = (g @ q[i]).tolist()
        candidates = [j for j in range(len(g)) if not (exclude_same_position and j == i)]
        ranked = sorted(candidates, key=lambda j: (-sims[j], j))
        rel = [int(gl[j] == ql[i]) for j in ranked]
        r = sum(rel)
        if r == 0:
            continue
        n += 1
        sums["precision_at_1"] += rel[0]
        for k in ks:
            sums[f"recall_at_{k}"] += float(any(rel[:k]))
        sums["r_precision"] += sum(rel[:r]) / r
        ap, hits = 0.0, 0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        sums["map_at_r"] += ap / r
    return {k: v / n for k, v in sums.items()}, n


def assert_close(result, reference):
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key


def test_hand_checked_all_vs_all():
    # unit vectors at these angles (no ties); labels A A B B A
    angles = torch.tensor([0.0, 0.1, 0.5, 0.65, 1.5])
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1, 0])
    m = retrieval_metrics(emb, labels, ks=(1, 2))
    # nearest others: 0→1 (A, hit), 1→0 (hit), 2→3 (hit), 3→2 (hit), 4→3 (B, miss)
    assert m["precision_at_1"] == pytest.approx(4 / 5)
    # R for query 4 is 2 (items 0,1); its ranking: 3,2,1,0 -> first two are misses -> AP@R = 0
    # query 0: R=2 (1,4); ranking 1,2,3,4 -> AP = (1/1)/2 = 0.5 ; query 1: R=2 (0,4): ranking 0,2,3,4 -> 0.5
    # query 2: R=1 (3): ranking 3 -> 1 ; query 3: R=1 (2) -> 1
    assert m["map_at_r"] == pytest.approx((0.5 + 0.5 + 1 + 1 + 0) / 5)
    assert m["recall_at_2"] == pytest.approx(4 / 5)  # query 4's two nearest are 3 and 2
    assert m["num_queries"] == 5 and m["num_queries_excluded"] == 0


def test_ties_are_broken_by_gallery_position():
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # three exact ties at the top
    m_wrong_first = retrieval_metrics(query, torch.tensor([1]), gallery, torch.tensor([0, 1, 1, 1]))
    # stable order 0,1,2,...: position 0 is the wrong class -> P@1 = 0, R@2 = 1
    assert m_wrong_first["precision_at_1"] == 0.0
    assert m_wrong_first["recall_at_2"] == 1.0
    m_right_first = retrieval_metrics(query, torch.tensor([1]), gallery, torch.tensor([1, 0, 1, 0]))
    assert m_right_first["precision_at_1"] == 1.0
    # R = 2 (positions 0 and 2): ranks 1 and 3 -> AP@R = (1 + 0) / 2 over the top-2 = 0.5
    assert m_right_first["map_at_r"] == pytest.approx(0.5)


def test_singleton_classes_are_excluded():
    emb = F.normalize(torch.randn(7, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # classes 2 and 3 have one image: no relevant item
    m = retrieval_metrics(emb, labels)
    ref, n = brute_force(emb, labels, emb, labels, exclude_same_position=True)
    assert n == 5
    assert m["num_queries"] == 5 and m["num_queries_excluded"] == 2
    assert_close(m, ref)


def test_query_vs_gallery_protocol_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(30, 8, generator=gen), dim=1)
    g = F.normalize(torch.randn(80, 8, generator=gen), dim=1)
    ql = torch.randint(0, 5, (30,), generator=gen)
    gl = torch.randint(0, 5, (80,), generator=gen)
    ref, _ = brute_force(q, ql, g, gl, exclude_same_position=False)
    assert_close(retrieval_metrics(q, ql, g, gl), ref)


@pytest.mark.parametrize("budget_mb", [1e-4, 0.01, 256.0])
def test_chunking_does_not_change_results(budget_mb):
    gen = torch.Generator().manual_seed(5)
    emb = F.normalize(torch.randn(120, 6, generator=gen), dim=1)
    # quantise to create many exact ties across chunk boundaries
    emb = torch.round(emb * 2) / 2
    labels = torch.randint(0, 6, (120,), generator=gen)
    ref, _ = brute_force(emb, labels, emb, labels, exclude_same_position=True)
    assert_close(retrieval_metrics(emb, labels, memory_budget_mb=budget_mb), ref)


def test_ids_exclude_shared_items_in_query_vs_gallery():
    gen = torch.Generator().manual_seed(7)
    emb = F.normalize(torch.randn(40, 5, generator=gen), dim=1)
    labels = torch.randint(0, 4, (40,), generator=gen)
    ids = torch.arange(40)
    # the same items as queries and gallery, matched by id, equal the all-vs-all protocol
    via_ids = retrieval_metrics(emb, labels, emb, labels, query_ids=ids, gallery_ids=ids)
    assert_close(via_ids, {k: v for k, v in retrieval_metrics(emb, labels).items()})


def test_matches_pytorch_metric_learning_accuracy_calculator():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(11)
    centers = rng.normal(size=(12, 16))
    labels = rng.integers(0, 12, size=400)
    emb = torch.from_numpy(centers[labels] + rng.normal(scale=1.2, size=(400, 16))).float()
    emb = F.normalize(emb, dim=1)
    labels_t = torch.from_numpy(labels)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"))
    pml = calc.get_accuracy(emb, labels_t, emb, labels_t, ref_includes_query=True)
    ours = retrieval_metrics(emb, labels_t)
    assert ours["precision_at_1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)

    q, g = emb[:100], emb[100:]
    pml_qg = calc.get_accuracy(q, labels_t[:100], g, labels_t[100:], ref_includes_query=False)
    ours_qg = retrieval_metrics(q, labels_t[:100], g, labels_t[100:])
    assert ours_qg["precision_at_1"] == pytest.approx(pml_qg["precision_at_1"], abs=1e-6)
    assert ours_qg["map_at_r"] == pytest.approx(pml_qg["mean_average_precision_at_r"], abs=1e-6)


def test_large_gallery_is_processed_in_bounded_chunks(monkeypatch):
    # 60k x 60k float32 similarities would be 14 GB; every block the metric builds must fit the budget.
    from cbir.evaluation import metrics as metrics_module

    blocks = []
    real = metrics_module.stable_topk_indices

    def spy(scores, k):
        blocks.append(tuple(scores.shape))
        return real(scores, k)

    monkeypatch.setattr(metrics_module, "stable_topk_indices", spy)
    gen = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(60_000, 16, generator=gen), dim=1)
    labels = torch.randint(0, 10, (60_000,), generator=gen)
    budget_mb = 64
    m = retrieval_metrics(gallery[:2000], labels[:2000], gallery, labels, query_ids=torch.arange(2000),
                          gallery_ids=torch.arange(60_000), memory_budget_mb=budget_mb)
    assert m["num_queries"] == 2000
    assert len(blocks) > 1
    assert sum(rows for rows, _ in blocks) == 2000
    assert all(rows * cols * 4 <= budget_mb * 2**20 for rows, cols in blocks)


def test_stable_topk_equals_stable_sort():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 4, (50, 30), generator=gen).float()
    for k in (1, 5, 29, 30, 40):
        expected = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(stable_topk_indices(scores, k), expected)


def test_bad_inputs_raise():
    emb = torch.randn(4, 3)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((4, 3), float("nan")), torch.zeros(4))
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(emb, torch.zeros(4), torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(emb, torch.zeros(3))


def test_unique_by_id_keeps_first_and_sorts():
    ids = torch.tensor([3, 1, 3, 2, 1])
    values = torch.tensor([30, 10, 31, 20, 11])
    unique, kept = unique_by_id(ids, values)
    assert unique.tolist() == [1, 2, 3]
    assert kept.tolist() == [10, 20, 30]


def test_knn_classification_votes_by_similarity():
    """Three gallery items: two of class 1 at similarity 0.6 and 0.5, one of class 0 at 0.9. With k=1 the
    nearest decides (class 0); with k=3 the two class-1 votes (1.1) beat it (0.9)."""
    import math

    gallery = torch.tensor([[0.9, math.sqrt(1 - 0.81)], [0.6, -0.8], [0.5, math.sqrt(0.75)]])
    gallery_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    one = retrieval_metrics(query, torch.tensor([1]), gallery, gallery_labels, knn_k=1)
    three = retrieval_metrics(query, torch.tensor([1]), gallery, gallery_labels, knn_k=3)
    assert one["knn_accuracy"] == 0.0 and three["knn_accuracy"] == 1.0
    assert "knn_accuracy" not in retrieval_metrics(query, torch.tensor([1]), gallery, gallery_labels)


def test_knn_macro_f1_averages_over_classes():
    # queries equal to gallery items: the nearest item is the query's twin, so k=1 predicts its label
    gallery = torch.eye(4)
    labels = torch.tensor([0, 0, 1, 2])
    query = torch.eye(4)[[0, 1, 2, 3, 3]]
    truth = torch.tensor([0, 0, 1, 2, 1])  # the last query is "wrong": its twin has label 2
    scores = retrieval_metrics(query, truth, gallery, labels, knn_k=1)
    assert scores["knn_accuracy"] == pytest.approx(0.8)
    # class 0: F1 1; class 1: tp 1, fn 1 → 2/3; class 2: tp 1, fp 1 → 2/3
    assert scores["knn_macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
