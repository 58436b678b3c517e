"""The learned pairwise re-ranker: its starting point, what it learns on a case whose answer is known, its file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY
from cbir.errors import CheckpointError, ConfigError
from cbir.evaluation.pairwise import pairwise_evaluate
from cbir.models.embedder import build_embedder
from cbir.models.pairwise import (
    PairwiseReranker,
    check_embedder,
    default_stages,
    load_reranker,
    rerank_order,
    save_reranker,
)
from cbir.training.reranker import (
    CachedFeatures,
    RerankerOptions,
    choose_local_weight,
    fit_reranker,
    listwise_loss,
    validation_metrics,
)

CHANNELS, GRID = 8, 2


def planted_set(num_classes: int, per_class: int, seed: int) -> CachedFeatures:
    """Each class has its own local signature (4 cells x 8 channels) that all its images share, up to noise,
    while the global embedding carries the class only weakly: the embedding confuses classes the cells tell
    apart, for any classes, seen in training or not."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    signatures = torch.randn(num_classes, GRID * GRID, CHANNELS, generator=g)
    cells = signatures[labels] + 0.3 * torch.randn(len(labels), GRID * GRID, CHANNELS, generator=g)
    centres = torch.randn(num_classes, 16, generator=g)
    embeddings = F.normalize(0.6 * centres[labels] + torch.randn(len(labels), 16, generator=g), dim=1)
    ids = torch.arange(len(labels)) + 1000 * seed
    roles = torch.full_like(labels, ROLE_QUERY | ROLE_GALLERY)
    return CachedFeatures(embeddings, [cells.half()], labels, ids, roles)


def test_an_untrained_reranker_keeps_the_embeddings_order():
    reranker = PairwiseReranker({"stage5": CHANNELS}, grid=GRID).eval()
    cosine = torch.rand(3, 7)
    tokens = torch.randn(3, reranker.num_tokens, 64)
    order = rerank_order(reranker, F.normalize(tokens, dim=-1), F.normalize(torch.randn(3, 7, 4, 64), dim=-1), cosine)
    assert torch.equal(order, torch.argsort(cosine, dim=1, descending=True))


def test_listwise_loss_prefers_positives_on_top_and_skips_uninformative_queries():
    positive = torch.tensor([[True, False, False], [False, False, False]])
    good = listwise_loss(torch.tensor([[5.0, 0.0, 0.0], [1.0, 2.0, 3.0]]), positive)
    bad = listwise_loss(torch.tensor([[0.0, 5.0, 0.0], [1.0, 2.0, 3.0]]), positive)
    assert 0 <= float(good) < 0.05 < 4.0 < float(bad)  # the second row (no positive) adds nothing to either


def test_training_learns_the_local_evidence_and_it_carries_to_unseen_classes():
    train, val = planted_set(40, 4, seed=1), planted_set(12, 4, seed=2)  # validation: classes never trained on
    reranker = PairwiseReranker({"stage5": CHANNELS}, dim=32, grid=GRID)
    before = validation_metrics(None, val, candidates=12)
    trained, report = fit_reranker(reranker, train, train, val, RerankerOptions(candidates=12, epochs=25, lr=1e-2,
                                                                                 batch_queries=32))
    after = validation_metrics(trained, val, candidates=12)
    assert before["map_at_r"] < 0.6  # the embedding alone is confused
    assert after["map_at_r"] > before["map_at_r"] + 0.2
    assert report["val_after"]["map_at_r"] == pytest.approx(after["map_at_r"])  # the kept epoch is what it reports
    assert report["val_before"]["map_at_r"] == pytest.approx(before["map_at_r"])
    assert 1 <= report["kept_epoch"] <= 25 and len(report["epochs"]) == 25


def test_pairwise_evaluate_only_reorders_the_first_candidates():
    val = planted_set(6, 3, seed=3)
    reranker = PairwiseReranker({"stage5": CHANNELS}, grid=GRID).eval()
    with torch.no_grad():
        reranker.cosine_scale.fill_(-10.0)  # a re-ranker that turns its candidates upside down
        tokens = reranker.encode(val.pooled)
    plain = validation_metrics(None, val, candidates=1)
    same = pairwise_evaluate(val.embeddings, val.labels, val.roles, tokens, reranker, candidates=1)
    flipped = pairwise_evaluate(val.embeddings, val.labels, val.roles, tokens, reranker, candidates=17)
    assert same["map_at_r"] == pytest.approx(plain["map_at_r"])  # one candidate: nothing to re-order
    assert flipped["precision_at_1"] < plain["precision_at_1"]  # the worst of 17 comes first now


def test_the_file_round_trips_and_knows_its_model(tmp_path):
    embedder = build_embedder("resnet18", pretrained=None, image_size=32).eval()  # (train mode would move BN stats)
    stages = default_stages(embedder.backbone.channels)
    assert stages == ["layer3", "layer4"]
    reranker = PairwiseReranker({s: embedder.backbone.channels[s] for s in stages}, grid=2).eval()
    with torch.no_grad():
        reranker.judge[-1].weight.normal_()
    path = save_reranker(reranker, tmp_path / "r" / "reranker.pt", embedder=embedder, candidates=7)
    loaded, info = load_reranker(tmp_path / "r")  # the run folder works too
    assert info["candidates"] == 7
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = reranker.tokens(embedder.backbone(images))
        assert torch.equal(loaded.tokens(embedder.backbone(images)), tokens)
        cosine = torch.rand(1, 2)
        assert torch.equal(loaded.score(tokens[:1], tokens[None], cosine), reranker.score(tokens[:1], tokens[None],
                                                                                         cosine))
    check_embedder(info, embedder)
    other = build_embedder("resnet18", pretrained=None, image_size=32)
    with pytest.raises(ConfigError, match="another model"):
        check_embedder(info, other)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_reranker(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_reranker(tmp_path / "missing.pt")


def test_a_vit_trunks_pooled_cls_entry_is_not_a_feature_map():
    assert default_stages({"block6": 384, "block9": 384, "block12": 384, "cls": 384}) == ["block9", "block12"]


def test_roles_split_queries_from_gallery():
    val = planted_set(4, 3, seed=4)
    val.roles[:4] = ROLE_QUERY
    val.roles[4:] = ROLE_GALLERY
    metrics = validation_metrics(None, val, candidates=5)
    assert metrics["num_queries"] + metrics["num_queries_excluded"] == 4


def test_dba_then_an_untrained_reranker_is_dba_alone():
    from cbir.evaluation.metrics import evaluate_embeddings

    val = planted_set(6, 3, seed=5)
    reranker = PairwiseReranker({"stage5": CHANNELS}, grid=GRID).eval()
    with torch.no_grad():
        tokens = reranker.encode(val.pooled)
    both = pairwise_evaluate(val.embeddings, val.labels, val.roles, tokens, reranker, candidates=10, dba=(2, 3.0))
    dba = evaluate_embeddings(val.embeddings, val.labels, val.roles, rerank="dba", rerank_n=2, rerank_alpha=3.0)
    assert both["map_at_r"] == pytest.approx(dba["map_at_r"]) and both["precision_at_1"] == pytest.approx(
        dba["precision_at_1"])
    plain = validation_metrics(None, val, candidates=10)
    assert both["map_at_r"] != pytest.approx(plain["map_at_r"])  # the gallery did change


def test_the_local_term_is_the_raw_cells_best_match_similarity_across_stages_of_different_widths():
    reranker = PairwiseReranker({"narrow": 3, "wide": 5}, dim=4, grid=1, local_weight=0.5).eval()
    assert reranker.local_width == 5
    g = torch.Generator().manual_seed(0)
    pooled_query = [torch.randn(1, 1, 3, generator=g), torch.randn(1, 1, 5, generator=g)]
    pooled_candidate = [torch.randn(2, 1, 3, generator=g), torch.randn(2, 1, 5, generator=g)]
    with torch.no_grad():
        query, candidates = reranker.encode(pooled_query), reranker.encode(pooled_candidate)
        assert query.shape == (1, 2, 4 + 5)
        cosine = torch.tensor([[0.3, 0.2]])
        with_local = reranker.score(query, candidates[None], cosine)
        reranker.local_weight = 0.0
        without = reranker.score(query, candidates[None], cosine)
    # one cell per stage: its best match is the other image's cell there, so the term is the mean cell cosine
    expected = torch.stack([(F.cosine_similarity(pooled_query[0][0, 0], pooled_candidate[0][i, 0], dim=0)
                             + F.cosine_similarity(pooled_query[1][0, 0], pooled_candidate[1][i, 0], dim=0)) / 2
                            for i in range(2)])
    assert torch.allclose(with_local[0] - without[0], reranker.cosine_scale.abs() * 0.5 * expected, atol=1e-5)


def test_the_local_term_needs_tokens_that_carry_the_raw_cells():
    reranker = PairwiseReranker({"stage5": CHANNELS}, grid=GRID, local_weight=1.0).eval()
    cells = [torch.randn(2, GRID * GRID, CHANNELS)]
    plain = reranker.encode(cells, local=False)
    with pytest.raises(ConfigError, match="raw cells"):
        reranker.score(plain[:1], plain[None], torch.rand(1, 2))
    with pytest.raises(ConfigError, match="local_weight"):
        reranker.local_weight = -0.5


def test_the_local_weight_is_chosen_on_validation_and_stays_off_when_the_cells_say_nothing():
    informative = planted_set(12, 4, seed=6)  # the cells tell the classes apart, the embedding does not
    reranker = PairwiseReranker({"stage5": CHANNELS}, dim=32, grid=GRID).eval()
    weight, scores = choose_local_weight(reranker, informative, candidates=12, weights=[1.0, 0.0, 0.25])
    assert list(scores) == [0.0, 0.25, 1.0]
    assert weight > 0 and reranker.local_weight == weight
    assert scores[weight]["map_at_r"] > scores[0.0]["map_at_r"] + 0.1
    noise = planted_set(12, 4, seed=7)
    noise.pooled = [torch.randn_like(noise.pooled[0].float()).half()]  # cells unrelated to the class
    noise.embeddings = F.normalize(F.one_hot(noise.labels).float() + 0.01 * torch.randn(len(noise.labels), 12), dim=1)
    weight, scores = choose_local_weight(reranker, noise, candidates=12, weights=[0.0, 0.25, 1.0])
    assert weight == 0.0 and reranker.local_weight == 0.0  # a perfect embedding: the term can only tie or hurt
    assert scores[0.0]["map_at_r"] == pytest.approx(1.0)


def test_fit_reports_the_local_weights_tried_and_the_file_keeps_the_chosen_one(tmp_path):
    train, val = planted_set(20, 4, seed=8), planted_set(10, 4, seed=9)
    reranker = PairwiseReranker({"stage5": CHANNELS}, dim=16, grid=GRID)
    trained, report = fit_reranker(reranker, train, train, val, RerankerOptions(
        candidates=10, epochs=2, lr=1e-2, batch_queries=32, local_weights=(0.0, 0.5, 2.0)))
    assert set(report["local_weights"]) == {"0", "0.5", "2"}
    assert trained.local_weight == report["local_weight"]
    assert report["val_after"] == report["local_weights"][f"{report['local_weight']:g}"]
    assert report["val_after"]["map_at_r"] == max(s["map_at_r"] for s in report["local_weights"].values())
    embedder = build_embedder("resnet18", pretrained=None, image_size=32).eval()
    trained.local_weight = 0.5
    save_reranker(trained, tmp_path / "r.pt", embedder=embedder, candidates=10)
    loaded, _ = load_reranker(tmp_path / "r.pt")
    assert loaded.local_weight == 0.5
    with torch.no_grad():
        tokens = loaded.encode(val.pooled)
        assert tokens.shape[-1] == 16 + CHANNELS  # carries the raw cells, as its weight needs
        cosine = torch.rand(1, 5)
        assert torch.equal(loaded.score(tokens[:1], tokens[None, :5], cosine),
                           trained.eval().score(tokens[:1], tokens[None, :5], cosine))
