"""IVF index whose inverted lists live in one file on disk, for collections beyond RAM.

FAISS's recipe (``faiss/contrib/ondisk.py``, ``demo_ondisk_ivf.py``), fed from extraction shards that
are never all in memory:

1. train the IVF centroids on a sample of rows read from the memory-mapped ``.npy`` shards;
2. fill one IVF index per block of ``ondisk_block_vectors`` rows and write it to disk (resumable: a
   finished block file is kept and skipped by a rerun);
3. merge the blocks' inverted lists into one ``OnDiskInvertedLists`` file, ``lists.ivfdata``, beside
   ``index.faiss`` (which holds only the centroids and the lists' offsets);
4. tune ``nprobe`` to the target recall against exact search computed by streaming over the shards.

A search memory-maps ``lists.ivfdata`` read-only, so it reads only the lists it probes; the process's own
(anonymous) memory is the centroids, the offsets and the id store. The index is read-only: images are
added or removed by building again (the extraction shards are reused).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth
from faiss.contrib.ondisk import merge_ondisk
from tqdm.auto import tqdm

from cbir.errors import ConfigError
from cbir.index.builder import IndexOptions, RecallProbe, drop_self, plan_index, tune_search
from cbir.index.errors import ReadOnlyIndexError  # noqa: F401 - raised by the store for this kind
from cbir.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

LISTS_FILE = "lists.ivfdata"
BUILD_DIR = "ondisk-build"
READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY  # lists beside index.faiss, mmapped read-only


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """FAISS's on-disk code prints progress with C ``printf``; keep the CLI's stdout for its results."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class VectorShards:
    """Embeddings stored as ``.npy`` files (one per extraction shard) and the ids of their rows, read one
    block at a time through memory maps."""

    files: list[Path]
    ids: list[np.ndarray]

    def __post_init__(self) -> None:
        self.files = [Path(f) for f in self.files]
        arrays = [np.load(f, mmap_mode="r") for f in self.files]
        if not arrays:
            raise ConfigError("on-disk index: no embedding shards to build from")
        dims = {a.shape[1] for a in arrays if a.ndim == 2}
        if len(dims) != 1 or any(a.ndim != 2 for a in arrays):
            raise ConfigError(f"on-disk index: shards {self.files[0].parent} are not 2-d arrays of one dimension")
        for path, array, ids in zip(self.files, arrays, self.ids, strict=True):
            if len(array) != len(ids):
                raise ConfigError(f"on-disk index: {path} has {len(array)} rows but {len(ids)} ids")
        self.dim = dims.pop()
        self.lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])

    @classmethod
    def with_consecutive_ids(cls, files: Sequence[os.PathLike], ids: np.ndarray) -> VectorShards:
        """Shards whose rows, in file order, are ``ids`` (as an extraction and its id store give them)."""
        lengths = [len(np.load(f, mmap_mode="r")) for f in files]
        if sum(lengths) != len(ids):
            raise ConfigError(f"on-disk index: {sum(lengths)} embeddings in the shards but {len(ids)} ids")
        return cls(list(files), np.split(np.asarray(ids, dtype=np.int64), np.cumsum(lengths)[:-1]))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def all_ids(self) -> np.ndarray:
        return np.concatenate(self.ids)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Rows at sorted global ``positions`` (only those rows are read)."""
        out = np.empty((len(positions), self.dim), np.float32)
        shard_of = np.searchsorted(self.starts, positions, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = np.load(self.files[shard], mmap_mode="r")[positions[mask] - self.starts[shard]]
        return out

    def blocks(self, block_vectors: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(vectors, ids) of consecutive blocks of about ``block_vectors`` rows (whole shards, at least one)."""
        for group in self._block_groups(block_vectors):
            vectors = np.concatenate([np.load(self.files[shard], mmap_mode="r") for shard in group])
            yield np.ascontiguousarray(vectors, dtype=np.float32), np.concatenate([self.ids[s] for s in group])

    def block_count(self, block_vectors: int) -> int:
        return sum(1 for _ in self._block_groups(block_vectors))

    def _block_groups(self, block_vectors: int) -> Iterator[list[int]]:
        """The shard numbers of each block: shards are taken in order until the block holds
        ``block_vectors`` rows."""
        group, size = [], 0
        for shard, length in enumerate(self.lengths):
            group.append(shard)
            size += int(length)
            if size >= block_vectors:
                yield group
                group, size = [], 0
        if group:
            yield group

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product over all shards, one block at a time (scores, global positions)."""
        def chunks() -> Iterator[np.ndarray]:
            for path in self.files:
                yield np.ascontiguousarray(np.load(path, mmap_mode="r"), dtype=np.float32)

        return knn_ground_truth(np.ascontiguousarray(queries, dtype=np.float32), chunks(), k,
                                metric_type=faiss.METRIC_INNER_PRODUCT)

    def fingerprint(self) -> dict:
        return {"files": [f.name for f in self.files], "lengths": self.lengths.tolist(),
                "first_ids": [int(i[0]) if len(i) else None for i in self.ids]}


def ondisk_lists(index: faiss.Index) -> faiss.OnDiskInvertedLists | None:
    """The on-disk inverted lists of an IVF index, None for an index held in memory."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def read_ondisk_index(path: str | os.PathLike) -> faiss.Index:
    """An on-disk index written by :func:`build_ondisk_index`, its lists memory-mapped read-only from the
    ``lists.ivfdata`` beside it (wherever the folder has moved)."""
    with stdout_to_stderr():
        return faiss.read_index(str(path), READ_FLAGS)


def place_lists_beside(index: faiss.Index, folder: Path) -> None:
    """Make ``folder/lists.ivfdata`` hold ``index``'s lists (a copy when the index is saved elsewhere)."""
    lists = ondisk_lists(index)
    if lists is None:
        return
    source, target = Path(lists.filename), folder / LISTS_FILE
    if source.resolve() != target.resolve():
        with atomic_path(target) as temp:
            shutil.copyfile(source, temp)
        lists.filename = str(target)


# ---------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------
def build_ondisk_index(shards: VectorShards, folder: str | os.PathLike, options: IndexOptions | None = None,
                       progress: bool = True) -> tuple[faiss.Index, dict]:
    """Train, fill block by block, merge into ``folder/lists.ivfdata`` and tune an on-disk IVF index over
    ``shards``; returns the index (lists memory-mapped) and its description. ``folder/ondisk-build`` holds
    the trained index and finished blocks until the merge, so a killed build resumes."""
    options = options or IndexOptions(kind="ondisk")
    if options.ondisk_block_vectors < 1:
        raise ConfigError(f"index.ondisk_block_vectors={options.ondisk_block_vectors}: must be >= 1")
    folder = Path(folder)
    work = folder / BUILD_DIR
    n, dim = len(shards), shards.dim
    plan = plan_index(n, dim, options)  # auto: says why it chose ondisk
    if plan.kind != "ondisk":
        plan = plan_index(n, dim, IndexOptions(**{**asdict(options), "kind": "ondisk"}))
    log.info("index: on-disk %s over %d vectors (%s)", plan.factory, n, plan.reason)
    recipe = {"factory": plan.factory, "train_size": plan.train_size, "seed": options.seed,
              "kmeans_iters": options.kmeans_iters, "block_vectors": options.ondisk_block_vectors,
              "shards": shards.fingerprint()}
    _prepare_build_dir(work, recipe)
    timings = {}
    start = time.perf_counter()
    train_rows = np.sort(np.random.default_rng(options.seed).choice(n, plan.train_size, replace=False))
    trained_path = work / "trained.index"
    if not trained_path.is_file():
        index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter, ivf.cp.seed = options.kmeans_iters, options.seed
        index.train(shards.rows(train_rows))
        _write_index(index, trained_path)
    timings["train_seconds"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    block_files = []
    bar = tqdm(total=shards.block_count(options.ondisk_block_vectors), unit="block", desc="on-disk index",
               disable=not progress)
    for number, (vectors, ids) in enumerate(shards.blocks(options.ondisk_block_vectors)):
        path = work / f"block_{number:05d}.index"
        if not path.is_file():
            block = faiss.read_index(str(trained_path))
            block.add_with_ids(vectors, ids)
            _write_index(block, path)
        block_files.append(str(path))
        bar.update(1)
    bar.close()
    timings["add_seconds"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    index = faiss.read_index(str(trained_path))
    merged = work / LISTS_FILE
    merged.unlink(missing_ok=True)  # a merge killed half-way
    with stdout_to_stderr():
        merge_ondisk(index, block_files, str(merged))
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(merged, folder / LISTS_FILE)
    ondisk_lists(index).filename = str(folder / LISTS_FILE)  # the mapping follows the renamed file
    timings["merge_seconds"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    probe = streamed_recall_probe(shards, options.k, options.query_sample, options.seed, avoid=train_rows)
    tuned = tune_search(index, plan, probe, options.target_recall)
    info = {
        "kind": "ondisk", "factory": plan.factory, "reason": plan.reason, "metric": "inner_product",
        "dim": int(dim), "ntotal": int(index.ntotal), "nlist": plan.nlist, "train_size": plan.train_size,
        "build_params": {}, "search_params": tuned["params"],
        f"recall_at_{options.k}": round(float(tuned["recall"]), 4), "recall_k": options.k,
        "target_recall": options.target_recall, "target_met": bool(tuned["target_met"]),
        "recall_queries": int(len(probe.queries)), "recall_curve": tuned["curve"],
        "build_seconds": round(timings["train_seconds"] + timings["add_seconds"] + timings["merge_seconds"], 2),
        **timings, "tune_seconds": round(time.perf_counter() - start, 2),
        "lists_file": LISTS_FILE, "lists_bytes": int((folder / LISTS_FILE).stat().st_size),
        "blocks": len(block_files), "options": asdict(options),
    }
    shutil.rmtree(work, ignore_errors=True)
    return index, info


def streamed_recall_probe(shards: VectorShards, k: int, size: int, seed: int = 0,
                          avoid: np.ndarray | None = None) -> RecallProbe:
    """:class:`RecallProbe` of ``size`` collection vectors (held out from the training sample), their exact
    neighbours found by streaming over the shards."""
    rng = np.random.default_rng(seed + 1)
    n = len(shards)
    count = min(size, n)
    if avoid is not None and n - len(avoid) >= count:
        keep = np.ones(n, bool)
        keep[avoid] = False
        rows = np.sort(rng.choice(np.flatnonzero(keep), count, replace=False))
    else:
        rows = np.sort(rng.choice(n, count, replace=False))
    queries = shards.rows(rows)
    ids = shards.all_ids()
    _, positions = shards.exact_search(queries, min(k + 1, n))
    found = np.where(positions >= 0, ids[np.clip(positions, 0, None)], -1)
    return RecallProbe(queries, ids[rows], drop_self(found, ids[rows], k), k)


def _prepare_build_dir(work: Path, recipe: dict) -> None:
    """Keep the finished steps of a killed build of the same recipe; start over for any other."""
    path = work / "recipe.json"
    if work.is_dir():
        try:
            same = json.loads(path.read_text()) == recipe
        except (OSError, ValueError):
            same = False
        if same:
            log.info("index: resuming the on-disk build in %s", work)
            return
        shutil.rmtree(work)
    work.mkdir(parents=True)
    atomic_write_json(path, recipe)


def _write_index(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as temp:
        faiss.write_index(index, str(temp))
