"""FAISS index chosen from the collection size and a target recall, tuned by measuring.

Embeddings are L2-normalised, so inner product is cosine similarity and every index uses
``METRIC_INNER_PRODUCT``. ``kind="auto"`` picks:

- ``flat`` (exact) below ``flat_max`` vectors: a brute-force scan is then a few milliseconds a query;
- ``ivf`` (IVF-Flat) up to ``pq_min`` vectors, while the raw vectors fit ``memory_budget_gb``;
- ``ivfpq`` (OPQ rotation + IVF + product quantisation) beyond: 16x smaller codes for millions;
- ``ondisk`` (IVF with its inverted lists in a file, :mod:`cbir.index.ondisk`) when even the IVF-PQ codes
  would exceed ``memory_budget_gb`` (only where the index is built from shards on disk).

``hnsw`` is available when forced (fast, high recall, but slow to build on few cores, memory-hungry, no
GPU version and no removal in place). IVF uses about ``lists_per_sqrt``·√N lists (a power of two, FAISS's
4–16·√N rule) and trains k-means on at least 39 points per list (FAISS warns below that).

After building, :func:`tune_search` measures recall@k against exact search on a sample of the collection
(each query's own vector excluded) and raises ``nprobe`` / ``efSearch`` until the target is met.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

from cbir.devices import cuda_available
from cbir.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq", "ondisk")
BACKENDS = ("faiss", "milvus")
GPU_KINDS = frozenset({"flat", "ivf", "ivfpq"})  # the GPU cloner has no HNSW (and no CPU fallback)
SEARCH_KNOB = {"hnsw": "efSearch", "ivf": "nprobe", "ivfpq": "nprobe", "ondisk": "nprobe"}
MIN_POINTS_PER_LIST = 39  # FAISS: fewer training points per centroid than this gives poor k-means


@dataclass
class IndexOptions:
    """Everything that decides the index; the ``conf/index/*.yaml`` groups hold the same keys."""

    kind: str = "auto"
    target_recall: float = 0.95
    k: int = 10  # recall@k is measured at this k
    flat_max: int = 50_000
    pq_min: int = 2_000_000
    memory_budget_gb: float = 8.0  # raw float32 vectors above this go to ivfpq
    lists_per_sqrt: float = 4.0
    train_points_per_list: int = 50
    kmeans_iters: int = 20
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    pq_bytes_per_dim: float = 0.25  # PQ code bytes per dimension (512-d → 128 bytes: 16x smaller)
    opq: bool = True
    query_sample: int = 1000
    seed: int = 0
    use_gpu: bool | None = None  # None: when faiss has GPUs
    gpu_shard: bool = True  # several GPUs: split the index between them (False: a full copy on each)
    ondisk_codec: str = "Flat"  # what the on-disk IVF lists store: Flat (exact vectors), SQ8, PQ64x8, ...
    ondisk_block_vectors: int = 262_144  # vectors added per on-disk build step (its RAM: this x dim x 4 B)
    backend: str = "faiss"  # faiss: index files in the folder; milvus: a Milvus collection (cbir.index.milvus)
    uri: str | None = None  # milvus: a .db file (Milvus Lite; default <folder>/milvus.db) or http://host:19530
    milvus_collection: str | None = None  # milvus: the collection name (default cbir_<folder name>)
    milvus_index: str = "auto"  # milvus: auto (by size, as kind=auto) | FLAT | IVF_FLAT | HNSW | IVF_PQ
    insert_batch: int = 2000  # milvus: rows per insert request
    dba: int = 0  # > 0: database-side augmentation — each stored vector averaged with its dba nearest (cbir.index.dba)
    dba_alpha: float = 3.0  # their weights: similarity ** dba_alpha

    def __post_init__(self) -> None:
        if int(self.dba) < 0 or float(self.dba_alpha) < 0:
            raise ConfigError(f"index.dba={self.dba} / index.dba_alpha={self.dba_alpha}: need dba >= 0, alpha >= 0")
        if self.backend not in BACKENDS:
            raise ConfigError(f"index.backend={self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.kind not in KINDS:
            raise ConfigError(f"index.kind={self.kind!r}: choose one of {', '.join(KINDS)}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"index.target_recall={self.target_recall}: must be in (0, 1]")


@dataclass
class IndexPlan:
    kind: str
    factory: str
    reason: str
    nlist: int | None = None
    train_size: int | None = None
    params: dict = field(default_factory=dict)


def choose_kind(n: int, dim: int, options: IndexOptions, ondisk: bool = True) -> tuple[str, str]:
    """The index kind for ``n`` vectors of ``dim`` dimensions, and why (``ondisk=False``: the vectors are
    in memory anyway, so ``auto`` stops at ivfpq)."""
    if options.kind != "auto":
        return options.kind, f"forced: kind={options.kind}"
    gigabytes = n * dim * 4 / 2**30
    pq_gigabytes = n * (pq_shape(dim, n, options)[0] + 8) / 2**30  # IVF-PQ codes + 8-byte ids
    if ondisk and pq_gigabytes > options.memory_budget_gb:
        return "ondisk", (f"auto: even IVF-PQ codes of {n} vectors ({pq_gigabytes:.1f} GB) exceed "
                          f"memory_budget_gb={options.memory_budget_gb}: inverted lists on disk")
    if n < options.flat_max:
        return "flat", f"auto: {n} < flat_max={options.flat_max} vectors, exact search is fast enough"
    if n >= options.pq_min or gigabytes > options.memory_budget_gb:
        return "ivfpq", (f"auto: {n} vectors ({gigabytes:.1f} GB raw) >= pq_min={options.pq_min} "
                         f"or > memory_budget_gb={options.memory_budget_gb}")
    return "ivf", f"auto: flat_max={options.flat_max} <= {n} < pq_min={options.pq_min} vectors"


def nlist_for(n: int, options: IndexOptions) -> int:
    """Power of two at most ``lists_per_sqrt``·√n, and small enough that every list gets 39 training points."""
    wanted = max(1.0, options.lists_per_sqrt * math.sqrt(n))
    nlist = 2 ** int(math.floor(math.log2(wanted)))
    while nlist > 1 and nlist * MIN_POINTS_PER_LIST > n:
        nlist //= 2
    return nlist


def pq_shape(dim: int, train_size: int, options: IndexOptions) -> tuple[int, int]:
    """(sub-quantisers m dividing ``dim``, bits per code); 4-bit codes when there are too few points to
    train 256 centroids per sub-quantiser."""
    m = max(1, int(round(dim * options.pq_bytes_per_dim)))
    while dim % m:
        m -= 1
    nbits = 8 if train_size >= MIN_POINTS_PER_LIST * 256 else 4
    return m, nbits


def plan_index(n: int, dim: int, options: IndexOptions, ondisk: bool = True) -> IndexPlan:
    """The factory string and training-sample size for ``n`` vectors."""
    if n < 1:
        raise ConfigError("cannot build an index over an empty collection")
    kind, reason = choose_kind(n, dim, options, ondisk)
    if kind == "flat":
        return IndexPlan(kind, "IDMap2,Flat", reason)
    if kind == "hnsw":
        return IndexPlan(kind, f"IDMap2,HNSW{options.hnsw_m},Flat", reason,
                         params={"efConstruction": options.hnsw_ef_construction})
    nlist = nlist_for(n, options)
    train_size = min(n, max(MIN_POINTS_PER_LIST, options.train_points_per_list) * nlist)
    if kind == "ivf":
        return IndexPlan(kind, f"IVF{nlist},Flat", reason, nlist, train_size)
    if kind == "ondisk":
        return IndexPlan(kind, f"IVF{nlist},{options.ondisk_codec}", reason, nlist, train_size)
    m, nbits = pq_shape(dim, train_size, options)
    prefix = f"OPQ{m}," if options.opq else ""
    return IndexPlan(kind, f"{prefix}IVF{nlist},PQ{m}x{nbits}", reason, nlist, train_size)


def gpu_available() -> bool:
    """faiss built with GPU support and a GPU visible to it."""
    from cbir.index.gpu import gpu_count

    return gpu_count() > 0


def use_gpu_for(kind: str, options: IndexOptions | None = None) -> bool:
    wanted = options.use_gpu if options is not None else None
    return kind in GPU_KINDS and gpu_available() and wanted is not False


def create_index(plan: IndexPlan, dim: int) -> faiss.Index:
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efConstruction = plan.params["efConstruction"]
    return index


def train_and_add(index: faiss.Index, plan: IndexPlan, embeddings: np.ndarray, ids: np.ndarray,
                  options: IndexOptions) -> None:
    """Train on a random sample (IVF kinds), then add everything with ``ids``. With GPUs, IVF k-means
    assigns points on the GPU; the index itself stays a CPU index (saved as such)."""
    if plan.train_size is not None:
        rng = np.random.default_rng(options.seed)
        sample = embeddings[np.sort(rng.choice(len(embeddings), plan.train_size, replace=False))]
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = options.kmeans_iters
        ivf.cp.seed = options.seed
        if use_gpu_for(plan.kind, options):
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        index.train(np.ascontiguousarray(sample))
    for start in range(0, len(embeddings), 100_000):
        index.add_with_ids(np.ascontiguousarray(embeddings[start:start + 100_000]), ids[start:start + 100_000])


# ---------------------------------------------------------------------------------------------------
# Exact search (ground truth, and the torch-CUDA path) and recall
# ---------------------------------------------------------------------------------------------------
def torch_exact_search(database, queries: np.ndarray, k: int,
                       device: str = "cuda", chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with a matrix multiply + topk on ``device`` (for machines with CUDA
    torch but no faiss-gpu). ``database``: an array or a torch tensor. Returns row positions in it."""
    import torch

    base = torch.as_tensor(database, device=device)
    k = min(k, base.shape[0])
    scores, positions = [], []
    for start in range(0, len(queries), chunk):
        q = torch.as_tensor(np.ascontiguousarray(queries[start:start + chunk]), device=device)
        top = torch.topk(q @ base.T, k, dim=1)
        scores.append(top.values.float().cpu().numpy())
        positions.append(top.indices.cpu().numpy())
    return np.concatenate(scores), np.concatenate(positions).astype(np.int64)


def exact_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, row positions) by inner product: CUDA torch when present, else faiss's BLAS."""
    if cuda_available():
        return torch_exact_search(database, queries, k, device="cuda")
    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                     np.ascontiguousarray(database, dtype=np.float32), min(k, len(database)),
                     metric=faiss.METRIC_INNER_PRODUCT)


def drop_self(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's results without the query's own id, cut to ``k`` (rows are padded with -1)."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for row, (found, me) in enumerate(zip(ids, own)):
        kept = found[found != me][:k]
        out[row, :len(kept)] = kept
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k (-1 = no result)."""
    hits = [len(set(a[:k][a[:k] >= 0].tolist()) & set(e[:k][e[:k] >= 0].tolist())) / max(1, int((e[:k] >= 0).sum()))
            for a, e in zip(approx, exact)]
    return float(np.mean(hits)) if hits else 1.0


@dataclass
class RecallProbe:
    """A held-out query sample (vectors of the collection, their ids) and its exact top-k neighbours
    (self excluded)."""

    queries: np.ndarray
    query_ids: np.ndarray
    exact_ids: np.ndarray
    k: int

    @classmethod
    def sample(cls, embeddings: np.ndarray, ids: np.ndarray, k: int, size: int, seed: int = 0,
               avoid: np.ndarray | None = None) -> RecallProbe:
        rng = np.random.default_rng(seed + 1)
        pool = np.arange(len(embeddings))
        if avoid is not None and len(embeddings) - len(avoid) >= size:
            pool = np.setdiff1d(pool, avoid)  # held out from the training sample
        rows = np.sort(rng.choice(pool, min(size, len(pool)), replace=False))
        _, positions = exact_search(embeddings, embeddings[rows], k + 1)
        exact = drop_self(np.where(positions >= 0, ids[np.clip(positions, 0, None)], -1), ids[rows], k)
        return cls(np.ascontiguousarray(embeddings[rows]), ids[rows], exact, k)

    def recall(self, index: faiss.Index) -> float:
        _, found = index.search(self.queries, self.k + 1)
        return recall_at_k(drop_self(found, self.query_ids, self.k), self.exact_ids, self.k)


def knob_values(plan: IndexPlan) -> list[int]:
    if plan.kind == "hnsw":
        return [16, 32, 64, 128, 256, 512, 1024, 2048]
    return [v for v in (2 ** i for i in range(20)) if v <= plan.nlist]


def set_search_param(index: faiss.Index, name: str, value: int) -> None:
    space = faiss.GpuParameterSpace() if _is_gpu_index(index) else faiss.ParameterSpace()
    space.set_index_parameter(index, name, value)


def _is_gpu_index(index: faiss.Index) -> bool:
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexShards, faiss.IndexReplicas)) and index.count() > 0:
        return _is_gpu_index(index.at(0))  # several GPUs: GPU indexes under a CPU shards/replicas wrapper
    return type(index).__name__.startswith("Gpu")


def tune_search(index: faiss.Index, plan: IndexPlan, probe: RecallProbe, target: float) -> dict:
    """Raise the search knob (nprobe / efSearch) until recall@k on ``probe`` reaches ``target``; returns
    the chosen parameters, the measured recall and the whole curve."""
    knob = SEARCH_KNOB.get(plan.kind)
    if knob is None:
        recall = probe.recall(index)
        return {"params": {}, "recall": recall, "target_met": recall >= target, "curve": []}
    curve = []

    def measure(value: int) -> float:
        set_search_param(index, knob, value)
        start = time.perf_counter()
        recall = probe.recall(index)
        qps = len(probe.queries) / max(time.perf_counter() - start, 1e-9)
        curve.append({knob: value, "recall": round(recall, 4), "qps": round(qps, 1)})
        log.info("index tuning: %s=%d recall@%d=%.4f (%.0f queries/s)", knob, value, probe.k, recall, qps)
        return recall

    below = None  # the largest value known to miss the target
    for value in knob_values(plan):
        recall = measure(value)
        if recall >= target:
            # doubling overshoots: bisect between the last miss and this hit for the smallest (fastest)
            # value that still meets the target
            while below is not None and value - below > max(1, below // 8):
                middle = (below + value) // 2
                middle_recall = measure(middle)
                if middle_recall >= target:
                    value, recall = middle, middle_recall
                else:
                    below = middle
            set_search_param(index, knob, value)
            curve.sort(key=lambda c: c[knob])
            return {"params": {knob: value}, "recall": recall, "target_met": True, "curve": curve}
        below = value
    best = max(curve, key=lambda c: (c["recall"], -c[knob]))
    set_search_param(index, knob, best[knob])
    log.warning("index: target recall@%d=%.3f not reached by %s (best %.4f at %s=%d); build with another "
                "kind (e.g. --kind ivf or flat) to reach it", probe.k, target, plan.factory, best["recall"],
                knob, best[knob])
    return {"params": {knob: best[knob]}, "recall": best["recall"], "target_met": False, "curve": curve}


def build_index(embeddings: np.ndarray, ids: np.ndarray, options: IndexOptions | None = None
                ) -> tuple[faiss.Index, dict]:
    """Build, train, fill and tune an index over ``embeddings`` (rows are ``ids``); returns the CPU index
    and the description written beside it (factory string, parameters, measured recall, timings)."""
    options = options or IndexOptions()
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, dim = embeddings.shape
    plan = plan_index(n, dim, options, ondisk=False)
    if plan.kind == "ondisk":
        raise ConfigError("index.kind=ondisk is built from embedding shards into a folder: use "
                          "build_collection_index / `cbir index build --kind ondisk` (or cbir.index.ondisk)")
    log.info("index: %s (%s)", plan.factory, plan.reason)
    start = time.perf_counter()
    index = create_index(plan, dim)
    train_and_add(index, plan, embeddings, ids, options)
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    avoid = None
    if plan.train_size is not None:  # the same sample train_and_add used
        avoid = np.sort(np.random.default_rng(options.seed).choice(n, plan.train_size, replace=False))
    probe = RecallProbe.sample(embeddings, ids, options.k, options.query_sample, options.seed, avoid)
    tuned = tune_search(index, plan, probe, options.target_recall)
    info = {
        "kind": plan.kind,
        "factory": plan.factory,
        "reason": plan.reason,
        "metric": "inner_product",
        "dim": int(dim),
        "ntotal": int(index.ntotal),
        "nlist": plan.nlist,
        "train_size": plan.train_size,
        "build_params": plan.params,
        "search_params": tuned["params"],
        f"recall_at_{options.k}": round(float(tuned["recall"]), 4),
        "recall_k": options.k,
        "target_recall": options.target_recall,
        "target_met": bool(tuned["target_met"]),
        "recall_queries": int(len(probe.queries)),
        "recall_curve": tuned["curve"],
        "build_seconds": round(build_seconds, 2),
        "tune_seconds": round(time.perf_counter() - start, 2),
        "options": asdict(options),
    }
    return index, info
