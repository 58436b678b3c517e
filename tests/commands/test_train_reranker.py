"""``train.py stage=reranker`` → ``eval.py rerank.methods=[pairwise]`` → ``export.py reranker=...`` → a Searcher
that re-ranks: the pairwise re-ranker's road on tiny data."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.configs import compose_config, tiny_train_overrides

from cbir import Searcher, load_bundle
from cbir.commands.eval import evaluate
from cbir.commands.export import export
from cbir.commands.train import train
from cbir.errors import CbirError, ConfigError
from cbir.export.bundle import BundleError
from cbir.index.pipeline import build_bundle_index
from cbir.models.pairwise import load_reranker


@pytest.fixture(scope="module")
def embedder_run(tiny_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("embedder")
    train(compose_config("train", tiny_train_overrides(tiny_folder, run) + [
        "model=resnet18", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "test_after_fit=false"]))
    return run


def test_train_eval_export_and_search_with_a_pairwise_reranker(embedder_run, tiny_folder, tmp_path):
    out = tmp_path / "reranker"
    score = train(compose_config("train", tiny_train_overrides(tiny_folder, out) + [
        "stage=reranker", f"reranker.embedder={embedder_run}", "reranker.epochs=2", "reranker.candidates=5",
        "reranker.grid=2"]))
    assert 0.0 <= score <= 1.0  # validation MAP@R after re-ranking
    reranker, info = load_reranker(out / "reranker.pt")
    assert info["candidates"] == 5 and reranker.stages == ["layer3", "layer4"]
    assert reranker.local_weight == info["report"]["local_weight"] in (0.0, 0.1, 0.25, 0.5, 1.0)  # chosen on val
    results = json.loads((out / "results.json").read_text())
    tried = [row for row in results["results"] if row.startswith("pairwise re-ranker")]
    assert len(tried) == 5 and all("local term x" in row for row in tried)  # each weight of the grid
    assert [row for row in tried if row.endswith("(kept)")] == [
        row for row in tried if row.endswith(f"local term x{reranker.local_weight:g} (kept)")]

    common = ["data=folder", f"data.root={tiny_folder}", "data.image_size=32", "data.num_workers=0",
              "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", f"ckpt_path={embedder_run}"]
    evaluate(compose_config("eval", common + ["rerank.methods=[pairwise,dba+pairwise]", f"rerank.model={out}",
                                              "rerank.local_weight=0.5", f"paths.output_dir={tmp_path / 'eval'}"]))
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    plain = next(v for k, v in rows.items() if "pairwise" not in k)
    reranked = next(v for k, v in rows.items() if "+ pairwise (first 5, local term x0.5)" in k)
    assert reranked["num_queries"] == plain["num_queries"] == 12
    # the first 5 hits were re-ordered, nothing else: R@8 (>5) cannot change
    assert reranked["recall_at_8"] == pytest.approx(plain["recall_at_8"])
    assert any("dba+pairwise (n=5, α=3, first 5, local term x0.5)" in k for k in rows)

    with pytest.raises(ConfigError, match="rerank.model"):
        evaluate(compose_config("eval", common + ["rerank.methods=[pairwise]", f"paths.output_dir={tmp_path / 'e2'}"]))

    saved = torch.load(out / "reranker.pt", weights_only=False)  # the search below uses the local term too
    saved["config"]["local_weight"] = 0.5
    torch.save(saved, out / "reranker.pt")
    bundle_dir = tmp_path / "bundle"
    export(compose_config("export", [f"ckpt_path={embedder_run}", f"out={bundle_dir}", "runtimes=[]",
                                     f"reranker={out}", "precision_check_images=8"]))
    bundle = load_bundle(bundle_dir)
    assert bundle.has_reranker and load_reranker(bundle_dir / "reranker.pt")[0].local_weight == 0.5
    index = build_bundle_index(bundle, str(tiny_folder), bundle_dir / "index", kind="flat", num_workers=0,
                               progress=False)
    files = sorted(tiny_folder.rglob("*.png"))[:3]
    plain_hits = Searcher(bundle, index).search_paths(files, k=8)
    pairwise = Searcher(bundle, index, rerank="pairwise")
    reranked_hits = pairwise.search_paths(files, k=8)
    for file, before, after in zip(files, plain_hits, reranked_hits):
        assert sorted(h.id for h in before[:5]) == sorted(h.id for h in after[:5])  # same candidates, new order
        assert [h.id for h in before[5:]] == [h.id for h in after[5:]]
        assert all(h.path != str(file) for h in after)  # the query itself stays out
        assert all(a.score >= b.score for a, b in zip(after[:5], after[1:5]))
    with pytest.raises(CbirError, match="search images"):
        pairwise.search_embeddings(pairwise.embed_images([torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()]), k=3)


def test_a_reranker_of_another_model_is_refused(embedder_run, tiny_folder, tmp_path):
    from cbir.models.embedder import build_embedder
    from cbir.models.pairwise import PairwiseReranker, save_reranker

    stranger = build_embedder("resnet18", pretrained=None, image_size=32).eval()
    path = save_reranker(PairwiseReranker({"layer4": 512}, grid=2), tmp_path / "r.pt", embedder=stranger,
                         candidates=5)
    with pytest.raises(BundleError, match="another model"):
        export(compose_config("export", [f"ckpt_path={embedder_run}", f"out={tmp_path / 'b'}", "runtimes=[]",
                                         f"reranker={path}", "precision_check_images=8"]))
    assert not (tmp_path / "b").exists()


def test_search_without_a_reranker_in_the_bundle_says_how_to_add_one(embedder_run, tiny_folder, tmp_path):
    bundle_dir = tmp_path / "bundle"
    export(compose_config("export", [f"ckpt_path={embedder_run}", f"out={bundle_dir}", "runtimes=[]",
                                     "precision_check_images=8"]))
    bundle = load_bundle(bundle_dir)
    index = build_bundle_index(bundle, str(tiny_folder), bundle_dir / "index", kind="flat", num_workers=0,
                               progress=False)
    with pytest.raises(CbirError, match="stage=reranker"):
        Searcher(bundle, index, rerank="pairwise")


def test_stage_errors_say_what_to_give(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="stage=foo"):
        train(compose_config("train", tiny_train_overrides(tiny_folder, tmp_path / "a") + ["stage=foo"]))
    with pytest.raises(ConfigError, match="reranker.embedder="):
        train(compose_config("train", tiny_train_overrides(tiny_folder, tmp_path / "b") + ["stage=reranker"]))
