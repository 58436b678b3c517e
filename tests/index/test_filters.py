"""Label filters on the FAISS backend: the parser, and filtered searches on every kind that return only
matching images, as many as asked for, best first (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.vectors import clustered

from cbir.index.builder import IndexOptions, exact_search
from cbir.index.filters import FilterError, parse_filter
from cbir.index.store import CbirIndex

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.mark.parametrize("text, label, passes", [
    ("label == 'cat'", "cat", True), ("label == 'cat'", "dog", False), ('label != "cat"', "dog", True),
    ("label in ['cat', 'dog']", "dog", True), ("label not in ['cat', 'dog']", "cow", True),
    ("label not  in ['cat']", "cat", False), ("label == 'cat'", None, False), ("label != 'cat'", None, True),
    ("label == 3", "3", True),
])
def test_the_clauses_a_faiss_index_understands(text, label, passes):
    assert parse_filter(text).matches(label) is passes


@pytest.mark.parametrize("text, message", [
    ("path == 'a.png'", "cannot filter on 'path'"), ("label ~ 'x'", "not understood"),
    ("label == cat", "not a quoted string"), ("label in 'cat'", "takes a list"),
    ("label == 'a' and label == 'b'", "not understood|not a quoted string"),
])
def test_what_it_does_not_understand_is_one_clear_line(text, message):
    with pytest.raises(FilterError, match=message):
        parse_filter(text)


def test_blank_means_no_filter():
    assert parse_filter(None) is None and parse_filter("  ") is None


@pytest.mark.parametrize("kind, n", [("flat", 2000), ("ivf", 4000), ("hnsw", 2000), ("ivfpq", 4000)])
def test_filtered_search_returns_only_matching_images_best_first(kind, n):
    vectors = clustered(n, dim=32, centres=20)
    labels = [f"c{i % 25}" for i in range(n)]  # 4 % of the images per label
    index = CbirIndex.build(vectors, [f"{i}.png" for i in range(n)], labels,
                            options=IndexOptions(kind=kind, query_sample=100, opq=False, target_recall=0.5))
    queries = vectors[:10]
    scores, ids = index.search(queries, 20, filter="label == 'c3'")
    assert (ids >= 0).all(), "rows were cut short: a filter must widen the search, not return fewer hits"
    assert all(labels[i] == "c3" for i in ids.ravel())
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    if kind in ("flat", "hnsw", "ivf"):  # the matching images' exact neighbours (IVF-PQ codes are approximate)
        allowed = np.array([i for i in range(n) if labels[i] == "c3"])
        _, positions = exact_search(vectors[allowed], queries, 20)
        exact = allowed[positions]
        overlap = np.mean([len(set(a) & set(e)) / 20 for a, e in zip(ids, exact)])
        assert overlap >= 0.9
    _, ids = index.search(queries, 5, filter="label not in ['c3']")
    assert all(labels[i] != "c3" for i in ids.ravel())


def test_a_filter_nothing_matches_and_more_k_than_matches():
    vectors = clustered(300, dim=16)
    index = CbirIndex.build(vectors, [f"{i}.png" for i in range(300)], ["a"] * 295 + ["b"] * 5,
                            options=IndexOptions(kind="flat"))
    _, ids = index.search(vectors[:2], 10, filter="label == 'zzz'")
    assert (ids == -1).all()
    _, ids = index.search(vectors[:2], 10, filter="label == 'b'")
    assert ((ids >= 0).sum(axis=1) == 5).all() and set(ids[ids >= 0].tolist()) == {295, 296, 297, 298, 299}


def test_the_matching_ids_follow_changes_to_the_index():
    vectors = clustered(50, dim=8)
    index = CbirIndex.build(vectors, [f"{i}.png" for i in range(50)], ["a"] * 50, options=IndexOptions(kind="flat"))
    assert (index.search(vectors[:1], 3, filter="label == 'b'")[1] == -1).all()
    new = index.add(vectors[:2], ["x.png", "y.png"], ["b", "b"])
    assert set(index.search(vectors[:1], 3, filter="label == 'b'")[1][0][:2].tolist()) == set(new.tolist())
