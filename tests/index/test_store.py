"""FAISS index: choice by size, each kind, recall measurement and tuning, save/load, add/remove, id store,
errors, and the selection of the GPU / torch-CUDA search paths (monkeypatched: no GPU here)."""

from __future__ import annotations

import json
import sqlite3

import faiss
import numpy as np
import pytest
import torch
from helpers.vectors import clustered

from cbir.errors import CbirError, ConfigError
from cbir.index import builder, store
from cbir.index.builder import (
    IndexOptions,
    RecallProbe,
    choose_kind,
    drop_self,
    plan_index,
    recall_at_k,
    torch_exact_search,
)
from cbir.index.errors import DimensionMismatchError, IndexFilesError
from cbir.index.store import CbirIndex, load_index

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(3000)


def build(vectors: np.ndarray, kind: str, **options) -> CbirIndex:
    options.setdefault("query_sample", 200)
    return CbirIndex.build(vectors, [f"img/{i}.png" for i in range(len(vectors))],
                           [f"c{i % 7}" for i in range(len(vectors))], options=IndexOptions(kind=kind, **options))


# -- choice by size ---------------------------------------------------------------------------------
def test_auto_choice_by_size_thresholds():
    options = IndexOptions()
    assert choose_kind(options.flat_max - 1, 512, options)[0] == "flat"
    assert choose_kind(options.flat_max, 512, options)[0] == "ivf"
    assert choose_kind(options.pq_min - 1, 512, options)[0] == "ivf"
    assert choose_kind(options.pq_min, 512, options)[0] == "ivfpq"
    small_memory = IndexOptions(memory_budget_gb=0.1)  # 100k x 512 float32 = 0.19 GB
    assert choose_kind(100_000, 512, small_memory)[0] == "ivfpq"
    assert choose_kind(10, 512, IndexOptions(kind="hnsw"))[0] == "hnsw"


@pytest.mark.parametrize("n", [1_000, 100_000, 1_000_000, 10_000_000])
def test_ivf_lists_and_training_sample_follow_faiss_rules(n):
    options = IndexOptions(kind="ivf")
    plan = plan_index(n, 512, options)
    nlist = plan.nlist
    assert nlist & (nlist - 1) == 0  # a power of two
    assert nlist <= options.lists_per_sqrt * np.sqrt(n) < 2 * nlist or nlist * 39 * 2 > n
    assert plan.train_size >= 39 * nlist and plan.train_size <= n
    assert plan.factory == f"IVF{nlist},Flat"
    pq = plan_index(n, 512, IndexOptions(kind="ivfpq"))
    assert pq.factory.startswith("OPQ128,IVF") and pq.factory.endswith("PQ128x8" if pq.train_size >= 9984 else "PQ128x4")


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="kind"):
        IndexOptions(kind="annoy")
    with pytest.raises(ConfigError, match="target_recall"):
        IndexOptions(target_recall=1.5)


# -- each kind --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", pytest.param("ivfpq", marks=pytest.mark.slow)])  # OPQ trains ~10 s
def test_each_forced_kind_builds_and_searches(vectors, kind):
    index = build(vectors, kind)
    assert index.kind == kind and len(index) == len(vectors) and index.embedding_dim == vectors.shape[1]
    assert index.info["factory"] == plan_index(len(vectors), vectors.shape[1], IndexOptions(kind=kind)).factory
    scores, ids = index.search(vectors[:50], 5)
    assert scores.shape == ids.shape == (50, 5)
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
    if kind != "ivfpq":  # exact or near-exact: each vector finds itself first
        assert np.mean(ids[:, 0] == np.arange(50)) >= 0.98
    records = index.lookup(ids[0])
    assert records[0]["path"] == f"img/{ids[0, 0]}.png" and records[0]["label"] == f"c{ids[0, 0] % 7}"
    assert 0.0 <= index.info["recall_at_10"] <= 1.0


def test_auto_builds_flat_for_small_collections(vectors):
    index = build(vectors, "auto")
    assert index.kind == "flat" and index.info["recall_at_10"] == 1.0 and "auto" in index.info["reason"]


# -- recall -----------------------------------------------------------------------------------------
def test_recall_at_k_counts_overlap():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, 1], [-1, -1, -1, -1]])
    assert recall_at_k(approx, exact, 4) == pytest.approx((3 / 4 + 0) / 2)
    assert recall_at_k(exact, exact, 4) == 1.0
    assert drop_self(np.array([[7, 1, 2], [3, 4, 5]]), np.array([7, 9]), 2).tolist() == [[1, 2], [3, 4]]


def test_recall_probe_matches_brute_force(vectors):
    ids = np.arange(len(vectors)) + 100
    probe = RecallProbe.sample(vectors, ids, k=10, size=100, seed=3)
    for row, query_id in enumerate(probe.query_ids):
        sims = vectors @ probe.queries[row]
        order = [ids[i] for i in np.argsort(-sims, kind="stable") if ids[i] != query_id][:10]
        assert len(set(order) & set(probe.exact_ids[row].tolist())) >= 9  # ties may swap the 10th
        assert query_id not in probe.exact_ids[row]
    ivf = build(vectors, "ivf", target_recall=0.5)
    builder.set_search_param(ivf.index, "nprobe", 1)
    _, found = ivf.index.search(probe.queries, 11)
    expected = recall_at_k(drop_self(found, probe.query_ids, 10), probe.exact_ids, 10)
    assert probe.recall(ivf.index) == pytest.approx(expected)
    assert expected < 1.0  # one list of many cannot hold every neighbour


def test_tuning_raises_nprobe_until_target(vectors):
    index = build(vectors, "ivf", target_recall=0.99)
    curve = index.info["recall_curve"]
    assert index.info["target_met"] and index.info["recall_at_10"] >= 0.99
    chosen = index.info["search_params"]["nprobe"]
    probes = [c["nprobe"] for c in curve]
    assert probes == sorted(probes) and {1, 2} <= set(probes)  # doubled from 1, then bisected
    # the chosen nprobe is the smallest measured one that meets the target: every smaller one misses
    assert all(c["recall"] < 0.99 for c in curve if c["nprobe"] < chosen)
    assert next(c for c in curve if c["nprobe"] == chosen)["recall"] >= 0.99
    assert faiss.extract_index_ivf(index.index).nprobe == chosen


def test_unreachable_target_is_reported_not_hidden(vectors):
    index = build(vectors, "ivfpq", target_recall=1.0, opq=False)
    assert index.info["target_met"] is False and index.info["recall_at_10"] < 1.0


# -- files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(vectors, kind, tmp_path):
    index = build(vectors, kind)
    expected = index.search(vectors[:20], 10)
    index.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    assert loaded.path == tmp_path / "ix" and loaded.info == json.loads((tmp_path / "ix" / "index.json").read_text())
    got = loaded.search(vectors[:20], 10)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
    assert loaded.lookup([5]) == index.lookup([5])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_stored_vectors_come_back_by_id_for_query_expansion(vectors, kind, tmp_path):
    index = build(vectors, kind)
    ids = np.array([5, 0, 2999, 17])
    got = index.vectors(ids)
    assert got.shape == (4, vectors.shape[1]) and got.dtype == np.float32
    if kind == "ivfpq":  # compressed: an approximation, still closest to its own vector
        assert (got @ vectors.T).argmax(axis=1).tolist() == ids.tolist()
    else:
        np.testing.assert_allclose(got, vectors[ids], atol=1e-6)
    index.remove([17])
    with pytest.raises(KeyError, match="no vector"):
        index.vectors([17])
    index.save(tmp_path / "ix")  # the id map built for IVF does not get in the way of saving and loading
    np.testing.assert_allclose(load_index(tmp_path / "ix").vectors([5]), got[:1], atol=1e-6)


def test_load_errors_name_the_problem(vectors, tmp_path):
    with pytest.raises(IndexFilesError, match="does not exist"):
        load_index(tmp_path / "nothing")
    index = build(vectors[:100], "flat")
    index.save(tmp_path / "ix")
    ids_file = tmp_path / "ix" / "ids-000001.sqlite"
    with sqlite3.connect(ids_file) as db:  # one image's row gone: a valid database that no longer matches
        db.execute("DELETE FROM images WHERE id = 7")
    with pytest.raises(IndexFilesError, match="ids-000001.sqlite fails its integrity check"):
        load_index(tmp_path / "ix")
    info = json.loads((tmp_path / "ix" / "index.json").read_text())
    info["sha256"].pop("ids-000001.sqlite")  # a hand-edited index.json: the counts still catch it
    (tmp_path / "ix" / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexFilesError, match="disagree"):
        load_index(tmp_path / "ix")
    ids_file.write_bytes(b"not a database" * 100)
    with pytest.raises(IndexFilesError, match="not a cbir id store"):
        load_index(tmp_path / "ix")
    ids_file.unlink()
    with pytest.raises(IndexFilesError, match="lacks ids-000001.sqlite"):
        load_index(tmp_path / "ix")


def test_dimension_mismatch_is_a_cbir_error(vectors):
    index = build(vectors[:100], "flat")
    with pytest.raises(DimensionMismatchError, match="32-d") as info:
        index.search(np.zeros((1, 16), np.float32), 3)
    assert isinstance(info.value, CbirError)
    with pytest.raises(DimensionMismatchError):
        index.add(np.zeros((1, 16), np.float32), ["x.png"])


# -- add / remove -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_add_and_remove(vectors, kind, tmp_path):
    base, extra = vectors[:2500], vectors[2500:2600]
    index = build(base, kind, opq=False)  # OPQ is covered above; here it would only add training time
    removed_ids = np.arange(0, 500, 5)
    assert index.remove(removed_ids) == len(removed_ids)
    assert index.remove([removed_ids[0]]) == 0  # already gone
    assert len(index) == len(index.store) == 2500 - len(removed_ids)
    _, found = index.search(base[removed_ids], 10)
    assert not np.isin(found, removed_ids).any()
    assert index.lookup(removed_ids[:3]) == [None, None, None]

    new_ids = index.add(extra, [f"new/{i}.png" for i in range(len(extra))])
    assert new_ids.tolist() == list(range(2500, 2600))  # ids are never reused
    _, found = index.search(extra, 10)
    assert np.mean([new_ids[i] in found[i] for i in range(len(extra))]) >= (0.98 if kind != "ivfpq" else 0.5)

    assert index.remove_paths(["new/0.png", "new/1.png"]) == 2
    index.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    assert len(loaded) == len(loaded.store) == 2500 - len(removed_ids) + 98
    assert loaded.store.next_id == 2600
    _, found = loaded.search(base[removed_ids], 10)
    assert not np.isin(found, removed_ids).any()
    assert loaded.add(extra[:1], ["again.png"]).tolist() == [2600]


def test_store_rows_match_index_ids(vectors):
    index = build(vectors[:300], "ivf", target_recall=0.5)
    index.remove([3, 4])
    index.add(vectors[300:305], [f"n{i}" for i in range(5)], labels=["a"] * 5, metadata=[{"w": i} for i in range(5)])
    invlists_ids = set()
    ivf = faiss.extract_index_ivf(index.index)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            invlists_ids |= set(faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size).tolist())
    assert invlists_ids == set(index.store.rows)
    assert index.lookup([302])[0] == {"id": 302, "path": "n2", "label": "a", "meta": {"w": 2}}


def test_empty_search_result_for_empty_index(vectors):
    index = build(vectors[:10], "flat")
    index.remove(range(10))
    scores, ids = index.search(vectors[:2], 3)
    assert (ids == -1).all() and ids.shape == (2, 3)


# -- GPU paths (selection logic; the machines that run tests have no GPU) ----------------------------
class FakeGpuIndex:
    def __init__(self, cpu):
        self.cpu = cpu
        self.searched = 0

    def search(self, x, k):
        self.searched += 1
        return self.cpu.search(x, k)


def fake_gpu(monkeypatch, fail_for: tuple[str, ...] = ()):
    clones = []

    def index_cpu_to_gpu(resources, device, index):
        if any(name in type(faiss.downcast_index(index)).__name__ for name in fail_for):
            raise RuntimeError("this index type is not implemented on the GPU")
        clones.append(FakeGpuIndex(index))
        return clones[-1]

    monkeypatch.setattr(builder, "gpu_available", lambda: True)
    monkeypatch.setattr(store, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    monkeypatch.setattr(store, "set_search_param", lambda index, name, value: None)
    return clones


def test_gpu_search_for_ivf_and_flat_but_not_hnsw(vectors, monkeypatch):
    ivf, hnsw = build(vectors, "ivf"), build(vectors, "hnsw")
    clones = fake_gpu(monkeypatch)
    assert ivf.search_backend()[0] == "faiss-gpu"
    ivf.search(vectors[:3], 5)
    assert clones[0].searched == 1
    assert hnsw.search_backend()[0] == "faiss-cpu" and len(clones) == 1  # never handed to the GPU cloner
    assert builder.use_gpu_for("ivf") and not builder.use_gpu_for("hnsw")
    assert not builder.use_gpu_for("ivf", IndexOptions(use_gpu=False))


def test_gpu_cloner_failure_falls_back_to_cpu(vectors, monkeypatch):
    index = build(vectors, "ivf")
    fake_gpu(monkeypatch, fail_for=("IndexIVF",))
    assert index.search_backend()[0] == "faiss-cpu"
    assert index.search(vectors[:3], 5)[1][:, 0].tolist() == [0, 1, 2]


def test_gpu_backend_dropped_after_changes(vectors, monkeypatch):
    index = build(vectors, "flat")
    clones = fake_gpu(monkeypatch)
    index.search(vectors[:1], 1)
    index.remove([0])
    index.search(vectors[:1], 1)
    assert len(clones) == 2  # a fresh GPU copy after the change


def test_torch_cuda_exact_path_without_faiss_gpu(vectors, monkeypatch):
    index = build(vectors, "flat")
    index.remove([1, 2])
    expected = index.search(vectors[:30], 7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(store, "TORCH_DEVICE", "cpu")  # run the CUDA code path on the CPU
    index._search_backend = None
    assert index.search_backend()[0] == "torch-cuda"
    got = index.search(vectors[:30], 7)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
    assert not np.isin(got[1], [1, 2]).any()


def test_torch_exact_search_matches_faiss(vectors):
    scores, positions = torch_exact_search(vectors, vectors[:40], 10, device="cpu", chunk=16)
    ref_scores, ref_positions = faiss.knn(vectors[:40], vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert np.mean(positions == ref_positions) > 0.99


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_a_large_k_is_filled_not_cut_by_the_probed_lists(vectors, kind):
    """D3: nprobe (IVF) or efSearch (HNSW) limits how many hits come back; a k beyond that widens the
    search instead of returning fewer hits in silence. With faiss.contrib.torch_utils imported (as
    pytorch-metric-learning does), whose Index.search takes no search parameters."""
    import faiss.contrib.torch_utils  # noqa: F401 - patches faiss.Index.search process-wide

    index = build(vectors, kind)
    scores, ids = index.search(vectors[:4], 1000)
    assert (ids >= 0).sum(axis=1).tolist() == [1000] * 4
    assert len(set(ids[0].tolist())) == 1000
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # still best first
    _, ids = index.search(vectors[:2], len(vectors) + 50)
    assert (ids >= 0).sum(axis=1).tolist() == [len(vectors)] * 2  # everything it has, then -1
    _, small = index.search(vectors[:4], 10)
    assert (small >= 0).all()
