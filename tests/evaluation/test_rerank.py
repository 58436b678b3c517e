"""Query expansion (αQE) and database-side augmentation (DBA) on embeddings (issue 17), and eval.py's rows."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import compose_config

from cbir.commands.eval import evaluate
from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY
from cbir.evaluation.metrics import evaluate_embeddings, perfect_reorder, retrieval_metrics
from cbir.evaluation.rerank import expand, kreciprocal_scores, rerank_embeddings, top_neighbours


def noisy_clusters(classes: int = 20, per_class: int = 15, dim: int = 32, noise: float = 0.9, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    points = centres[labels] + noise * torch.randn(len(labels), dim, generator=generator) / dim ** 0.5
    return F.normalize(points, dim=1), labels


def test_neighbours_are_exact_and_never_the_item_itself():
    vectors, _ = noisy_clusters(classes=5, per_class=8)
    ids = torch.arange(len(vectors))
    scores, positions = top_neighbours(vectors, vectors, 4, ids, ids, chunk=7)
    sims = vectors @ vectors.T
    sims.fill_diagonal_(float("-inf"))
    expected = torch.topk(sims, 4, dim=1)
    assert torch.equal(positions, expected.indices) and torch.allclose(scores, expected.values)
    assert not (positions == ids[:, None]).any()


def test_the_expansion_formula_on_a_hand_example():
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    out = expand(query, gallery, n=2, alpha=2.0)
    # neighbours: g0 (sim 0.6) and g1 (sim 0.0): q + 0.36 * g0 + 0 * g1
    manual = F.normalize(torch.tensor([[1.0 + 0.36 * 0.6, 0.36 * 0.8]]), dim=1)
    assert torch.allclose(out, manual, atol=1e-6)
    assert torch.allclose(expand(query, gallery, n=0, alpha=2.0), query)


def test_expansion_helps_on_noisy_clusters_and_none_changes_nothing():
    vectors, labels = noisy_clusters()
    plain = retrieval_metrics(vectors, labels)
    roles = torch.full((len(labels),), ROLE_QUERY | ROLE_GALLERY)
    assert evaluate_embeddings(vectors, labels, roles, rerank="none") == plain
    for method in ("aqe", "dba", "dba+aqe"):
        reranked = evaluate_embeddings(vectors, labels, roles, rerank=method, rerank_n=5, rerank_alpha=3.0)
        assert reranked["map_at_r"] > plain["map_at_r"] + 0.02, method  # the neighbours of a noisy point denoise it
    with pytest.raises(ValueError, match="choose from"):
        rerank_embeddings("kreciprocal", vectors, vectors, torch.arange(5), torch.arange(5))  # not an embedding method


def test_kreciprocal_lifts_the_candidate_whose_neighbourhood_is_the_querys():
    """A planted case: candidate 0 is a lone look-alike (cosine 0.80, neighbours unrelated to the query's);
    candidate 1 scores lower (0.75) but shares 3 of the query's 4 neighbours. Re-scored, 1 comes first."""
    scores = torch.tensor([[0.80, 0.75]])
    query_neighbours = torch.tensor([[10, 11, 12, 13]])
    candidate_neighbours = torch.tensor([[[20, 21, 22, 23], [10, 11, 12, 30]]])
    rescored = kreciprocal_scores(scores, query_neighbours, candidate_neighbours, lam=0.3)
    assert rescored[0, 1] > rescored[0, 0]
    assert rescored[0, 0] == pytest.approx(0.7 * 0.80)  # Jaccard 0
    assert rescored[0, 1] == pytest.approx(0.7 * 0.75 + 0.3 * 3 / 5)  # 3 shared of 5 distinct
    assert torch.allclose(kreciprocal_scores(scores, query_neighbours, candidate_neighbours, lam=0.0), scores)


def test_kreciprocal_helps_on_noisy_clusters_and_keeps_the_metric_bounds():
    vectors, labels = noisy_clusters()
    roles = torch.full((len(labels),), ROLE_QUERY | ROLE_GALLERY)
    plain = retrieval_metrics(vectors, labels)
    reranked = evaluate_embeddings(vectors, labels, roles, rerank="kreciprocal", rerank_n=5)
    assert reranked["num_queries"] == plain["num_queries"]
    assert reranked["map_at_r"] > plain["map_at_r"] + 0.02
    assert all(0.0 <= reranked[key] <= 1.0 for key in ("precision_at_1", "map_at_r", "r_precision", "recall_at_4"))


def test_query_vs_gallery_sets_keep_their_roles():
    vectors, labels = noisy_clusters(classes=6, per_class=10)
    roles = torch.where(torch.arange(len(labels)) % 5 == 0, ROLE_QUERY, ROLE_GALLERY)
    metrics = evaluate_embeddings(vectors, labels, roles, rerank="aqe")
    assert metrics["num_queries"] == int((roles == ROLE_QUERY).sum())


def test_the_ceiling_puts_every_right_hit_of_the_first_n_first_and_nothing_deeper():
    # one query (class 0) and a gallery ranked by cosine: wrong, right, wrong, wrong, right (5th), right (6th)
    query = torch.tensor([[1.0, 0.0]])
    angles = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    gallery = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    gallery_labels = torch.tensor([1, 0, 2, 3, 0, 0])
    labels = torch.tensor([0])
    plain = retrieval_metrics(query, labels, gallery, gallery_labels, ks=(1, 2))
    ceiling = retrieval_metrics(query, labels, gallery, gallery_labels, ks=(1, 2),
                                reorder=perfect_reorder(labels, gallery_labels, 5), min_depth=5)
    assert plain["precision_at_1"] == 0.0 and ceiling["precision_at_1"] == 1.0
    # first 5 re-ordered: right, right, wrong, wrong, wrong, then the 6th (right) stays where it was
    assert ceiling["map_at_r"] == pytest.approx((1 + 1) / 3)
    assert plain["map_at_r"] == pytest.approx((1 / 2) / 3)
    everything = retrieval_metrics(query, labels, gallery, gallery_labels, ks=(1, 2),
                                   reorder=perfect_reorder(labels, gallery_labels, 6), min_depth=6)
    assert everything["map_at_r"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=">= 1"):
        perfect_reorder(labels, gallery_labels, 0)


def test_the_ceiling_never_counts_the_query_itself_all_vs_all():
    vectors, labels = noisy_clusters(classes=4, per_class=3, noise=2.0)
    roles = torch.full((len(labels),), ROLE_QUERY | ROLE_GALLERY)
    plain = evaluate_embeddings(vectors, labels, roles)
    deep = evaluate_embeddings(vectors, labels, roles, rerank="ceiling", rerank_n=len(labels))
    shallow = evaluate_embeddings(vectors, labels, roles, rerank="ceiling", rerank_n=3)
    assert deep["map_at_r"] == pytest.approx(1.0) and deep["num_queries"] == plain["num_queries"]
    assert plain["map_at_r"] <= shallow["map_at_r"] <= deep["map_at_r"]


def test_eval_prints_a_row_per_method_from_one_pass(tiny_folder, tmp_path):
    overrides = ["data=folder", f"data.root={tiny_folder}", "data.image_size=32", "data.eval_batch_size=16",
                 "data.num_workers=0", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                 "model=handcrafted", "model.image_size=32", f"paths.output_dir={tmp_path}",
                 "rerank.methods=[aqe,dba+aqe,kreciprocal,ceiling]", "rerank.n=2", "rerank.candidates=3"]
    metrics = evaluate(compose_config("eval", overrides))
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert len(rows) == 5 and metrics == next(iter(rows.values()))
    assert [name.split(" + ")[-1] for name in list(rows)[1:]] == ["aqe (n=2, α=3)", "dba+aqe (n=2, α=3)",
                                                                   "kreciprocal (k=2, λ=0.3)",
                                                                   "ceiling (first 3 perfectly re-ordered)"]
    ceiling = list(rows.values())[-1]
    assert ceiling["map_at_r"] >= metrics["map_at_r"] and ceiling["precision_at_1"] >= metrics["precision_at_1"]
    assert ceiling["recall_at_4"] == pytest.approx(metrics["recall_at_4"])  # only the first 3 moved
    with pytest.raises(Exception, match="kmeans"):
        evaluate(compose_config("eval", [*overrides[:-3], "rerank.methods=[kmeans]"]))
    with pytest.raises(Exception, match="rerank.candidates=0"):
        evaluate(compose_config("eval", [*overrides[:-3], "rerank.methods=[ceiling]", "rerank.candidates=0"]))
