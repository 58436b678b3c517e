"""The index on disk and in memory: FAISS index + id store + description.

A saved index is a folder; every save writes a complete new *generation* beside the old one and switches
to it with one atomic rename:

- ``index-<generation>.faiss``: the FAISS index (always a CPU index), whose ids are the store's ids;
- ``ids-<generation>.sqlite``: the id store (:mod:`cbir.index.idstore`: id → path, label, metadata), opened
  read-only and queried by id, so a search process's memory does not grow with the collection;
- ``index.json``: kind, factory string, search parameters, measured recall, dimension, count, and which
  files are the current generation with their SHA-256. It is written last (temp + rename), so it is the
  switch: a crash before it leaves the old generation current, after it the new one; the next save
  removes the files of older generations and half-written temporaries. :meth:`CbirIndex.load` checks the
  hashes (a flipped bit is one line naming the file) and that the files agree.
- ``lists.ivfdata`` for ``kind=ondisk`` only: the inverted lists, memory-mapped read-only when loaded
  (:mod:`cbir.index.ondisk`); such an index is rebuilt, not edited.

Writers take ``.cbir-index.lock`` in the folder (:func:`index_writer`): a second ``add`` or ``remove`` waits
for the first and then works on what the first saved, so neither run's images are lost. Folders written
before generations (``index.faiss``, ``ids.jsonl``) or before the SQLite store (``ids-<generation>.jsonl``) load
as they are and are converted by the next save.

Ids are stable: they are assigned once (``next_id`` grows) and survive ``add`` and ``remove``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from cbir.devices import cuda_available
from cbir.index.builder import (
    GPU_KINDS,
    SEARCH_KNOB,
    IndexOptions,
    build_index,
    gpu_available,
    set_search_param,
    torch_exact_search,
)
from cbir.index.errors import IndexFilesError, ReadOnlyIndexError, VectorsUnavailableError
from cbir.index.filters import parse_filter
from cbir.index.idstore import IdStore
from cbir.index.ondisk import place_lists_beside, read_ondisk_index
from cbir.index.vectors import new_embeddings, query_matrix
from cbir.io import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, INFO_FILE = "index.faiss", "ids.jsonl", "index.json"  # the first two: pre-generation names
LOCK_FILE = ".cbir-index.lock"
CRASH_ENV = "CBIR_INDEX_CRASH_AT"  # fault-injection tests: exit abruptly at this save step
HNSW_DEFAULT_EF_SEARCH = 16  # faiss's own, when the build recorded none
TORCH_DEVICE = "cuda"  # where the torch exact-search path runs (tests point it at the CPU)


_DIRECT_MAP_LOCK = threading.Lock()


class CbirIndex:
    """A FAISS index over embeddings, with the id store that names what each id is."""

    def __init__(self, index: faiss.Index, store: IdStore, info: dict) -> None:
        self.index = index
        self.store = store
        self.info = info
        self.path: Path | None = None  # the folder it was loaded from / saved to
        self._search_backend: tuple[str, object] | None = None
        self._filter_ids: dict[str, np.ndarray] = {}

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, embeddings: np.ndarray, paths: Sequence[str], labels: Sequence[str | None] | None = None,
              metadata: Sequence[dict | None] | None = None, options: IndexOptions | None = None) -> CbirIndex:
        """Index ``embeddings`` (row i is image ``paths[i]``) with the kind ``options`` choose."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(paths):
            raise ValueError(f"embeddings {embeddings.shape} do not match {len(paths)} paths")
        store = IdStore()
        ids = store.add(paths, labels, metadata)
        index, info = build_index(embeddings, ids, options)
        return cls(index, store, info)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return int(self.index.d)

    @property
    def metadata(self) -> dict:
        """What ``index.json`` holds: kind, factory, search parameters, measured recall, model hashes."""
        return self.info

    @property
    def kind(self) -> str:
        return str(self.info.get("kind"))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    # -- searching ----------------------------------------------------------------------------------
    def search(self, queries, k: int = 10,
               filter: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first; ids are -1 where the index has fewer than k images (or
        fewer than k match ``filter``, a label clause of :mod:`cbir.index.filters`)."""
        queries = query_matrix(queries, self.embedding_dim, k)
        label_filter = parse_filter(filter)
        if len(self) == 0:
            return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        if label_filter is not None:
            return self._filtered_search(queries, k, label_filter)
        backend, engine = self.search_backend()
        if backend == "torch-cuda":
            vectors, ids = engine
            scores, positions = torch_exact_search(vectors, queries, k, device=TORCH_DEVICE)
            found = ids[positions]
            if positions.shape[1] < k:
                pad = k - positions.shape[1]
                scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
                found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
            return scores, found
        scores, ids = engine.search(queries, k)
        if backend == "faiss-cpu":
            scores, ids = self._fill_short_rows(queries, k, scores, ids)
        return scores, ids

    def _filtered_search(self, queries: np.ndarray, k: int, label_filter) -> tuple[np.ndarray, np.ndarray]:
        """Search only the ids whose label matches: a FAISS id selector on the CPU index, widened like
        :meth:`_fill_short_rows` when the probed lists hold fewer than ``k`` matches."""
        allowed = self.ids_matching(label_filter)
        if len(allowed) == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        selector = faiss.IDSelectorBatch(allowed)
        params = self._search_params(selector, k, len(allowed) / max(len(self), 1))
        search = getattr(self.index, "search_numpy", None) or self.index.search
        scores, ids = search(queries, k, params=params)
        return self._fill_short_rows(queries, k, scores, ids, selector=selector, wanted=min(k, len(allowed)))

    def ids_matching(self, label_filter) -> np.ndarray:
        """Ids whose label passes ``label_filter`` (remembered per filter until the index changes)."""
        key = label_filter.text
        if key not in self._filter_ids:
            self._filter_ids[key] = np.array([i for i, label in self.store.id_labels() if label_filter.matches(label)],
                                             dtype=np.int64)
        return self._filter_ids[key]

    def _search_params(self, selector, k: int, selectivity: float) -> faiss.SearchParameters:
        """The index's tuned ``nprobe`` / ``efSearch`` divided by the fraction of images the filter lets
        through (a 4 % filter leaves 1 in 25 candidates, so the search looks 25 times as far to keep its
        recall), with ``selector`` added."""
        knob = SEARCH_KNOB.get(self.kind)
        widen = 1.0 / max(selectivity, 1e-9)
        if knob == "nprobe":
            ivf = faiss.extract_index_ivf(self.index)
            nprobe = min(int(ivf.nlist), int(math.ceil(max(1, int(ivf.nprobe)) * widen)))
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        if knob == "efSearch":
            ef = max(int(self.info.get("search_params", {}).get("efSearch", HNSW_DEFAULT_EF_SEARCH)), k)
            return faiss.SearchParametersHNSW(sel=selector, efSearch=min(int(math.ceil(ef * widen)), 4096))
        return faiss.SearchParameters(sel=selector)

    def _fill_short_rows(self, queries: np.ndarray, k: int, scores: np.ndarray, ids: np.ndarray,
                         selector=None, wanted: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """An IVF index returns only what its probed lists hold, HNSW only ``efSearch`` candidates: a large
        ``k`` would be cut silently. Rows with fewer than ``min(k, size)`` hits are searched again with
        ``nprobe`` (IVF) or ``efSearch`` (HNSW) doubled until they fill or every list is probed."""
        wanted = min(k, len(self)) if wanted is None else wanted
        short = (ids >= 0).sum(axis=1) < wanted
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning) replaces Index.search with a wrapper
        # that takes no params; it keeps the NumPy method as search_numpy
        search = getattr(self.index, "search_numpy", None) or self.index.search
        for params in self._widening_params(k):
            if not short.any():
                break
            if selector is not None:
                params.sel = selector
            more_scores, more_ids = search(queries[short], k, params=params)
            scores[short], ids[short] = more_scores, more_ids
            short = (ids >= 0).sum(axis=1) < wanted
        return scores, ids

    def _widening_params(self, k: int):
        """Search parameters that look further each time: IVF ``nprobe`` ×2 up to ``nlist``, HNSW
        ``efSearch`` ≥ k then ×2 (at most 8 rounds); nothing for exact kinds."""
        knob = SEARCH_KNOB.get(self.kind)
        if knob == "nprobe":
            ivf = faiss.extract_index_ivf(self.index)
            nprobe = max(1, int(ivf.nprobe))
            while nprobe < ivf.nlist:
                nprobe = min(ivf.nlist, nprobe * 2)
                yield faiss.SearchParametersIVF(nprobe=nprobe)
        elif knob == "efSearch":
            ef = max(int(self.info.get("search_params", {}).get("efSearch", HNSW_DEFAULT_EF_SEARCH)), k)
            for _ in range(8):
                yield faiss.SearchParametersHNSW(efSearch=ef)
                ef *= 2

    def search_backend(self) -> tuple[str, object]:
        """Where searches run: ``faiss-gpu`` (a GPU copy of the index), ``torch-cuda`` (exact search as a
        CUDA matrix multiply, for flat indexes when faiss has no GPU), or ``faiss-cpu``."""
        if self._search_backend is None:
            self._search_backend = self._choose_backend()
        return self._search_backend

    def _choose_backend(self) -> tuple[str, object]:
        if self.kind in GPU_KINDS and gpu_available():
            from cbir.index.gpu import clone_to_gpus

            try:
                backend, gpu_index = clone_to_gpus(self.index, shard=self.info.get("options", {}).get("gpu_shard", True))
                for name, value in self.info.get("search_params", {}).items():
                    set_search_param(gpu_index, name, value)
                return backend, gpu_index
            except (RuntimeError, AttributeError) as exc:  # the cloner has no CPU fallback of its own
                log.warning("index: cannot copy %s to the GPU (%s); searching on the CPU",
                            self.info.get("factory"), exc)
        if self.kind == "flat" and cuda_available():
            import torch

            flat = faiss.downcast_index(self.index.index)
            vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            return "torch-cuda", (torch.as_tensor(vectors.copy(), device=TORCH_DEVICE), ids)
        return "faiss-cpu", self.index

    def lookup(self, ids: Iterable[int]) -> list[dict | None]:
        """The store records of ``ids`` (None for -1 or a removed id)."""
        return self.store.lookup(ids)

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        """The stored embeddings of ``ids`` (float32, one row each; IVF-PQ gives its compressed approximation),
        for query expansion. Flat and HNSW indexes keep an id → row map; an IVF index gets one the first time
        (a hash table of its ids, ~16 bytes an image); the on-disk kind has none (VectorsUnavailableError)."""
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        if self.kind == "ondisk":
            raise VectorsUnavailableError(f"the on-disk index {self.path or ''} cannot give back its vectors, which "
                                          "query expansion (rerank=aqe) needs: search it with rerank=none")
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            with _DIRECT_MAP_LOCK:  # built once, while no other thread of this process builds it
                if ivf.direct_map.type == faiss.DirectMap.NoMap:
                    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        try:
            return np.asarray(self.index.reconstruct_batch(ids), dtype=np.float32)
        except RuntimeError as exc:  # an id the index does not hold
            raise KeyError(f"index {self.path or ''}: no vector for some of ids {ids[:5].tolist()}: "
                           f"{str(exc).splitlines()[0][:200]}") from None

    # -- what it holds (the interface every backend offers: commands, Searcher and service use only these)
    @property
    def labelled(self) -> bool:
        """Whether any indexed image has a label (k-NN classification and label filters need them)."""
        return self.store.labelled()

    def paths(self) -> set[str]:
        """The source of every indexed image."""
        return self.store.paths()

    def ids_of_paths(self, paths: Iterable[str]) -> np.ndarray:
        return self.store.ids_of_paths(paths)

    def unknown_ids(self, ids: Iterable[int]) -> list[int]:
        """Those of ``ids`` the index does not hold."""
        return self.store.unknown_ids(ids)

    def first_id(self) -> int | None:
        return self.store.first_id()

    # -- changing -----------------------------------------------------------------------------------
    def add(self, embeddings: np.ndarray, paths: Sequence[str], labels: Sequence[str | None] | None = None,
            metadata: Sequence[dict | None] | None = None) -> np.ndarray:
        """Add images to the trained index; returns their new ids. (IVF lists keep their centroids: after
        adding far more than the index was built with, rebuild it.)"""
        self._check_writable("add images to")
        embeddings = new_embeddings(embeddings, paths, self.embedding_dim)
        ids = self.store.add(paths, labels, metadata)
        self.index.add_with_ids(embeddings, ids)
        self._changed()
        return ids

    def remove(self, ids: Iterable[int]) -> int:
        """Remove ``ids`` (unknown ids are ignored); returns how many were removed."""
        self._check_writable("remove images from")
        ids = [int(i) for i in ids]
        unknown = set(self.store.unknown_ids(ids))
        ids = np.asarray(sorted({i for i in ids if i not in unknown}), dtype=np.int64)
        if len(ids) == 0:
            return 0
        try:
            removed = int(self.index.remove_ids(ids))
        except RuntimeError:  # HNSW cannot remove in place: rebuild its graph from the stored vectors
            removed = self._rebuild_without(ids)
        self.store.remove(ids)
        self._changed()
        return removed

    def remove_paths(self, paths: Iterable[str]) -> int:
        return self.remove(self.store.ids_of_paths(paths))

    def _rebuild_without(self, ids: np.ndarray) -> int:
        keep = np.setdiff1d(self.store.ids(), ids)
        vectors = self.index.reconstruct_batch(keep) if len(keep) else np.zeros((0, self.embedding_dim), np.float32)
        fresh = faiss.index_factory(self.embedding_dim, self.info["factory"], faiss.METRIC_INNER_PRODUCT)
        inner = faiss.downcast_index(faiss.downcast_index(fresh).index)
        old = faiss.downcast_index(faiss.downcast_index(self.index).index)
        inner.hnsw.efConstruction = old.hnsw.efConstruction
        inner.hnsw.efSearch = old.hnsw.efSearch
        if len(keep):
            fresh.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), keep)
        removed = int(self.index.ntotal - fresh.ntotal)
        self.index = fresh
        return removed

    def _check_writable(self, action: str) -> None:
        if self.kind == "ondisk":
            raise ReadOnlyIndexError(f"cannot {action} the on-disk index {self.path or ''} in place: build it "
                                     "again (`cbir index build --kind ondisk`; finished extraction shards are reused)")

    def _changed(self) -> None:
        self._search_backend = None
        self._filter_ids = {}
        self.info["ntotal"] = int(self.index.ntotal)

    # -- files --------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write a new generation into ``folder`` and switch to it (see the module docstring)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        generation = max(int(self.info.get("generation", 0)), _current_generation(folder)) + 1
        names = {"index": f"index-{generation:06d}.faiss", "ids": f"ids-{generation:06d}.sqlite"}
        info = dict(self.info, ntotal=int(self.index.ntotal), dim=self.embedding_dim,
                    next_id=int(self.store.next_id), generation=generation, files=names)
        if self.kind == "ondisk":
            place_lists_beside(self.index, folder)
        _crash_point("index")
        with atomic_path(folder / names["index"]) as temp:
            faiss.write_index(self.index, str(temp))
        _crash_point("ids")
        self.store.save(folder / names["ids"])
        info["sha256"] = {name: sha256_file(folder / name) for name in names.values()}
        _crash_point("info")
        atomic_write_json(folder / INFO_FILE, info)  # the switch
        self.info = info
        _crash_point("cleanup")
        _remove_stale_files(folder, set(names.values()))
        self.path = folder
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CbirIndex:
        folder = Path(folder)
        if not folder.is_dir():
            raise IndexFilesError(f"index folder {folder} does not exist (build one with `cbir index build`)")
        if not (folder / INFO_FILE).is_file():
            raise IndexFilesError(f"index folder {folder} lacks {INFO_FILE}: it is not a cbir index or its "
                                  "build did not finish; build it again")
        try:
            info = json.loads((folder / INFO_FILE).read_text())
        except ValueError as exc:
            raise IndexFilesError(f"{folder / INFO_FILE}: not readable JSON ({exc}); build the index again") from None
        names = info.get("files") or {"index": INDEX_FILE, "ids": IDS_FILE}
        missing = [name for name in names.values() if not (folder / name).is_file()]
        if missing:
            raise IndexFilesError(f"index folder {folder} lacks {', '.join(missing)}: it is not a cbir index "
                                  "or its build did not finish; build it again")
        for name, expected in (info.get("sha256") or {}).items():
            if sha256_file(folder / name) != expected:
                raise IndexFilesError(f"index folder {folder}: {name} fails its integrity check (SHA-256 differs "
                                      "from index.json: the file changed on disk); build the index again")
        try:
            if info.get("kind") == "ondisk":
                index = read_ondisk_index(folder / names["index"])
            else:
                index = faiss.read_index(str(folder / names["index"]))
        except (ValueError, RuntimeError) as exc:
            raise IndexFilesError(f"index folder {folder}: cannot read it ({' '.join(str(exc).split())[:200]}); "
                                  "build it again") from None
        store = IdStore.load(folder / names["ids"], int(info.get("next_id", 0)))
        if not index.ntotal == len(store) == info.get("ntotal") or index.d != info.get("dim"):
            raise IndexFilesError(
                f"index folder {folder}: files disagree ({names['index']}: {index.ntotal} vectors of {index.d}-d, "
                f"{names['ids']}: {len(store)} images, index.json: {info.get('ntotal')} of {info.get('dim')}-d); "
                "they come from different builds: build the index again")
        loaded = cls(index, store, info)
        loaded.path = folder
        for name, value in info.get("search_params", {}).items():
            set_search_param(index, name, value)
        return loaded

    def describe(self) -> str:
        recall_key = f"recall_at_{self.info.get('recall_k', 10)}"
        return (f"{len(self)} images, {self.embedding_dim}-d, {self.info.get('factory')} ({self.info.get('reason')}); "
                f"search {self.info.get('search_params') or 'exact'}; {recall_key}={self.info.get(recall_key)} "
                f"(target {self.info.get('target_recall')})")


def load_index(folder: str | os.PathLike):
    """The index in ``folder``: a :class:`CbirIndex` (FAISS files), or a :class:`cbir.index.milvus.MilvusIndex`
    when its ``index.json`` names the Milvus backend."""
    info_path = Path(folder) / INFO_FILE
    try:
        backend = json.loads(info_path.read_text()).get("backend", "faiss") if info_path.is_file() else "faiss"
    except (ValueError, AttributeError):
        backend = "faiss"  # CbirIndex.load names the broken file
    if backend == "milvus":
        from cbir.index.milvus import MilvusIndex

        return MilvusIndex.load(folder)
    return CbirIndex.load(folder)


@contextmanager
def index_writer(folder: str | os.PathLike, timeout: float = 600.0) -> Iterator[CbirIndex]:
    """The index in ``folder``, loaded after taking the folder's writer lock and held until the block ends:
    changes saved inside the block are never lost to a concurrent writer, which waits (up to ``timeout``
    seconds, then a clear error) and then loads what this one saved."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if not folder.is_dir():
        raise IndexFilesError(f"index folder {folder} does not exist (build one with `cbir index build`)")
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise IndexFilesError(f"index folder {folder}: another process has been changing it for {timeout:.0f}s "
                              f"(lock {folder / LOCK_FILE}); try again when it has finished") from None
    try:
        yield load_index(folder)
    finally:
        lock.release()


def _current_generation(folder: Path) -> int:
    try:
        return int(json.loads((folder / INFO_FILE).read_text()).get("generation", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _remove_stale_files(folder: Path, keep: set[str]) -> None:
    """Files of older generations, pre-generation files and temporaries left by a crashed save."""
    stale = [*folder.glob("index-*.faiss"), *folder.glob("ids-*.jsonl"), *folder.glob("ids-*.sqlite"),
             *folder.glob(".index-*.tmp"),
             *folder.glob(".ids-*.tmp"), folder / INDEX_FILE, folder / IDS_FILE]
    for path in stale:
        if path.name not in keep and path.is_file():
            path.unlink(missing_ok=True)


def _crash_point(step: str) -> None:
    """Fault injection for the crash tests: with ``CBIR_INDEX_CRASH_AT=<step>`` the process dies here, as a
    ``kill -9`` would (no cleanup, no exception handlers)."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(70)
