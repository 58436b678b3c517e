"""benchmarks/degraded_queries.py reads any data config's evaluation protocol: the query pool and gallery it
degrades and searches must be the protocol's, so its figures mean what eval.py's mean."""

import importlib.util
import sys

import numpy as np
import pytest
from helpers.paths import ROOT

from cbir.data.catalog import Catalog, Record
from cbir.data.datasets import EvalSpec


@pytest.fixture(scope="module")
def degraded_queries():
    script = ROOT / "benchmarks" / "degraded_queries.py"
    spec = importlib.util.spec_from_file_location("degraded_queries", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("degraded_queries", module)
    spec.loader.exec_module(module)
    return module


def _catalog() -> Catalog:
    splits = ["train"] * 5 + ["val"] * 3 + ["test"] * 4
    return Catalog("toy", [Record(f"{i}.png", i % 2, split) for i, split in enumerate(splits)], ["a", "b"])


def test_all_vs_all_test_searches_the_queries_among_themselves(degraded_queries):
    queries, gallery = degraded_queries.evaluation_sets(_catalog(), EvalSpec("test"))
    assert queries.tolist() == [8, 9, 10, 11]
    assert gallery.tolist() == [8, 9, 10, 11]


def test_validation_classes_get_the_training_images_as_distractors(degraded_queries):
    queries, gallery = degraded_queries.evaluation_sets(_catalog(), EvalSpec("val"))
    assert queries.tolist() == [5, 6, 7]
    assert sorted(gallery.tolist()) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_query_vs_gallery_protocol_keeps_them_apart(degraded_queries):
    queries, gallery = degraded_queries.evaluation_sets(_catalog(), EvalSpec("test", "train+val"))
    assert queries.tolist() == [8, 9, 10, 11]
    assert gallery.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert not np.intersect1d(queries, gallery).size


def test_the_shipped_configs_protocols_are_read(degraded_queries):
    assert degraded_queries.data_spec("fashion_mnist", "test") == EvalSpec("test", "train+val")
    assert degraded_queries.data_spec("emoji", "test").all_vs_all
    assert degraded_queries.data_spec("icons", "val") == EvalSpec("val")
