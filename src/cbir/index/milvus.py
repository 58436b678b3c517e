"""The Milvus backend: vectors, paths and labels in a Milvus collection, behind the same interface as the FAISS
folder (:class:`cbir.index.store.CbirIndex`), so ``cbir index``, :class:`cbir.Searcher`, ``search.py`` and the
service work on either.

An index built with ``backend=milvus`` is still a folder, holding only ``index.json``: the ``uri`` of the
engine, the collection name, the index type and its tuned search parameters, measured recall, the model's
fingerprint. The ``uri`` is either

- a ``.db`` file: Milvus Lite (PyPI ``milvus-lite``), the engine embedded in this process; by default
  ``milvus.db`` inside the index folder (stored relative, so the folder can move). One process at a time may
  open it;
- ``http(s)://host:19530``: a Milvus standalone server or cluster (token from ``$MILVUS_TOKEN``), where
  sharding, replicas and the ids/vectors past one machine live.

The index type is chosen from the collection size as for FAISS (:func:`cbir.index.builder.choose_kind`:
FLAT → IVF_FLAT → IVF_PQ, HNSW when forced; Milvus Lite has no IVF_PQ and keeps IVF_FLAT), then ``nprobe`` /
``ef`` is raised until recall@k against exact search on a sample reaches ``target_recall``.

Building inserts in batches with ids fixed in advance (position in the extraction): ``index.json`` is written
first with ``state: building``; a killed build leaves a loadable collection holding the batches that were
acknowledged, and running the same build again resumes after them. ``add`` reserves its ids in ``index.json``
before inserting, so a crash leaves a gap in the ids, never two images under one id.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cbir.errors import ConfigError
from cbir.index.builder import IndexOptions, choose_kind, drop_self, nlist_for, pq_shape, recall_at_k
from cbir.index.errors import IndexFilesError
from cbir.index.vectors import new_embeddings, query_matrix
from cbir.io import atomic_write_json

log = logging.getLogger(__name__)

INFO_FILE = "index.json"
LITE_FILE = "milvus.db"
INDEX_TYPES = ("auto", "FLAT", "IVF_FLAT", "HNSW", "IVF_PQ")
LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW")  # what milvus-lite builds (no IVF_PQ)
KIND_TO_TYPE = {"flat": "FLAT", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ", "hnsw": "HNSW", "ondisk": "IVF_PQ"}
SEARCH_KNOB = {"IVF_FLAT": "nprobe", "IVF_PQ": "nprobe", "HNSW": "ef"}
MAX_PATH_CHARS, MAX_LABEL_CHARS = 4096, 1024
OUTPUT_FIELDS = ["path", "label", "meta"]
CRASH_ENV = "CBIR_MILVUS_CRASH_AFTER_BATCHES"  # fault-injection tests: die (as kill -9 would) after N batches


def connect(uri: str, timeout: float = 30.0):
    """A ``MilvusClient`` for ``uri``, or one line saying what is missing / unreachable."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ConfigError("index.backend=milvus needs pymilvus (and milvus-lite for a local .db file): "
                          "pip install 'cbir[milvus]'") from None
    # its query iterator warns on every use that Milvus Lite has no MVCC timestamp (it needs none)
    logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
    logging.getLogger("milvus_lite").setLevel(logging.WARNING)  # its server start/stop lines at every command
    local = not re.match(r"^[a-z]+://", uri)
    if local:
        _quiet_lite_server()
        try:
            import milvus_lite  # noqa: F401
        except ImportError:
            raise ConfigError(f"index uri {uri} is a local Milvus Lite file, which needs milvus-lite: "
                              "pip install 'cbir[milvus]' (or point uri= at a Milvus server)") from None
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""), timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - pymilvus raises MilvusException, grpc errors, OSError
        reason = " ".join(str(exc).split())[:300]
        hint = ("another process may hold this Milvus Lite file (one process at a time: stop it, or use a Milvus "
                "server)" if local else "is the server running and reachable? (token: $MILVUS_TOKEN)")
        raise IndexFilesError(f"cannot open Milvus at {uri}: {reason}; {hint}") from None


class _UnimplementedRpcFilter(logging.Filter):
    """pymilvus asks for a timestamp (AllocTimestamp) while it waits for an index to build; Milvus Lite does not
    implement that call, pymilvus carries on without it, but the in-process gRPC server logs a full traceback
    for each. Only that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Method not implemented" not in record.getMessage() and not (
            record.exc_info and isinstance(record.exc_info[1], NotImplementedError))


def _quiet_lite_server() -> None:
    server_log = logging.getLogger("grpc._server")
    if not any(isinstance(f, _UnimplementedRpcFilter) for f in server_log.filters):
        server_log.addFilter(_UnimplementedRpcFilter())


def resolve_uri(uri: str | None, folder: Path) -> tuple[str, str]:
    """(uri to connect to, uri to record in index.json): default ``<folder>/milvus.db`` recorded as
    ``milvus.db``; a server URI as it is; another local file made absolute."""
    if not uri:
        return str(folder / LITE_FILE), LITE_FILE
    if re.match(r"^[a-z]+://", str(uri)):
        return str(uri), str(uri)
    path = Path(uri).expanduser()
    if path.suffix != ".db":
        raise ConfigError(f"index.uri={uri}: a Milvus Lite file ends in .db; a server is http://host:19530")
    path = path.resolve()
    return str(path), str(path)


def default_collection_name(folder: Path) -> str:
    """``cbir_<folder name>``: Milvus names are letters, digits and underscores, starting with a letter."""
    name = re.sub(r"\W+", "_", folder.resolve().name).strip("_")[:48] or "index"
    return f"cbir_{name}"


def choose_index_type(n: int, dim: int, options: IndexOptions, lite: bool) -> tuple[str, dict, str]:
    """(Milvus index type, build params, why)."""
    wanted = str(options.milvus_index or "auto")
    if wanted not in INDEX_TYPES:
        raise ConfigError(f"index.milvus_index={wanted}: choose one of {', '.join(INDEX_TYPES)}")
    if wanted == "auto":
        kind, reason = choose_kind(n, dim, options, ondisk=False)
        wanted = KIND_TO_TYPE[kind]
    else:
        reason = f"forced: milvus_index={wanted}"
    if lite and wanted not in LITE_INDEX_TYPES:
        reason += f"; Milvus Lite has no {wanted}, so IVF_FLAT"
        wanted = "IVF_FLAT"
    nlist = nlist_for(max(n, 1), options)
    if wanted == "IVF_FLAT":
        return wanted, {"nlist": nlist}, reason
    if wanted == "IVF_PQ":
        m, nbits = pq_shape(dim, n, options)
        return wanted, {"nlist": nlist, "m": m, "nbits": nbits}, reason
    if wanted == "HNSW":
        return wanted, {"M": options.hnsw_m, "efConstruction": options.hnsw_ef_construction}, reason
    return "FLAT", {}, reason


def knob_values(index_type: str, build_params: dict) -> list[int]:
    if index_type == "HNSW":
        return [16, 32, 64, 128, 256, 512, 1024, 2048]
    return [v for v in (2 ** i for i in range(20)) if v <= int(build_params.get("nlist", 1))] or [1]


class MilvusIndex:
    """A Milvus collection of embeddings (``id`` primary key, ``vector``, ``path``, ``label``, ``meta``) with
    the methods of :class:`cbir.index.store.CbirIndex` that commands, Searcher and service use."""

    def __init__(self, client, info: dict, folder: Path) -> None:
        self.client = client
        self.info = info
        self.path = folder
        self._rows: OrderedDict[int, dict] = OrderedDict()  # rows seen in search results, for lookup
        self._rows_lock = threading.Lock()
        self._count: int | None = None

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | os.PathLike, info: dict | None = None) -> MilvusIndex:
        folder = Path(folder)
        info = info if info is not None else json.loads((folder / INFO_FILE).read_text())
        uri = info.get("uri") or LITE_FILE
        connect_uri = str(folder / uri) if not re.match(r"^[a-z]+://", uri) and not Path(uri).is_absolute() else uri
        client = connect(connect_uri)
        name = info.get("milvus_collection")
        if not name or not client.has_collection(name):
            raise IndexFilesError(f"index folder {folder}: Milvus at {uri} has no collection {name!r} (dropped, or "
                                  "another database): build the index again")
        index = cls(client, info, folder)
        client.load_collection(name)
        if info.get("state") == "building":
            log.warning("index %s: its build was interrupted (%d of %d images inserted); run the same `cbir index "
                        "build` again to finish it", folder, len(index), int(info.get("expected", 0)))
        return index

    # -- the CbirIndex interface --------------------------------------------------------------------
    @property
    def collection(self) -> str:
        return str(self.info["milvus_collection"])

    @property
    def metadata(self) -> dict:
        return self.info

    @property
    def kind(self) -> str:
        return "milvus"

    @property
    def embedding_dim(self) -> int:
        return int(self.info["dim"])

    def __len__(self) -> int:
        if self._count is None:
            rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
            self._count = int(rows[0]["count(*)"]) if rows else 0
        return self._count

    def search(self, queries, k: int = 10, filter: str | None = None,
               search_params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first, -1 past the hits; ``filter`` is any Milvus expression
        over ``label`` / ``path`` / ``id`` (``label == 'cat'``)."""
        queries = query_matrix(queries, self.embedding_dim, k)
        params = dict(self.info.get("search_params") or {}) if search_params is None else search_params
        results = self._search(queries, k, filter, params)
        wanted = min(k, len(self))
        knob = SEARCH_KNOB.get(str(self.info.get("index_type")))
        # IVF returns only what its probed lists hold (fewer still under a filter): short rows look everywhere
        if knob == "nprobe" and any(len(row) < wanted for row in results):
            results = self._search(queries, k, filter, {**params, "nprobe": int(self.info["build_params"]["nlist"])})
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        with self._rows_lock:
            for row, hits in enumerate(results):
                for col, hit in enumerate(hits[:k]):
                    scores[row, col], ids[row, col] = float(hit["distance"]), int(hit["id"])
                    self._remember(int(hit["id"]), hit.get("entity") or {})
        return scores, ids

    def _search(self, queries: np.ndarray, k: int, filter: str | None, params: dict) -> list:
        try:
            return self.client.search(self.collection, data=[q for q in queries], limit=k, filter=filter or "",
                                      search_params={"metric_type": "IP", "params": params},
                                      output_fields=OUTPUT_FIELDS)
        except Exception as exc:  # noqa: BLE001 - a bad filter expression, a lost server
            from cbir.index.filters import FilterError

            reason = " ".join(str(exc).split())[:300]
            if filter:
                raise FilterError(f"filter {filter!r}: Milvus refused it ({reason})") from None
            raise IndexFilesError(f"index {self.path}: Milvus search failed ({reason})") from None

    def _remember(self, image_id: int, entity: dict) -> None:
        self._rows[image_id] = _record(image_id, entity)
        self._rows.move_to_end(image_id)
        while len(self._rows) > 100_000:
            self._rows.popitem(last=False)

    def lookup(self, ids: Iterable[int]) -> list[dict | None]:
        ids = [int(i) for i in ids]
        with self._rows_lock:
            missing = [i for i in ids if i >= 0 and i not in self._rows]
        found = {}
        if missing:
            for row in self.client.get(self.collection, ids=missing, output_fields=OUTPUT_FIELDS):
                found[int(row["id"])] = _record(int(row["id"]), row)
        with self._rows_lock:
            return [self._rows.get(i) or found.get(i) for i in ids]

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        """The stored embeddings of ``ids`` (query expansion); KeyError for an id the collection lacks."""
        ids = [int(i) for i in ids]
        rows = {}
        for start in range(0, len(ids), 1000):
            for row in self.client.get(self.collection, ids=ids[start:start + 1000], output_fields=["vector"]):
                rows[int(row["id"])] = row["vector"]
        missing = [i for i in ids if i not in rows]
        if missing:
            raise KeyError(f"Milvus collection {self.collection}: no vector for ids {missing[:5]}")
        return np.asarray([rows[i] for i in ids], dtype=np.float32).reshape(len(ids), self.embedding_dim)

    @property
    def labelled(self) -> bool:
        return bool(self.client.query(self.collection, filter='label != ""', output_fields=["id"], limit=1))

    def paths(self) -> set[str]:
        return {row["path"] for row in self._iterate(["path"])}

    def ids_of_paths(self, paths: Iterable[str]) -> np.ndarray:
        wanted = sorted({str(p) for p in paths})
        ids = []
        for start in range(0, len(wanted), 1000):
            expr = f"path in {json.dumps(wanted[start:start + 1000], ensure_ascii=False)}"
            ids += [int(r["id"]) for r in self.client.query(self.collection, filter=expr, output_fields=["id"])]
        return np.array(sorted(ids), dtype=np.int64)

    def unknown_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        held = {int(r["id"]) for r in self.client.get(self.collection, ids=ids, output_fields=["id"])}
        return [i for i in ids if i not in held]

    def first_id(self) -> int | None:
        rows = self.client.query(self.collection, filter="id >= 0", output_fields=["id"], limit=1)
        return int(rows[0]["id"]) if rows else None

    def _iterate(self, fields: list[str], batch: int = 5000) -> Iterator[dict]:
        iterator = self.client.query_iterator(self.collection, batch_size=batch, filter="", output_fields=fields)
        try:
            while rows := iterator.next():
                yield from rows
        finally:
            iterator.close()

    # -- changing -----------------------------------------------------------------------------------
    def _check_writable(self, action: str) -> None:
        """Every Milvus index takes adds and removes."""

    def add(self, embeddings: np.ndarray, paths: Sequence[str], labels: Sequence[str | None] | None = None,
            metadata: Sequence[dict | None] | None = None) -> np.ndarray:
        """Insert images with new ids (reserved in ``index.json`` first); returns the ids."""
        embeddings = new_embeddings(embeddings, paths, self.embedding_dim)
        start = int(self.info.get("next_id", 0))
        ids = np.arange(start, start + len(paths), dtype=np.int64)
        self.info["next_id"] = start + len(paths)
        self._write_info()  # the reservation: a crash below leaves unused ids, never reused ones
        insert_rows(self.client, self.collection, embeddings, ids, paths, labels, metadata,
                    int(self.info.get("insert_batch", 2000)))
        self._changed()
        return ids

    def remove(self, ids: Iterable[int]) -> int:
        ids = [int(i) for i in ids]
        unknown = set(self.unknown_ids(ids))  # one query, not one per id
        present = [i for i in ids if i not in unknown]
        if present:
            self.client.delete(self.collection, ids=present)
            self._changed()
        return len(present)

    def remove_paths(self, paths: Iterable[str]) -> int:
        return self.remove(self.ids_of_paths(paths).tolist())

    def _changed(self) -> None:
        self._count = None
        with self._rows_lock:
            self._rows.clear()

    def save(self, folder: str | os.PathLike | None = None) -> Path:
        """The rows are in Milvus already (acknowledged inserts are durable): flush, record the count."""
        folder = Path(folder) if folder is not None else self.path
        if folder.resolve() != self.path.resolve():
            raise ConfigError(f"a Milvus-backed index lives in its engine: it cannot be saved to another folder "
                              f"({folder}); build a new index there")
        self.client.flush(self.collection)
        self._count = None
        self.info["ntotal"] = len(self)
        self._write_info()
        return folder

    def close(self) -> None:
        """Let go of the engine: for a Milvus Lite file, stop this process's embedded server so another
        process (a CLI run, a second service) can open the file."""
        self.client.close()
        uri = str(self.info.get("uri") or LITE_FILE)
        if not re.match(r"^[a-z]+://", uri):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(self.path / uri) if not Path(uri).is_absolute() else uri)

    def _write_info(self) -> None:
        atomic_write_json(self.path / INFO_FILE, self.info)

    def describe(self) -> str:
        recall_key = f"recall_at_{self.info.get('recall_k', 10)}"
        kind = " ".join(str(part) for part in (self.info.get("index_type"), self.info.get("build_params")) if part)
        return (f"{len(self)} images, {self.embedding_dim}-d, Milvus {kind} "
                f"in {self.info.get('uri')} collection {self.collection} "
                f"({self.info.get('reason')}); search {self.info.get('search_params') or 'exact'}; "
                f"{recall_key}={self.info.get(recall_key)} (target {self.info.get('target_recall')})")


def _record(image_id: int, entity: dict) -> dict:
    label = entity.get("label")
    return {"id": image_id, "path": entity.get("path"), "label": label if label not in (None, "") else None,
            "meta": entity.get("meta") or {}}


def insert_rows(client, collection: str, vectors: np.ndarray, ids: np.ndarray, paths: Sequence[str],
                labels: Sequence[str | None] | None, metadata: Sequence[dict | None] | None, batch: int,
                upsert: bool = False) -> None:
    """Insert rows in batches of ``batch`` (each one request, durable once acknowledged)."""
    labels = labels if labels is not None else [None] * len(paths)
    metadata = metadata if metadata is not None else [None] * len(paths)
    write = client.upsert if upsert else client.insert
    for start in range(0, len(ids), batch):
        rows = []
        for i in range(start, min(start + batch, len(ids))):
            path, label = str(paths[i]), labels[i]
            if len(path) > MAX_PATH_CHARS or (label is not None and len(str(label)) > MAX_LABEL_CHARS):
                raise ConfigError(f"{path[:200]}: paths hold at most {MAX_PATH_CHARS} characters and labels "
                                  f"{MAX_LABEL_CHARS} in a Milvus index")
            rows.append({"id": int(ids[i]), "vector": vectors[i], "path": path,
                         "label": "" if label is None else str(label), "meta": metadata[i] or {}})
        write(collection, rows)


# ---------------------------------------------------------------------------------------------------
# Building from extraction shards
# ---------------------------------------------------------------------------------------------------
def build_milvus_index(shards, paths: Sequence[str], labels: Sequence[str | None], folder: str | os.PathLike,
                       options: IndexOptions, *, model_info: dict | None = None, progress: bool = True,
                       extra_info: dict | None = None) -> MilvusIndex:
    """Insert every shard row (ids = row positions) into a Milvus collection, index it, tune its search knob to
    ``options.target_recall`` and write ``folder/index.json``. A build that was killed resumes (same
    collection, model and images); otherwise the collection is created afresh."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    connect_uri, recorded_uri = resolve_uri(options.uri, folder)
    name = options.milvus_collection or default_collection_name(folder)
    n, dim = len(paths), int(shards.dim)
    lite = not re.match(r"^[a-z]+://", connect_uri)
    index_type, build_params, reason = choose_index_type(n, dim, options, lite)
    fingerprint = {"model": (model_info or {}).get("model"), "images": _paths_digest(paths), "dim": dim,
                   "index_type": index_type, "build_params": build_params}
    client = connect(connect_uri)
    done = _resumable_rows(client, folder, recorded_uri, name, fingerprint)
    if done is None:
        if client.has_collection(name):
            log.info("index: dropping Milvus collection %s to build it again", name)
            client.drop_collection(name)
        _create_collection(client, name, dim, index_type, build_params, lite)
        done = 0
    info = {"backend": "milvus", "kind": "milvus", "uri": recorded_uri, "milvus_collection": name,
            "index_type": index_type, "build_params": build_params, "reason": reason,
            "factory": f"milvus:{index_type}", "metric": "inner_product", "dim": dim, "expected": n,
            "next_id": n, "state": "building", "fingerprint": fingerprint,
            "insert_batch": int(options.insert_batch), **(model_info or {}), **(extra_info or {})}
    atomic_write_json(folder / INFO_FILE, info)
    start_time = time.perf_counter()
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    batches = 0
    with tqdm(total=n, initial=done, desc="milvus insert", unit="img", disable=not progress) as bar:
        for vectors, ids in shards.blocks(max(options.insert_batch, 1)):
            keep = ids >= done - options.insert_batch  # the last batch before a crash may be half-known: upsert it
            if not keep.any():
                continue
            vectors, ids = vectors[keep], ids[keep]
            upsert = bool(done) and int(ids[0]) < done
            insert_rows(client, name, vectors, ids, [paths[i] for i in ids], [labels[i] for i in ids], None,
                        options.insert_batch, upsert=upsert)
            bar.update(int(max(0, ids[-1] + 1 - max(done, int(ids[0])))))
            batches += 1
            if crash_after and batches >= crash_after:
                os._exit(70)
    client.flush(name)
    client.load_collection(name)
    insert_seconds = time.perf_counter() - start_time
    index = MilvusIndex(client, info, folder)
    tune_start = time.perf_counter()
    tuned = tune_milvus_search(index, shards, options)
    index.info.update(state="ready", ntotal=len(index), search_params=tuned["params"],
                      **{f"recall_at_{options.k}": round(tuned["recall"], 4)}, recall_k=options.k,
                      target_recall=options.target_recall, target_met=bool(tuned["target_met"]),
                      recall_queries=tuned["queries"], recall_curve=tuned["curve"],
                      build_seconds=round(insert_seconds, 2), tune_seconds=round(time.perf_counter() - tune_start, 2))
    index._write_info()
    return index


def _paths_digest(paths: Sequence[str]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode() + b"\n")
    return digest.hexdigest()


def _resumable_rows(client, folder: Path, uri: str, name: str, fingerprint: dict) -> int | None:
    """Rows already inserted by an interrupted build of the same images with the same model, or None."""
    try:
        previous = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    if (previous.get("backend") != "milvus" or previous.get("state") != "building" or previous.get("uri") != uri
            or previous.get("milvus_collection") != name or previous.get("fingerprint") != fingerprint
            or not client.has_collection(name)):
        return None
    client.load_collection(name)
    rows = client.query(name, filter="", output_fields=["count(*)"])
    done = int(rows[0]["count(*)"]) if rows else 0
    log.info("index: resuming the Milvus build of %s after %d inserted images", name, done)
    return done


def _create_collection(client, name: str, dim: int, index_type: str, build_params: dict, lite: bool) -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH_CHARS)
    schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL_CHARS)
    schema.add_field("meta", DataType.JSON)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=build_params)
    if not lite:  # a server: scalar indexes make label filters and path lookups cheap at scale (Milvus Lite
        # scans its segments, and its server logs a traceback for each extra index it waits on)
        params.add_index(field_name="path", index_type="INVERTED")
        params.add_index(field_name="label", index_type="INVERTED")
    client.create_collection(name, schema=schema, index_params=params)


def tune_milvus_search(index: MilvusIndex, shards, options: IndexOptions) -> dict:
    """Raise ``nprobe`` / ``ef`` until recall@k (against exact search over the shards, each query's own vector
    excluded) on ``query_sample`` collection vectors reaches the target; FLAT is measured only."""
    n = len(shards)
    rng = np.random.default_rng(options.seed + 1)
    rows = np.sort(rng.choice(n, min(options.query_sample, n), replace=False))
    queries = shards.rows(rows)
    own = shards.all_ids()[rows]
    exact = drop_self(exact_ids_over_shards(shards, queries, options.k + 1), own, options.k)
    index_type = str(index.info["index_type"])
    knob = SEARCH_KNOB.get(index_type)

    def measure(params: dict) -> float:
        start = time.perf_counter()
        _, found = index.search(queries, options.k + 1, search_params=params)
        recall = recall_at_k(drop_self(found, own, options.k), exact, options.k)
        curve.append({**params, "recall": round(recall, 4),
                      "qps": round(len(queries) / max(time.perf_counter() - start, 1e-9), 1)})
        log.info("index tuning (milvus %s): %s recall@%d=%.4f", index_type, params or "exact", options.k, recall)
        return recall

    curve: list[dict] = []
    if knob is None:
        recall = measure({})
        return {"params": {}, "recall": recall, "target_met": recall >= options.target_recall, "curve": curve,
                "queries": len(rows)}
    for value in knob_values(index_type, index.info["build_params"]):
        recall = measure({knob: value})
        if recall >= options.target_recall:
            return {"params": {knob: value}, "recall": recall, "target_met": True, "curve": curve,
                    "queries": len(rows)}
    best = max(curve, key=lambda c: (c["recall"], -c[knob]))
    log.warning("index: target recall@%d=%.3f not reached by Milvus %s (best %.4f at %s=%d)", options.k,
                options.target_recall, index_type, best["recall"], knob, best[knob])
    return {"params": {knob: best[knob]}, "recall": best["recall"], "target_met": False, "curve": curve,
            "queries": len(rows)}


def exact_ids_over_shards(shards, queries: np.ndarray, k: int, block_vectors: int = 262_144) -> np.ndarray:
    """Exact top-``k`` ids by inner product, streaming the shards one block at a time (bounded memory)."""
    import faiss

    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for vectors, ids in shards.blocks(block_vectors):
        scores, positions = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        found = np.where(positions >= 0, ids[np.clip(positions, 0, None)], -1)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, found], axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, order, axis=1)
        best_ids = np.take_along_axis(best_ids, order, axis=1)
    return best_ids
