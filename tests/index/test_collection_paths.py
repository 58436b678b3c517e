"""A collection named by a relative path is stored with absolute paths (issue 15 D11): a later `add` from
another folder finds the images already indexed, and old indexes with relative paths are still matched."""

from __future__ import annotations

import pytest
import torch
from helpers.data import write_class_images

from cbir.index.builder import IndexOptions
from cbir.index.collection import read_collection
from cbir.index.pipeline import add_to_index, build_collection_index
from cbir.index.store import CbirIndex
from cbir.models.embedder import build_embedder

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_embedder("resnet18", pretrained="none", image_size=16)


def test_relative_collection_paths_are_stored_absolute_and_add_is_idempotent(model, tmp_path, monkeypatch):
    root = tmp_path / "photos"
    write_class_images(root, num_classes=2, per_class=3, size=20)
    monkeypatch.chdir(tmp_path)
    index = build_collection_index(model, "photos", tmp_path / "index", kind="flat", batch_size=4,
                                   num_workers=0, progress=False)
    assert all(path.startswith(str(tmp_path)) for path in index.store.paths())
    elsewhere = tmp_path / "other" / "place"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    ids, _ = add_to_index(index, model, "../../photos", tmp_path / "work", batch_size=4, num_workers=0,
                          progress=False)
    assert len(ids) == 0 and len(index) == 6


def test_an_old_index_with_relative_paths_is_not_filled_with_duplicates(model, tmp_path, monkeypatch):
    root = tmp_path / "photos"
    write_class_images(root, num_classes=2, per_class=2, size=20)
    monkeypatch.chdir(tmp_path)
    relative = sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*.png"))
    old = CbirIndex.build(torch.randn(4, model.embedding_dim).numpy(), relative, [None] * 4,
                          options=IndexOptions(kind="flat"))
    ids, _ = add_to_index(old, model, "photos", tmp_path / "work", batch_size=4, num_workers=0, progress=False)
    assert len(ids) == 0 and len(old) == 4
    assert str(read_collection("photos").catalog.records[0].source).startswith(str(tmp_path))
