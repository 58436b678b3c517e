"""Index benchmark: build time, memory, QPS and recall@10 against exact search for each index kind.

Data:
- ``synthetic-100k`` / ``synthetic-1m``: 512-d *clustered, real-like* embeddings from
  :func:`clustered_embeddings` (seed 0): 4096 cluster centres drawn in a 64-d latent space and lifted to
  512-d through a random map with a decaying spectrum (embeddings of real models have low intrinsic
  dimension), Zipf-sized clusters (a few big classes, many small), and anisotropic noise (power-law
  spectrum along a random orthonormal basis), L2-normalised. Uniform random vectors make every ANN index
  look broken; this is the kind of data an index meets. The 1000 queries are drawn from the same
  mixture with another seed (not in the database).
- ``emoji`` and ``fashion-mnist``: ImageNet MobileNetV2 + a GeM head (random projection, torch seed 0)
  embeddings of the emoji images (64 px; 1000 random images held out as queries) and of Fashion-MNIST
  (32 px; database = the 60k train images, queries = the first 1000 test images), extracted with
  :func:`cbir.index.extract_collection` and cached under ``--cache``.

For each kind (flat = exact, hnsw, ivf, ivfpq, auto) the index is built with :func:`cbir.index.build_index`
(so tuned to ``--target-recall`` on held-out database vectors exactly as ``cbir index build`` does), then
searched with the 1000 queries in one batch: QPS, recall@10 vs exact (faiss flat inner product),
index bytes (serialised) and the process RSS growth during the build. Threads: ``--threads`` (2 = this
machine's cores).

With ``--backends faiss milvus`` the same data also goes into a Milvus collection through
:func:`cbir.index.milvus.build_milvus_index` (Milvus Lite, embedded in this process: batched inserts, the index
type ``auto`` picks by size, or HNSW, tuned to the same target), and is searched through
:meth:`cbir.index.milvus.MilvusIndex.search` as the Searcher does (ids *and* the path/label fields of each
hit; FAISS returns ids, whose paths are a dict lookup). Its "index MB" is the database folder on disk.

    python benchmarks/index.py --out benchmarks/results/index_cpu.json
    python benchmarks/index.py --datasets synthetic-100k --kinds flat ivf auto     # a quick look
    python benchmarks/index.py --datasets synthetic-100k synthetic-1m --kinds flat auto --backends faiss milvus \
        --out benchmarks/results/index_milvus.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from cbir.evaluation.report import write_json
from cbir.index.builder import IndexOptions, build_index, exact_search, recall_at_k

K = 10
KINDS = ("flat", "hnsw", "ivf", "ivfpq", "auto")


def clustered_embeddings(n: int, dim: int = 512, centres: int = 4096, seed: int = 0, latent: int = 64,
                         noise: float = 0.55, zipf: float = 1.1, query_seed: int | None = None) -> np.ndarray:
    """``n`` L2-normalised vectors from a Gaussian mixture (see the module docstring). The mixture (centres,
    cluster sizes, noise basis) depends only on ``seed``; ``query_seed`` draws other points of it."""
    rng = np.random.default_rng(seed)
    lift = rng.standard_normal((latent, dim)) * (np.arange(1, latent + 1) ** -0.5)[:, None]
    means = rng.standard_normal((centres, latent)) @ lift
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    weights = np.arange(1, centres + 1, dtype=np.float64) ** -zipf
    weights /= weights.sum()
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spectrum = np.arange(1, dim + 1) ** -0.6
    spectrum *= noise / np.sqrt((spectrum ** 2).sum())  # expected noise norm = noise
    draw = np.random.default_rng(seed + 1 if query_seed is None else query_seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        labels = draw.choice(centres, size=m, p=weights)
        points = means[labels] + (draw.standard_normal((m, dim)) * spectrum) @ basis.T
        out[start:start + m] = points / np.linalg.norm(points, axis=1, keepdims=True)
    return out


def synthetic(n: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(database, queries) from :func:`clustered_embeddings`, cached as .npy (the 1M draw takes minutes)."""
    paths = cache / f"synthetic-{n}.npy", cache / "synthetic-queries.npy"
    if not paths[0].is_file():
        np.save(paths[0], clustered_embeddings(n, seed=0))
    if not paths[1].is_file():
        np.save(paths[1], clustered_embeddings(1000, seed=0, query_seed=12345))
    return np.load(paths[0]), np.load(paths[1])


def real_embeddings(name: str, cache: Path, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """(database, queries) of ImageNet MobileNetV2 embeddings of a real dataset, cached as .npy."""
    path = cache / f"{name}.npz"
    if path.is_file():
        data = np.load(path)
        return data["database"], data["queries"]
    import torch

    from cbir.index import extract_collection, read_collection
    from cbir.models.embedder import build_embedder

    torch.manual_seed(0)
    size = 64 if name == "emoji" else 32
    model = build_embedder("mobilenet_v2", pretrained="imagenet", image_size=size)
    if name == "emoji":
        everything = extract_collection(model, read_collection("emoji"), cache / "emoji-shards",
                                        batch_size=128, num_workers=threads)
        held = np.random.default_rng(0).permutation(len(everything.embeddings))
        database, queries = everything.embeddings[np.sort(held[1000:])], everything.embeddings[np.sort(held[:1000])]
    else:
        database = extract_collection(model, read_collection("fashion_mnist:train"), cache / "fmnist-train",
                                      batch_size=256, num_workers=threads).embeddings
        test = read_collection("fashion_mnist:test")
        test.indices = test.indices[:1000]
        queries = extract_collection(model, test, cache / "fmnist-test", batch_size=256,
                                     num_workers=threads).embeddings
    np.savez(path, database=database, queries=queries)
    return database, queries


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 2) -> tuple[np.ndarray, float]:
    """Ids of one 1000-query batch and the best QPS of ``repeats`` runs (the first warms caches)."""
    best, ids = 0.0, None
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        best = max(best, len(queries) / (time.perf_counter() - start))
    return ids, best


MILVUS_KINDS = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ", "auto": "auto"}


def bench_milvus(name: str, database: np.ndarray, queries: np.ndarray, exact: np.ndarray, kinds: list[str],
                 target: float, hnsw_max: int, cache: Path, save=lambda rows: None) -> list[dict]:
    """The Milvus rows: each kind built into a fresh Milvus Lite collection under ``cache``."""
    import shutil

    from cbir.index.milvus import build_milvus_index
    from cbir.index.ondisk import VectorShards

    n = len(database)
    vectors = cache / f"{name}-vectors.npy"
    if not vectors.is_file():
        np.save(vectors, database)
    shards = VectorShards.with_consecutive_ids([vectors], np.arange(n, dtype=np.int64))
    paths, labels = [f"{i}.jpg" for i in range(n)], [None] * n
    rows = []
    for kind in kinds:
        if kind == "hnsw" and n > hnsw_max:
            continue
        folder = cache / f"milvus-{name}-{kind}"
        shutil.rmtree(folder, ignore_errors=True)
        options = IndexOptions(backend="milvus", milvus_index=MILVUS_KINDS[kind], target_recall=target, k=K,
                               insert_batch=5000)
        before = rss_bytes()
        start = time.perf_counter()
        index = build_milvus_index(shards, paths, labels, folder, options, progress=False)
        total = time.perf_counter() - start
        grown = rss_bytes() - before
        found, qps = timed_search(index, queries, K)
        info = index.info
        row = {
            "dataset": name, "n": n, "dim": int(database.shape[1]), "backend": "milvus-lite", "kind": kind,
            "chosen": info["index_type"], "factory": f"Milvus {info['index_type']} {info['build_params'] or ''}".strip(),
            "search_params": info["search_params"], "tuned_recall_at_10": info["recall_at_10"],
            "target_met_when_tuning": info["target_met"], "build_seconds": info["build_seconds"],
            "build_and_tune_seconds": round(total, 2),
            "index_mb": round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1),
            "rss_growth_mb": round(grown / 2**20, 1), "qps": round(qps, 1),
            "recall_at_10": round(recall_at_k(found, exact, K), 4),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        save(rows)
        index.close()
        del index
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def bench_dataset(name: str, database: np.ndarray, queries: np.ndarray, kinds: list[str], target: float,
                  hnsw_max: int, save=lambda rows: None, backends: tuple[str, ...] = ("faiss",),
                  cache: Path | None = None) -> list[dict]:
    n = len(database)
    ids = np.arange(n, dtype=np.int64)
    start = time.perf_counter()
    _, exact = exact_search(database, queries, K)
    print(f"[{name}] {n} x {database.shape[1]}: exact ground truth in {time.perf_counter() - start:.1f}s",
          file=sys.stderr, flush=True)
    rows = []
    for kind in kinds if "faiss" in backends else []:
        if kind == "hnsw" and n > hnsw_max:
            rows.append({"dataset": name, "n": n, "kind": kind, "skipped": f"n > --hnsw-max {hnsw_max} "
                         "(HNSW build would take hours on this machine's cores)"})
            continue
        before = rss_bytes()
        options = IndexOptions(kind=kind, target_recall=target, k=K)
        start = time.perf_counter()
        index, info = build_index(database, ids, options)
        total = time.perf_counter() - start
        grown = rss_bytes() - before
        found, qps = timed_search(index, queries, K)
        row = {
            "dataset": name, "n": n, "dim": int(database.shape[1]), "backend": "faiss", "kind": kind,
            "chosen": info["kind"],
            "factory": info["factory"], "search_params": info["search_params"],
            "tuned_recall_at_10": info["recall_at_10"], "target_met_when_tuning": info["target_met"],
            "build_seconds": round(info["build_seconds"], 2), "build_and_tune_seconds": round(total, 2),
            "index_mb": round(index_bytes(index) / 2**20, 1), "rss_growth_mb": round(grown / 2**20, 1),
            "qps": round(qps, 1), "recall_at_10": round(recall_at_k(found, exact, K), 4),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        save(rows)
        del index
    if "milvus" in backends:
        rows += bench_milvus(name, database, queries, exact, kinds, target, hnsw_max, cache or Path("/tmp"),
                             lambda new: save(rows + new))
    flat = next((r for r in rows if r["kind"] == "flat" and r.get("backend", "faiss") == "faiss" and "qps" in r),
                None)
    for row in rows:
        if flat and "qps" in row:
            row["speedup_vs_exact"] = round(row["qps"] / flat["qps"], 1)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| data | N | backend | kind | index (factory, search params) | build s | index MB | RSS +MB | QPS "
             "| × exact | recall@10 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['dataset']} | {r['n']} | faiss | {r['kind']} | skipped: {r['skipped']} | | | | | | |")
            continue
        kind = r["kind"] if r["kind"] != "auto" else f"auto → {r['chosen']}"
        params = ", ".join(f"{k}={v}" for k, v in r["search_params"].items()) or "exact"
        lines.append(f"| {r['dataset']} | {r['n']} | {r.get('backend', 'faiss')} | {kind} | `{r['factory']}` ({params}) | {r['build_and_tune_seconds']} "
                     f"| {r['index_mb']} | {r['rss_growth_mb']} | {r['qps']:.0f} | {r.get('speedup_vs_exact', '')} "
                     f"| {r['recall_at_10']:.3f} |")
    return "\n".join(lines)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["emoji", "fashion-mnist", "synthetic-100k", "synthetic-1m"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--backends", nargs="+", default=["faiss"], choices=["faiss", "milvus"])
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hnsw-max", type=int, default=200_000, help="skip HNSW above this many vectors")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-index-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/index_cpu.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    faiss.omp_set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    rows, started = [], time.time()

    def save(new_rows: list[dict]) -> None:
        result = {"benchmark": "index", "k": K, "target_recall": args.target_recall, "threads": args.threads,
                  "faiss": faiss.__version__, "milvus_lite": _version("milvus-lite"), "pymilvus": _version("pymilvus"),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                  "generator": "clustered_embeddings(n, dim=512, centres=4096, seed=0, latent=64, noise=0.55, "
                               "zipf=1.1); queries: query_seed=12345",
                  "rows": rows + new_rows}
        write_json(args.out, result)

    load_at_start = os.getloadavg()
    for name in args.datasets:
        if name.startswith("synthetic-"):
            n = {"synthetic-100k": 100_000, "synthetic-1m": 1_000_000}[name]
            database, queries = synthetic(n, args.cache)
        else:
            database, queries = real_embeddings(name, args.cache, args.threads)
        rows += bench_dataset(name, database, queries, args.kinds, args.target_recall, args.hnsw_max, save,
                              tuple(args.backends), args.cache)
        del database
        save([])
    print(table(rows))


if __name__ == "__main__":
    main()
