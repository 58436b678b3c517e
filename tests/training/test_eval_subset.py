"""Quick runs evaluate on a fixed random subset of each retrieval set (subset.val/test, debug presets, and
Lightning's limit_val/test_batches read as images), never on the first N batches (queries without a gallery)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.configs import compose_config

from cbir.commands.train import train
from cbir.data.datamodule import subsample_eval_set
from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY, EvalSpec, RecordDataset
from cbir.errors import ConfigError
from cbir.training.factory import eval_subset


def _dataset(n: int = 100) -> RecordDataset:
    roles = np.where(np.arange(n) < 20, ROLE_QUERY, ROLE_GALLERY)  # queries first, as a query-vs-gallery set is
    return RecordDataset(catalog=None, indices=np.arange(1000, 1000 + n), transform=None, roles=roles)


def test_subset_is_fixed_random_and_keeps_roles():
    full = _dataset()
    spec = EvalSpec("test", "train")
    half = subsample_eval_set(full, 0.5, spec)
    again = subsample_eval_set(full, 0.5, spec)
    assert len(half) == 50 and np.array_equal(half.indices, again.indices)
    lookup = dict(zip(full.indices.tolist(), full.roles.tolist()))
    assert [lookup[i] for i in half.indices.tolist()] == half.roles.tolist()
    assert {ROLE_QUERY, ROLE_GALLERY} <= set(half.roles.tolist())  # not the first 50: queries and gallery both
    assert subsample_eval_set(full, 30, spec).indices.size == 30
    assert subsample_eval_set(full, None, spec) is full and subsample_eval_set(full, 500, spec) is full
    with pytest.raises(ConfigError, match="at least 2"):
        subsample_eval_set(full, 1, spec)


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], (None, None)),
    (["subset.val=300", "subset.test=0.1"], (300, 0.1)),
    (["trainer.limit_val_batches=2", "data.eval_batch_size=64"], (128, None)),  # batches read as images
    (["trainer.limit_val_batches=0.25", "trainer.limit_test_batches=1.0"], (0.25, None)),
    (["trainer.limit_val_batches=0"], (None, None)),  # 0: no validation at all, Lightning's meaning
    (["debug=fast"], (1000, 1000)),
])
def test_subset_settings(overrides, expected):
    cfg = compose_config("train", overrides)
    assert (eval_subset(cfg, "val"), eval_subset(cfg, "test")) == expected


def test_bad_subset_is_one_clear_error():
    with pytest.raises(ConfigError, match="subset.val=-3"):
        eval_subset(compose_config("train", ["subset.val=-3"]), "val")


def test_limit_val_batches_on_a_query_vs_gallery_set_trains_and_scores(tiny_fashion_mnist, tmp_path):
    """Fashion-MNIST validation is held-out queries against the rest of train; two batches of its loader
    held queries only and the run crashed for want of a metric."""
    cfg = compose_config("train", [
        "data=fashion_mnist", f"data.root={tiny_fashion_mnist}", "data.image_size=32", "data.batch_size=10",
        "data.m_per_class=1", "data.eval_batch_size=4", "data.num_workers=0", "data.val_images=0.5",
        "model=resnet18", "model.pretrained=none", "head.dim=8", "logger=none", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=3", "trainer.limit_test_batches=4", f"paths.output_dir={tmp_path}",
        "callbacks.retrieval_examples=null", "callbacks.embedding_map=null"])
    assert math.isfinite(train(cfg))
