"""Retrieval-examples images and the embedding map (cbir.training.visuals), and the run-folder layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.configs import compose_config, tiny_train_overrides
from PIL import Image, ImageColor

from cbir.commands.train import train
from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY
from cbir.models.checkpoint import load_embedder_checkpoint
from cbir.training import factory, visuals
from cbir.training.visuals import EvalSet, choose_queries, project_2d, top_k
from cbir.visual.grid import GRID_CAPTION, GRID_CORRECT, GRID_PAD, GRID_QUERY, GRID_WRONG

NUM_QUERIES, K, THUMB = 3, 5, 32  # tiny_folder's val set: 3 classes x 4 images, so each row has >= 2 wrong hits


def _run(data: Path, out: Path, extra: list[str]):
    cfg = compose_config("train", tiny_train_overrides(data, out) + [
        "model=resnet18", "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1",
        f"callbacks.retrieval_examples.num_queries={NUM_QUERIES}", f"callbacks.retrieval_examples.k={K}",
        f"callbacks.retrieval_examples.thumb_size={THUMB}", "callbacks.embedding_map.method=pca", *extra])
    train(cfg)
    return cfg


def _eval_set(embeddings, labels, roles) -> EvalSet:
    n = len(labels)
    return EvalSet(np.arange(n) * 10, torch.as_tensor(embeddings, dtype=torch.float32),
                   np.asarray(labels), np.asarray(roles))


# -- unit: choosing queries and hits ---------------------------------------------------------------

def test_top_k_all_vs_all_never_finds_the_query_itself():
    rng = np.random.default_rng(0)
    x = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(9, 4)), dtype=torch.float32), dim=1)
    both = ROLE_QUERY | ROLE_GALLERY
    eval_set = _eval_set(x, [0, 0, 0, 1, 1, 1, 2, 2, 2], [both] * 9)
    queries = eval_set.indices[[0, 4]]
    hits, scores = top_k(eval_set, queries, k=8)
    assert hits.shape == (2, 8)  # 9 items, the query itself left out
    for query, row, row_scores in zip(queries, hits, scores):
        assert query not in row and len(set(row.tolist())) == 8
        q = int(query) // 10
        expected = sorted((float(x[q] @ x[j]), j * 10) for j in range(9) if j != q)[::-1]
        assert row.tolist() == [j for _, j in expected]
        np.testing.assert_allclose(row_scores, [s for s, _ in expected], atol=1e-6)


def test_top_k_query_vs_gallery_respects_roles():
    # rows 0-1 queries only, 2-3 gallery only, 4 both (an item in both sets must not find itself)
    x = torch.eye(5)[[0, 1, 0, 1, 0]] + torch.tensor([[0, 0, 0.1, 0, 0]] * 5) * torch.arange(5)[:, None]
    x = torch.nn.functional.normalize(x, dim=1)
    roles = [ROLE_QUERY, ROLE_QUERY, ROLE_GALLERY, ROLE_GALLERY, ROLE_QUERY | ROLE_GALLERY]
    eval_set = _eval_set(x, [0, 1, 0, 1, 0], roles)
    hits, _ = top_k(eval_set, eval_set.indices[[0, 4]], k=5)
    gallery = set(eval_set.indices[[2, 3, 4]].tolist())
    assert hits.shape == (2, 3)  # k larger than the gallery: all of it, never a query-only item
    assert set(hits[0].tolist()) == gallery and hits[0][0] == 20  # the closest same-class gallery item
    assert 40 not in hits[1].tolist() and (hits[1] == -1).sum() == 1  # itself excluded: 2 hits left
    assert hits[1][0] == 20  # the same-class gallery item


def test_choose_queries_spreads_over_classes_and_skips_unanswerable():
    both = ROLE_QUERY | ROLE_GALLERY
    labels = [0, 0, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # class 1 has a single image: nothing to find
    eval_set = _eval_set(torch.eye(11), labels, [both] * 11)
    chosen = choose_queries(eval_set, 3)
    assert chosen.tolist() == choose_queries(eval_set, 3).tolist()  # deterministic
    chosen_labels = [labels[int(i) // 10] for i in chosen]
    assert 1 not in chosen_labels and len(set(chosen_labels)) == 3
    assert chosen_labels[0] == 0 and chosen_labels[-1] == 5  # spread from the first class to the last
    many = choose_queries(eval_set, 8)  # more queries than classes: second items of the classes
    assert len(many) == 8 and len(set(many.tolist())) == 8


def test_eval_set_ignores_pair_outputs_and_dedups_ddp_padding():
    assert EvalSet.from_outputs({"similarity": torch.ones(3), "same": torch.ones(3), "index": torch.arange(3)}) is None
    outputs = {"index": torch.tensor([2, 0, 1, 2]), "embedding": torch.eye(4)[[2, 0, 1, 2]],
               "label": torch.tensor([5, 3, 4, 5]), "role": torch.tensor([3, 3, 3, 3])}
    eval_set = EvalSet.from_outputs(outputs)
    assert eval_set.indices.tolist() == [0, 1, 2] and eval_set.labels.tolist() == [3, 4, 5]


def test_drawing_only_on_rank_zero_outside_sanity_and_fast_dev_run():
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, fast_dev_run=False)
    assert visuals._Visual.should_draw(trainer)
    for change in ({"is_global_zero": False}, {"sanity_checking": True}, {"fast_dev_run": 1}):
        assert not visuals._Visual.should_draw(SimpleNamespace(**{**vars(trainer), **change}))


# -- unit: the map's projection ----------------------------------------------------------------------

def test_map_falls_back_without_umap(monkeypatch):
    x = np.random.default_rng(0).normal(size=(40, 8))
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` now raises ImportError
    coords, method = project_2d(x, "auto")
    assert method == "tsne" and coords.shape == (40, 2) and np.isfinite(coords).all()
    with pytest.warns(UserWarning, match="umap failed"):
        assert project_2d(x, "umap")[1] == "pca"
    monkeypatch.setattr(visuals, "TSNE_MAX_POINTS", 10)  # a large set: PCA rather than a slow t-SNE
    coords, method = project_2d(x, "auto")
    assert method == "pca"
    centred = x - x.mean(axis=0)
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    assert abs(np.corrcoef(coords[:, 0], centred @ top)[0, 1]) > 0.999  # PCA's first axis
    with pytest.raises(ValueError, match="method"):
        project_2d(x, "mds")


def test_same_class_neighbour_rate():
    coords = np.array([[0, 0], [0, 1], [10, 0], [10, 1], [5, 50]], dtype=float)
    assert visuals.same_class_neighbour_rate(coords, np.array([0, 0, 1, 1, 2])) == pytest.approx(4 / 5)
    assert visuals.same_class_neighbour_rate(coords, np.array([0, 1, 0, 1, 2]), chunk=2) == 0.0


@pytest.mark.slow
def test_map_uses_umap_when_installed():
    pytest.importorskip("umap")
    x = np.random.default_rng(0).normal(size=(60, 8))
    coords, method = project_2d(x, "auto")
    assert method == "umap" and coords.shape == (60, 2) and np.isfinite(coords).all()


def test_map_keeps_torchs_thread_count():
    """UMAP's numba start-up would raise torch's thread count in this process (later runs then differ)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        project_2d(np.random.default_rng(0).normal(size=(60, 8)), "auto")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- a real training run ------------------------------------------------------------------------------

def _independent_top_k(cfg, checkpoint: Path, queries: list[int], k: int):
    """Embed the validation set again from the checkpoint, outside the callback, and rank by hand."""
    embedder = load_embedder_checkpoint(checkpoint).eval()
    catalog = factory.build_catalog(cfg.data)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    with torch.inference_mode():
        batches = [(embedder(b["image"]), b["index"]) for b in datamodule.val_dataloader()]
    embeddings = torch.cat([e for e, _ in batches]).numpy()
    indices = torch.cat([i for _, i in batches]).numpy()
    row = {int(i): n for n, i in enumerate(indices)}
    result = []
    for query in queries:
        scores = embeddings @ embeddings[row[query]]
        scores[row[query]] = -np.inf
        order = np.argsort(-scores)[:k]
        result.append((indices[order].tolist(), scores[order]))
    return catalog, result


def _tile_colour(image: Image.Image, row: int, column: int) -> tuple[int, int, int]:
    row_height = 2 * GRID_PAD + THUMB + GRID_CAPTION
    x, y = GRID_PAD + (THUMB + GRID_PAD) * column, row * row_height + GRID_PAD
    return image.getpixel((x + 1, y + 1))


def test_csv_run_writes_images_and_the_run_folder_layout(tiny_folder, tmp_path):
    out = tmp_path / "run"
    cfg = _run(tiny_folder, out, ["logger=csv", "trainer.max_epochs=2"])

    # the run folder users can rely on
    assert (out / "config.yaml").is_file() and (out / "results.json").is_file()
    assert (out / "csv" / "metrics.csv").is_file()
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 2 and checkpoints[1] == "last.ckpt", \
        f"checkpoints/ holds {checkpoints}: expected best-epochNNN.ckpt and last.ckpt only"
    assert sorted(p.name for p in (out / "checkpoints").glob("*.sha256")) == [f"{c}.sha256" for c in checkpoints]
    assert checkpoints[0] in ("best-epoch000.ckpt", "best-epoch001.ckpt")
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()
    images = sorted(p.name for p in (out / "images").glob("*.png"))
    assert images == ["embedding_map.png", "retrieval_epoch000.png", "retrieval_epoch001.png"]

    # geometry: one row per query, the query then k hits
    first, second = (json.loads((out / "images" / f"retrieval_epoch00{e}.json").read_text()) for e in (0, 1))
    queries = [r["query"] for r in second["rows"]]
    assert [r["query"] for r in first["rows"]] == queries  # the same queries every epoch
    assert len(queries) == NUM_QUERIES and len({r["label"] for r in second["rows"]}) == NUM_QUERIES
    # last.ckpt holds the last epoch's weights (callbacks.last_checkpoint): compare with that epoch's picture
    epoch = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    record = (first, second)[epoch]
    picture = Image.open(out / "images" / f"retrieval_epoch{epoch:03d}.png").convert("RGB")
    assert picture.size == (GRID_PAD + (THUMB + GRID_PAD) * (K + 1), NUM_QUERIES * (2 * GRID_PAD + THUMB + GRID_CAPTION))

    # the hits and their borders, against embeddings computed here from that checkpoint
    catalog, expected = _independent_top_k(cfg, out / "checkpoints" / "last.ckpt", queries, K)
    colours = {ImageColor.getrgb(GRID_CORRECT): True, ImageColor.getrgb(GRID_WRONG): False}
    seen = set()
    for r, (row, (hits, scores)) in enumerate(zip(record["rows"], expected)):
        assert row["query"] not in hits
        assert row["hits"] == hits
        np.testing.assert_allclose(row["scores"], scores, atol=1e-3)
        assert _tile_colour(picture, r, 0) == ImageColor.getrgb(GRID_QUERY)
        for c, hit in enumerate(hits, start=1):
            correct = catalog.records[hit].label == catalog.records[row["query"]].label
            assert colours[_tile_colour(picture, r, c)] == correct, f"row {r} hit {c}"
            seen.add(correct)
    assert seen == {True, False}  # both kinds of border were checked

    # the map: every validation image, coloured by class
    mapping = json.loads((out / "images" / "embedding_map.json").read_text())
    assert mapping["method"] == "pca" and mapping["num_points"] == 12 and mapping["epoch"] == 1
    xy = np.array([[p["x"], p["y"]] for p in mapping["points"]])
    assert mapping["same_class_neighbour_rate"] == pytest.approx(
        visuals.same_class_neighbour_rate(xy, np.array([p["label"] for p in mapping["points"]])))
    canvas = Image.open(out / "images" / "embedding_map.png").convert("RGB")
    classes = sorted({p["label"] for p in mapping["points"]})
    on_own_colour = sum(canvas.getpixel((p["px"], p["py"])) == visuals.class_colour(classes.index(p["label"]))
                        for p in mapping["points"])
    assert on_own_colour >= 10  # (a later dot may cover an earlier one)


def test_query_vs_gallery_protocol_draws_gallery_hits_only(tiny_folder, tmp_path):
    """Queries from the held-out classes against a gallery of the training classes: every hit comes from
    the gallery and none can be right, so every hit border is red."""
    out = tmp_path / "run"
    cfg = _run(tiny_folder, out, ["logger=csv", "trainer.max_epochs=1", "test_after_fit=false",
                                  "+data.val.gallery=train"])
    catalog = factory.build_catalog(cfg.data)
    record = json.loads((out / "images" / "retrieval_epoch000.json").read_text())
    assert record["protocol"] == "query-vs-gallery"
    picture = Image.open(out / "images" / "retrieval_epoch000.png").convert("RGB")
    for r, row in enumerate(record["rows"]):
        assert catalog.records[row["query"]].split == "test" and len(row["hits"]) == K
        assert all(catalog.records[h].split == "train" for h in row["hits"])
        assert all(_tile_colour(picture, r, c) == ImageColor.getrgb(GRID_WRONG) for c in range(1, K + 1))
    mapping = json.loads((out / "images" / "embedding_map.json").read_text())
    assert mapping["num_points"] == 24  # 12 queries + 12 gallery images


def test_tensorboard_receives_the_images(tiny_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _run(tiny_folder, out, ["logger=tensorboard", "trainer.max_epochs=1", "test_after_fit=false"])
    assert (out / "tensorboard").is_dir() and not (out / "csv").exists()  # one folder per logger
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"val/retrieval_examples", "val/embedding_map"} <= set(events.Tags()["images"])
    logged = events.Images("val/retrieval_examples")[-1]
    on_disk = Image.open(out / "images" / "retrieval_epoch000.png")
    assert (logged.width, logged.height) == on_disk.size


@pytest.mark.slow
def test_wandb_offline_run_holds_the_images(tiny_folder, tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    out = tmp_path / "run"
    try:
        _run(tiny_folder, out, ["logger=wandb", "trainer.max_epochs=1", "test_after_fit=false"])
    finally:
        wandb.finish()
    assert (out / "wandb").is_dir() and not (out / "csv").exists()
    media = list((out / "wandb").rglob("media/images/**/*.png"))
    names = {p.parent.name + "/" + p.name.split("_")[0] for p in media}
    assert any("retrieval" in str(p) for p in media) and any("embedding" in str(p) for p in media), names
    retrieval = next(p for p in media if "retrieval" in str(p))
    assert Image.open(retrieval).size == Image.open(out / "images" / "retrieval_epoch000.png").size


def test_a_failing_picture_only_warns(tiny_folder, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no drawing today")

    monkeypatch.setattr(visuals, "render_retrieval_examples", broken)
    monkeypatch.setattr(visuals, "render_embedding_map", broken)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="not drawn: RuntimeError: no drawing today") as caught:
        _run(tiny_folder, out, ["logger=csv", "trainer.max_epochs=1", "test_after_fit=false"])
    messages = " ".join(str(w.message) for w in caught)
    assert "retrieval examples not drawn" in messages and "embedding map not drawn" in messages
    assert (out / "checkpoints" / "last.ckpt").is_file()  # training went on
    assert not list(out.glob("images/*.png"))


def test_fast_dev_run_draws_nothing(tiny_folder, tmp_path):
    out = tmp_path / "run"
    _run(tiny_folder, out, ["trainer=debug"])
    assert not (out / "images").exists()
