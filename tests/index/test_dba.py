"""index.dba=K: database-side augmentation of the stored vectors at build time (and of images added later)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.data import write_class_images

from cbir.errors import ConfigError
from cbir.index.dba import augment_collection, augment_new
from cbir.index.pipeline import add_to_index, build_collection_index
from cbir.index.store import load_index
from cbir.models.embedder import build_embedder

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_embedder("resnet18", pretrained="none", image_size=16)


def test_augmentation_pulls_each_vector_toward_its_neighbours_never_itself():
    vectors = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]], np.float32)
    out = augment_collection(vectors, n=1, alpha=1.0)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    # row 0's nearest other row is row 1 (similarity 0.8): normalise(v0 + 0.8 v1)
    manual = vectors[0] + 0.8 * vectors[1]
    assert np.allclose(out[0], manual / np.linalg.norm(manual), atol=1e-6)
    # row 2 is orthogonal to both: its neighbour gets weight 0 and it stays as it was
    assert np.allclose(out[2], vectors[2], atol=1e-6)


def test_build_stores_augmented_vectors_and_added_images_join_them(model, tmp_path):
    photos, more = tmp_path / "photos", tmp_path / "more"
    write_class_images(photos, num_classes=3, per_class=4, size=20)
    write_class_images(more, num_classes=1, per_class=2, size=20, seed=5)
    plain = build_collection_index(model, photos, tmp_path / "plain", kind="flat", num_workers=0, progress=False)
    dba = build_collection_index(model, photos, tmp_path / "dba", kind="flat", num_workers=0, progress=False, dba=2)
    ids = np.arange(len(plain))
    raw = plain.vectors(ids)
    np.testing.assert_allclose(dba.vectors(ids), augment_collection(raw, 2, 3.0), atol=1e-5)
    assert not np.allclose(dba.vectors(ids), raw, atol=1e-3)
    saved = load_index(tmp_path / "dba")
    assert saved.info["dba"] == {"n": 2, "alpha": 3.0}
    new_ids, extraction = add_to_index(saved, model, more, tmp_path / "work", num_workers=0, progress=False)
    expected = augment_new(load_index(tmp_path / "dba"), extraction.embeddings, 2, 3.0)
    np.testing.assert_allclose(saved.vectors(new_ids), expected, atol=1e-5)


def test_dba_is_refused_where_the_vectors_are_not_in_memory(model, tmp_path):
    write_class_images(tmp_path / "p", num_classes=2, per_class=2, size=20)
    for options in ({"kind": "ondisk"}, {"backend": "milvus"}):
        with pytest.raises(ConfigError, match="index.dba=2"):
            build_collection_index(model, tmp_path / "p", tmp_path / "out", num_workers=0, progress=False, dba=2,
                                   **options)
