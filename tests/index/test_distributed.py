"""Scaling the index past one process and past RAM: extraction over 2 gloo ranks (spawned and under
torchrun) equals one process; on-disk IVF built shard by shard equals an in-RAM IVF with the same
centroids, memory-maps its lists, resumes, refuses edits, serves search.py; multi-GPU cloning
(monkeypatched: no GPU here)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from helpers.configs import compose_config
from helpers.data import write_class_images
from helpers.paths import ROOT
from helpers.vectors import clustered

from cbir.errors import ConfigError
from cbir.index import builder, distributed, load_index, ondisk, read_collection, store
from cbir.index.builder import IndexOptions, choose_kind
from cbir.index.errors import ExtractionMismatchError, IndexFilesError, ReadOnlyIndexError
from cbir.index.extract import extract_collection
from cbir.index.ondisk import VectorShards, build_ondisk_index
from cbir.index.pipeline import build_collection_index, build_ondisk_cbir_index
from cbir.index.shards import ExtractionOptions
from cbir.models.embedder import build_embedder
from cbir.ranks import Rank

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_embedder("resnet18", pretrained="none", image_size=16)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "images"
    write_class_images(root, num_classes=4, per_class=5, size=24)
    return root


def write_shards(folder: Path, vectors: np.ndarray, sizes: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files, start = [], 0
    for number, size in enumerate(sizes):
        files.append(folder / f"shard_{number:05d}.npy")
        np.save(files[-1], vectors[start:start + size])
        start += size
    assert start == len(vectors)
    return files


# -- distributed extraction -------------------------------------------------------------------------
@pytest.mark.slow  # two spawned interpreters import torch: ~15 s alone, ~40 s on a loaded machine
def test_two_spawned_ranks_build_the_same_index_as_one_process(model, images, tmp_path):
    one = build_collection_index(model, images, tmp_path / "one", kind="flat", batch_size=4, num_workers=0,
                                 shard_size=3, progress=False, keep_shards=True)
    two = build_collection_index(model, images, tmp_path / "two", kind="flat", batch_size=4, num_workers=0,
                                 shard_size=3, progress=False, processes=2, keep_shards=True)
    assert len(two) == len(one) == 20
    assert two.store.rows == one.store.rows  # same ids, paths and labels, in collection order
    for shard in range(7):  # every shard written once, by one of the ranks
        a = np.load(tmp_path / "one" / "embeddings" / f"shard_{shard:05d}.npy")
        b = np.load(tmp_path / "two" / "embeddings" / f"shard_{shard:05d}.npy")
        np.testing.assert_allclose(a, b, atol=1e-5)
    vectors = np.concatenate([np.load(p) for p in sorted((tmp_path / "two" / "embeddings").glob("*.npy"))])
    assert [one.search(vectors, 3)[1].tolist()] == [two.search(vectors, 3)[1].tolist()]
    manifest = json.loads((tmp_path / "two" / "embeddings" / "manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "one" / "embeddings" / "manifest.json").read_text())


@pytest.mark.slow
def test_spawned_extraction_resumes_and_reports_rank_errors(model, images, tmp_path):
    collection = read_collection(images)
    work = tmp_path / "work"
    reference = extract_collection(model, collection, work, batch_size=4, num_workers=0, shard_size=3,
                                   progress=False)
    kept = {p.name: p.stat().st_mtime_ns for p in work.glob("shard_*.npy")}
    for shard in (1, 4):  # as if a 2-process run was killed before these were written
        (work / f"shard_{shard:05d}.json").unlink()
        (work / f"shard_{shard:05d}.npy").unlink()
    resumed = extract_collection(model, collection, work, batch_size=4, num_workers=0, shard_size=3,
                                 progress=False, processes=2)
    np.testing.assert_allclose(resumed.embeddings, reference.embeddings, atol=1e-5)
    assert resumed.indices.tolist() == reference.indices.tolist()
    for name, mtime in kept.items():  # the finished shards were not extracted again
        if name not in ("shard_00001.npy", "shard_00004.npy"):
            assert (work / name).stat().st_mtime_ns == mtime

    other = build_embedder("resnet18", pretrained="none", image_size=16)
    with pytest.raises(ExtractionMismatchError, match="another run"):  # raised on rank 0, reported by the parent
        extract_collection(other, collection, work, batch_size=4, num_workers=0, shard_size=3, progress=False,
                           processes=2)


def test_rank_protocol_in_a_one_rank_gloo_group(model, images, tmp_path):
    """The collective steps (rank 0 prepares and lists shards, all report, rank 0 gathers) in-process."""
    collection = read_collection(images)
    options = dict(batch_size=4, num_workers=0, shard_size=3, channels_last=True, precision="fp32", progress=False)
    reference = extract_collection(model, collection, tmp_path / "one", resume=True, **options)
    me = Rank(0, 1, 0)
    settings = ExtractionOptions(resume=True, **options)
    got = distributed.run_rank(me, model, collection, tmp_path / "ranked", settings, device="cpu", gather=True,
                               init_method=f"file://{tmp_path / 'store1'}")
    np.testing.assert_allclose(got.embeddings, reference.embeddings, atol=1e-5)
    assert got.indices.tolist() == reference.indices.tolist() and len(got.shard_files) == 7
    other = build_embedder("resnet18", pretrained="none", image_size=16)
    with pytest.raises(ExtractionMismatchError):  # rank 0's error, raised after telling the other ranks
        distributed.run_rank(me, other, collection, tmp_path / "ranked", settings, device="cpu", gather=True,
                             init_method=f"file://{tmp_path / 'store2'}")
    assert not torch.distributed.is_initialized()  # the group it created is gone


def test_bad_process_requests_are_config_errors(model, images, tmp_path, monkeypatch):
    collection = read_collection(images)
    common = dict(batch_size=4, num_workers=0, shard_size=3, progress=False)
    with pytest.raises(ConfigError, match="must be >= 1"):
        extract_collection(model, collection, tmp_path / "w", processes=0, **common)
    with pytest.raises(ConfigError, match="every rank on one GPU"):
        extract_collection(model, collection, tmp_path / "w", processes=2, device="cuda:1", **common)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 processes on this machine but 1 GPUs"):
        extract_collection(model, collection, tmp_path / "w", processes=2, device="cuda", **common)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert distributed.launched_rank() == distributed.Rank(0, 4, 0)
    with pytest.raises(ConfigError, match="launcher started 4 ranks"):
        extract_collection(model, collection, tmp_path / "w", processes=2, **common)
    with pytest.raises(ConfigError, match="without torchrun"):
        from cbir.index.pipeline import add_to_index

        add_to_index(None, model, images, tmp_path / "w")
    assert not (tmp_path / "w").exists()  # nothing written before the errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_cli_build_equals_one_process(model, images, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"hyper_parameters": {"model_config": {"backbone": "resnet18", "image_size": 16, "head": None}},
                "state_dict": {f"embedder.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    common = ["index", "build", f"ckpt={ckpt}", f"collection={images}", "num_workers=0", "kind=flat", "batch_size=4", "keep_shards=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "cbir.cli",
                          *common, f"out={tmp_path / 'two'}"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("index ") == 1 and "20 images" in run.stdout  # printed by rank 0 only
    single = subprocess.run([sys.executable, "-m", "cbir.cli", *common, f"out={tmp_path / 'one'}"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    one, two = load_index(tmp_path / "one"), load_index(tmp_path / "two")
    assert two.store.rows == one.store.rows
    vectors = np.load(tmp_path / "one" / "embeddings" / "shard_00000.npy")
    np.testing.assert_array_equal(one.search(vectors, 5)[1], two.search(vectors, 5)[1])


# -- on-disk IVF ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shard_vectors() -> np.ndarray:
    return clustered(4000, seed=1)


def ondisk_options(**overrides) -> IndexOptions:
    return IndexOptions(**{"kind": "ondisk", "query_sample": 200, "ondisk_block_vectors": 1000, **overrides})


def test_ondisk_equals_in_ram_ivf_with_the_same_centroids(shard_vectors, tmp_path):
    files = write_shards(tmp_path / "shards", shard_vectors, [700, 900, 1100, 800, 500])
    ids = np.arange(len(shard_vectors), dtype=np.int64) + 1000
    shards = VectorShards.with_consecutive_ids(files, ids)
    index, info = build_ondisk_index(shards, tmp_path / "ix", ondisk_options(target_recall=0.9), progress=False)
    assert info["kind"] == "ondisk" and info["blocks"] == 3 and index.ntotal == len(shard_vectors)
    assert isinstance(ondisk.ondisk_lists(index), faiss.OnDiskInvertedLists)
    assert (tmp_path / "ix" / "lists.ivfdata").stat().st_size == info["lists_bytes"] > 0
    assert not (tmp_path / "ix" / ondisk.BUILD_DIR).exists()  # block files removed after the merge
    assert info["recall_at_10"] >= 0.9 and info["target_met"]

    ivf = faiss.extract_index_ivf(index)
    in_ram = faiss.IndexIVFFlat(faiss.clone_index(ivf.quantizer), ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    in_ram.add_with_ids(shard_vectors, ids)
    queries = clustered(100, seed=7)
    for nprobe in (1, 3, ivf.nlist):
        index.nprobe = in_ram.nprobe = nprobe
        disk_scores, disk_ids = index.search(queries, 10)
        ram_scores, ram_ids = in_ram.search(queries, 10)
        np.testing.assert_array_equal(disk_ids, ram_ids)
        np.testing.assert_allclose(disk_scores, ram_scores, atol=1e-6)
    exact = faiss.knn(queries, shard_vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)[1] + 1000
    np.testing.assert_array_equal(np.sort(disk_ids, axis=1), np.sort(exact, axis=1))  # nprobe=nlist is exact


def test_streamed_exact_search_matches_faiss_knn(shard_vectors, tmp_path):
    files = write_shards(tmp_path, shard_vectors, [1500, 1500, 1000])
    shards = VectorShards.with_consecutive_ids(files, np.arange(len(shard_vectors)))
    queries = clustered(30, seed=5)
    scores, positions = shards.exact_search(queries, 7)
    ref_scores, ref_positions = faiss.knn(queries, shard_vectors, 7, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert np.mean(positions == ref_positions) > 0.99
    rows = np.array([0, 1499, 1500, 3999])
    np.testing.assert_array_equal(shards.rows(rows), shard_vectors[rows])


def test_killed_ondisk_build_resumes_from_finished_blocks(shard_vectors, tmp_path, monkeypatch):
    files = write_shards(tmp_path / "shards", shard_vectors, [1000] * 4)
    shards = VectorShards.with_consecutive_ids(files, np.arange(len(shard_vectors)))
    written, real_write = [], ondisk._write_index

    def write(index, path):
        if path.name == "block_00002.index" and not written.count("killed"):
            written.append("killed")
            raise KeyboardInterrupt  # the process killed while filling the third block
        written.append(path.name)
        real_write(index, path)

    monkeypatch.setattr(ondisk, "_write_index", write)
    with pytest.raises(KeyboardInterrupt):
        build_ondisk_index(shards, tmp_path / "ix", ondisk_options(), progress=False)
    assert written == ["trained.index", "block_00000.index", "block_00001.index", "killed"]
    index, _ = build_ondisk_index(shards, tmp_path / "ix", ondisk_options(), progress=False)
    assert written[4:] == ["block_00002.index", "block_00003.index"]  # no retraining, no refilled blocks
    assert index.ntotal == len(shard_vectors)


def test_ondisk_cbir_index_saves_loads_moves_and_refuses_edits(shard_vectors, tmp_path):
    files = write_shards(tmp_path / "shards", shard_vectors, [2000, 2000])
    paths = [f"img/{i}.png" for i in range(len(shard_vectors))]
    built = build_ondisk_cbir_index(files, paths, None, tmp_path / "ix", ondisk_options(), progress=False)
    built.save(tmp_path / "ix")
    expected = built.search(shard_vectors[:20], 5)
    shutil.move(tmp_path / "ix", tmp_path / "moved")  # the lists file is found beside index.faiss
    loaded = load_index(tmp_path / "moved")
    assert loaded.kind == "ondisk" and isinstance(ondisk.ondisk_lists(loaded.index), faiss.OnDiskInvertedLists)
    assert faiss.extract_index_ivf(loaded.index).nprobe == loaded.info["search_params"]["nprobe"]
    scores, ids = loaded.search(shard_vectors[:20], 5)
    np.testing.assert_array_equal(ids, expected[1])
    assert loaded.lookup(ids[:, 0])[0]["path"] == "img/0.png" and loaded.search_backend()[0] == "faiss-cpu"
    with pytest.raises(ReadOnlyIndexError, match="build it again"):
        loaded.add(shard_vectors[:1], ["new.png"])
    with pytest.raises(ReadOnlyIndexError):
        loaded.remove([0])
    from cbir.index.pipeline import add_to_index

    with pytest.raises(ReadOnlyIndexError):  # refused before any extraction
        add_to_index(loaded, None, "no-such-collection", tmp_path / "work")
    loaded.save(tmp_path / "copy")  # saving elsewhere takes the lists file along
    assert load_index(tmp_path / "copy").search(shard_vectors[:20], 5)[1].tolist() == ids.tolist()
    (tmp_path / "copy" / "lists.ivfdata").unlink()
    with pytest.raises(IndexFilesError, match="cannot read it"):
        load_index(tmp_path / "copy")


def test_auto_goes_ondisk_only_past_the_budget_and_only_from_shards(shard_vectors):
    tiny_budget = IndexOptions(memory_budget_gb=1e-4, flat_max=1000)  # 107 kB; 32-d IVF-PQ: 8 + 8 id bytes
    assert choose_kind(4000, 32, tiny_budget)[0] == "ivfpq"  # raw 512 kB > budget, codes 64 kB fit
    assert choose_kind(100_000, 32, tiny_budget)[0] == "ondisk"
    assert choose_kind(100_000, 32, tiny_budget, ondisk=False)[0] == "ivfpq"
    assert choose_kind(10**9, 512, IndexOptions())[0] == "ondisk"  # 1e9 x 136 B > 8 GB
    assert choose_kind(2_000_000, 512, IndexOptions())[0] == "ivfpq"
    with pytest.raises(ConfigError, match="built from embedding shards"):
        builder.build_index(shard_vectors, np.arange(len(shard_vectors)), IndexOptions(kind="ondisk"))


@pytest.mark.slow  # exports a bundle and runs search.py in a fresh interpreter: 12-22 s here
def test_collection_pipeline_builds_ondisk_and_search_py_uses_it(images, tmp_path):
    from cbir.export.bundle import export_bundle
    from cbir.training.factory import build_embedder_from_config, model_config

    torch.manual_seed(0)
    cfg = compose_config("train", ["model=resnet18", "model.pretrained=none", "model.image_size=32", "head.dim=8"])
    bundle_dir = export_bundle(build_embedder_from_config(cfg), tmp_path / "bundle", model_config=model_config(cfg),
                               runtimes=[])
    from cbir import load_bundle
    from cbir.index.pipeline import build_bundle_index

    index = build_bundle_index(load_bundle(bundle_dir), str(images), bundle_dir / "index", kind="ondisk",
                               num_workers=0, shard_size=6, progress=False)
    assert index.kind == "ondisk" and len(index) == 20
    # the extraction shards are gone once the index is saved: a bundle does not carry its vectors twice
    assert sorted(p.name for p in (bundle_dir / "index").iterdir()) == [
        "ids-000001.sqlite", "index-000001.faiss", "index.json", "lists.ivfdata"]
    query = sorted(images.rglob("*.png"))[3]
    run = subprocess.run([sys.executable, str(ROOT / "search.py"), f"bundle={bundle_dir}", f"query={query}",
                          "k=2", "--json", "exclude_self=false"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    hits = json.loads(run.stdout)[0]["hits"]  # stdout is pure JSON: faiss's printf went to stderr
    assert hits[0]["path"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


RSS_CHILD = textwrap.dedent("""
    import json, sys
    import faiss, numpy as np
    from cbir.index.ondisk import read_ondisk_index  # imports torch: before the first measurement

    def rss_anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    faiss.omp_set_num_threads(1)
    queries = np.load(sys.argv[2])
    before = rss_anon()
    if sys.argv[3] == "ondisk":
        index = read_ondisk_index(sys.argv[1])
    else:
        index = faiss.read_index(sys.argv[1])
    index.nprobe = 16
    index.search(queries, 10)
    print(json.dumps({"growth": rss_anon() - before}))
""")


@pytest.mark.slow
def test_ondisk_search_process_memory_stays_far_below_the_vectors(tmp_path):
    """200k x 64 float32 = 51 MB of vectors: a search process maps the lists instead of holding them."""
    files = []
    for number in range(4):
        block = clustered(50_000, dim=64, centres=300, seed=number)
        files.append(tmp_path / f"shard_{number}.npy")
        np.save(files[-1], block)
        del block
    shards = VectorShards.with_consecutive_ids(files, np.arange(200_000))
    index, _ = build_ondisk_index(shards, tmp_path / "ix", IndexOptions(
        kind="ondisk", query_sample=100, target_recall=0.5, ondisk_block_vectors=100_000), progress=False)
    faiss.write_index(index, str(tmp_path / "ix" / "index.faiss"))
    faiss.write_index(_in_memory_copy(tmp_path / "ix"), str(tmp_path / "ram.index"))
    np.save(tmp_path / "q.npy", clustered(200, dim=64, centres=300, seed=9))
    (tmp_path / "child.py").write_text(RSS_CHILD)
    vectors_bytes = 200_000 * 64 * 4

    def growth(path: Path, mode: str) -> int:
        run = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(path), str(tmp_path / "q.npy"), mode],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.strip().splitlines()[-1])["growth"]

    on_disk, in_ram = growth(tmp_path / "ix" / "index.faiss", "ondisk"), growth(tmp_path / "ram.index", "ram")
    assert in_ram > 0.9 * vectors_bytes  # the check can fail: an in-RAM IVF does hold every vector
    assert on_disk < 0.1 * vectors_bytes, (on_disk, in_ram)


def _in_memory_copy(folder: Path) -> faiss.Index:
    """The same index with its lists read into RAM (ArrayInvertedLists)."""
    index = ondisk.read_ondisk_index(folder / "index.faiss")
    ivf = faiss.extract_index_ivf(index)
    in_ram = faiss.IndexIVFFlat(faiss.clone_index(ivf.quantizer), ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size).copy()
            ids = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
            in_ram.invlists.add_entries(number, size, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    in_ram.ntotal = index.ntotal
    return in_ram


# -- several GPUs (the cloner's options; no GPU here) -------------------------------------------------
class FakeClonerOptions:
    def __init__(self):
        self.shard = False


def test_several_gpus_shard_or_replicate_by_option(shard_vectors, monkeypatch):
    from cbir.index.store import CbirIndex

    def build(**options):
        return CbirIndex.build(shard_vectors, [f"{i}" for i in range(len(shard_vectors))],
                               options=IndexOptions(kind="ivf", query_sample=100, **options))

    sharded, replicated = build(), build(gpu_shard=False)
    calls = []

    def index_cpu_to_all_gpus(index, co=None, ngpu=-1):
        calls.append({"shard": co.shard, "ngpu": ngpu, "type": type(faiss.downcast_index(index)).__name__})
        return index  # searches on the CPU copy

    monkeypatch.setattr(store, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", FakeClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", index_cpu_to_all_gpus, raising=False)
    monkeypatch.setattr(store, "set_search_param", lambda index, name, value: calls.append({name: value}))
    assert sharded.search_backend()[0] == "faiss-gpu-shards-2"
    assert replicated.search_backend()[0] == "faiss-gpu-replicas-2"
    assert calls[0] == {"shard": True, "ngpu": 2, "type": "IndexIVFFlat"} and calls[2]["shard"] is False
    assert calls[1] == {"nprobe": sharded.info["search_params"]["nprobe"]}  # tuned nprobe set on the GPUs
    assert sharded.search(shard_vectors[:5], 3)[1][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_shards_of_gpu_indexes_take_gpu_parameters():
    shards = faiss.IndexShards(8, True, True)
    shards.add_shard(faiss.IndexFlatIP(8))
    assert not builder._is_gpu_index(shards)  # CPU sub-indexes: the CPU ParameterSpace
    assert not builder._is_gpu_index(faiss.IndexFlatIP(8))
