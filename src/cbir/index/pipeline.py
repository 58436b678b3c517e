"""Collection → embeddings → FAISS index + id store, saved in one folder.

:func:`build_collection_index` is the one call ``export.py``, ``cbir index build`` and tests use;
:func:`add_to_index` extracts only the images an index does not hold yet. With ``processes=N`` (or under
``torchrun``) extraction is shared between ranks (:mod:`cbir.index.distributed`) and rank 0 builds the
index; ``kind=ondisk`` (or ``auto`` past the memory budget) builds from the shards on disk without
loading them all (:mod:`cbir.index.ondisk`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
from torch import nn

from cbir.data.catalog import parse_array_source
from cbir.errors import ConfigError, DataError
from cbir.export.runtimes import ONNX_FILES
from cbir.index.builder import IndexOptions, choose_kind
from cbir.index.calibration import calibrate_scores
from cbir.index.collection import Collection, read_collection
from cbir.index.dba import augment_collection, augment_new
from cbir.index.errors import DimensionMismatchError
from cbir.index.extract import extract_collection
from cbir.index.ondisk import VectorShards, build_ondisk_index
from cbir.index.shards import SKIPPED, Extraction, ExtractionOptions, model_fingerprint
from cbir.index.store import CbirIndex, IdStore
from cbir.ranks import launched_rank

log = logging.getLogger(__name__)
EXTRACT_DIR = "embeddings"


def split_options(options: dict) -> tuple[ExtractionOptions, IndexOptions]:
    """A flat mapping of index settings (``conf/index/*.yaml``, keyword arguments) → the extraction part
    and the index part; an unknown key is a ConfigError listing the known ones."""
    index_keys = {f.name for f in fields(IndexOptions)}
    extraction_keys = ExtractionOptions.field_names()
    unknown = sorted(set(options) - index_keys - extraction_keys)
    if unknown:
        raise ConfigError(f"index.{unknown[0]}: not an index setting; choose from: "
                          f"{', '.join(sorted(index_keys | extraction_keys))}")
    return (ExtractionOptions(**{k: v for k, v in options.items() if k in extraction_keys}),
            IndexOptions(**{k: v for k, v in options.items() if k in index_keys}))


def build_collection_index(embedder: nn.Module, collection: str | os.PathLike | Collection,
                           out_dir: str | os.PathLike, *, extra_info: dict | None = None,
                           **options) -> CbirIndex | None:
    """Embed every image of ``collection`` (resumable shards under ``out_dir/embeddings``), build the
    index ``kind`` chooses, and save it in ``out_dir``. ``options`` are :class:`IndexOptions` and
    :class:`ExtractionOptions` fields (``kind="flat"``, ``batch_size=8``). Under ``torchrun`` the ranks
    other than 0 only extract and return None."""
    extraction_options, index_options = split_options(options)
    if extraction_options.runtime in ONNX_FILES and not callable(getattr(embedder, "fingerprint", None)):
        raise ConfigError(f"index.runtime={extraction_options.runtime} runs a bundle's ONNX copy: build from a "
                          "bundle (bundle=DIR), or use runtime=eager|compiled with a checkpoint")
    if not isinstance(collection, Collection):
        collection = read_collection(collection)
    out = Path(out_dir)
    milvus = index_options.backend == "milvus"
    ondisk = not milvus and choose_kind(len(collection), int(embedder.embedding_dim), index_options)[0] == "ondisk"
    extraction = extract_collection(embedder, collection, out / EXTRACT_DIR, extraction_options,
                                    load_embeddings=not (ondisk or milvus))
    if extraction is None:  # a rank other than 0: its shards are written, rank 0 builds the index
        return None
    if len(extraction.indices) == 0:
        raise DataError(f"collection {collection.spec}: none of its {len(collection)} images could be read "
                        f"(see {out / EXTRACT_DIR / 'skipped.json'})")
    paths = [collection.source(int(i)) for i in extraction.indices]
    labels = [collection.label(int(i)) for i in extraction.indices]
    if index_options.dba and (milvus or ondisk):
        raise ConfigError(f"index.dba={index_options.dba}: database-side augmentation rewrites the vectors in "
                          "memory; it works with the in-memory FAISS kinds (flat, ivf, hnsw, ivfpq), not "
                          f"{'backend=milvus' if milvus else 'kind=ondisk'}")
    if milvus:  # streamed from the shards into the engine, which keeps them: nothing more to save
        from cbir.index.milvus import build_milvus_index

        shards = VectorShards.with_consecutive_ids(extraction.shard_files, np.arange(len(paths), dtype=np.int64))
        index = build_milvus_index(shards, paths, labels, out, index_options, model_info=_model_info(embedder),
                                   progress=extraction_options.progress,
                                   extra_info={"collection": collection.spec, "skipped": len(extraction.skipped),
                                               **(extra_info or {})})
        if _calibrate_scores(index, shards.rows, labels, index_options):
            index.save(out)
        if not extraction_options.keep_shards:
            drop_shards(out / EXTRACT_DIR, out)
        log.info("index: %s → %s", index.describe(), out)
        return index
    if ondisk:
        index = build_ondisk_cbir_index(extraction.shard_files, paths, labels, out, index_options,
                                        progress=extraction_options.progress)
    else:
        stored = extraction.embeddings
        if index_options.dba:
            stored = augment_collection(stored, int(index_options.dba), float(index_options.dba_alpha))
        index = CbirIndex.build(stored, paths, labels, options=index_options)
        if index_options.dba:
            index.info["dba"] = {"n": int(index_options.dba), "alpha": float(index_options.dba_alpha)}
    index.info.update(_model_info(embedder), collection=collection.spec, skipped=len(extraction.skipped),
                      **(extra_info or {}))
    rows = (extraction.embeddings.__getitem__ if extraction.embeddings is not None else
            VectorShards.with_consecutive_ids(extraction.shard_files, np.arange(len(paths), dtype=np.int64)).rows)
    _calibrate_scores(index, rows, labels, index_options)
    index.save(out)
    if not extraction_options.keep_shards:
        drop_shards(out / EXTRACT_DIR, out)
    log.info("index: %s → %s", index.describe(), out)
    return index


def _calibrate_scores(index, rows, labels: Sequence[str | None], options: IndexOptions) -> bool:
    """Record in ``index.info`` the score → match-probability curve of a freshly built index over a labelled
    collection (:mod:`cbir.index.calibration`; its rows are the collection's images in order, with consecutive
    ids); whether there was one to record."""
    first = index.first_id() or 0
    ids = np.arange(first, first + len(labels), dtype=np.int64)
    calibration = calibrate_scores(lambda queries, k: index.search(queries, k), rows, ids, labels, k=options.k,
                                   seed=options.seed)
    if calibration is not None:
        index.info["score_calibration"] = calibration
    return calibration is not None


def drop_shards(work: Path, index_dir: Path, skipped_name: str = SKIPPED) -> None:
    """Remove an extraction's work folder once its vectors are in a saved index (they are only needed to
    resume the extraction; a bundle with its index would otherwise carry them twice). The list of unreadable
    images stays, as ``index_dir/skipped_name``."""
    import shutil

    skipped = work / SKIPPED
    if skipped.is_file() and json.loads(skipped.read_text() or "[]"):
        os.replace(skipped, index_dir / skipped_name)
    shutil.rmtree(work, ignore_errors=True)
    parent = work.parent
    if parent.name == EXTRACT_DIR and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()  # an add's work folder lives in <index>/embeddings/


def build_bundle_index(bundle, collection: str | os.PathLike | Collection, out_dir: str | os.PathLike,
                       **options) -> CbirIndex | None:
    """:func:`build_collection_index` with a bundle's Embedder; the index records the bundle's weights hash
    (``bundle_weights_sha256``) so a search with another bundle can be flagged."""
    weights = (getattr(bundle, "manifest", None) or {}).get("files", {}).get("weights.pt")
    extra = {"bundle": str(getattr(bundle, "path", "")), "bundle_weights_sha256": weights}
    extraction_options, _ = split_options(options)
    model, resolved = bundle_model(bundle, extraction_options)
    options = {**options, "precision": resolved.precision, "runtime": resolved.runtime}
    return build_collection_index(model, collection, out_dir, extra_info=extra, **options)


def bundle_model(bundle, options: ExtractionOptions) -> tuple[nn.Module, ExtractionOptions]:
    """The model a bundle's extraction runs (the eager Embedder, or an ONNX copy for ``runtime=onnx|onnx-int8``)
    and ``options`` with runtime and precision made concrete (:func:`with_resolved_precision`)."""
    from cbir.index.shards import default_device

    device = options.device or default_device()
    runtime = bundle.resolve_runtime(options.runtime, device, options.precision)
    options = with_resolved_precision(options.with_changes(runtime=runtime), bundle)
    return bundle.module_for(runtime, device), options


def with_resolved_precision(options: ExtractionOptions, bundle) -> ExtractionOptions:
    """``options`` with ``precision=auto`` made concrete for the extraction device: bf16 where the device has
    it natively and the bundle's bf16 check passed (:meth:`cbir.export.bundle.Bundle.use_bf16`), else fp32
    (always for an ONNX runtime, which runs its own graph in fp32 or INT8)."""
    from cbir.index.shards import default_device
    from cbir.models.precision import use_bf16

    if options.runtime in ONNX_FILES:
        return options.with_changes(precision="fp32")
    parity = getattr(bundle, "bf16_parity", None)
    bf16 = use_bf16(options.precision, options.device or default_device(), parity)
    return options.with_changes(precision="bf16" if bf16 else "fp32")


def build_ondisk_cbir_index(shard_files: Sequence[os.PathLike], paths: Sequence[str],
                            labels: Sequence[str | None] | None, folder: str | os.PathLike,
                            options: IndexOptions | None = None, progress: bool = True) -> CbirIndex:
    """A :class:`CbirIndex` whose rows (in shard order) are ``paths``: ids from a fresh id store, the FAISS
    part built on disk in ``folder`` by :func:`cbir.index.ondisk.build_ondisk_index` (save it to ``folder``)."""
    store = IdStore()
    ids = store.add(paths, labels)
    index, info = build_ondisk_index(VectorShards.with_consecutive_ids(shard_files, ids), folder, options,
                                     progress=progress)
    built = CbirIndex(index, store, info)
    built.path = Path(folder)
    return built


def add_to_index(index: CbirIndex, embedder: nn.Module, collection: str | os.PathLike | Collection,
                 work_dir: str | os.PathLike, options: ExtractionOptions | None = None,
                 **changes) -> tuple[np.ndarray, Extraction]:
    """Embed and add the images of ``collection`` that ``index`` does not hold yet (by path); returns the
    new ids and the extraction (with its skipped images). ``changes`` are :class:`ExtractionOptions`
    fields; ``processes > 1`` spawns extraction ranks."""
    if launched_rank() is not None:
        raise ConfigError("adding to an index runs in one process (it rewrites the index): start it without "
                          "torchrun, with processes=N to share the extraction")
    options = ExtractionOptions.of(options, **changes)
    index._check_writable("add images to")  # before extracting anything
    if index.info.get("model") not in (None, model_fingerprint(embedder)):
        log.warning("index: adding with a different model than the one that built the index")
    if int(embedder.embedding_dim) != index.embedding_dim:
        raise DimensionMismatchError(f"the model gives {embedder.embedding_dim}-d embeddings, the index holds "
                                     f"{index.embedding_dim}-d: add images with the model that built the index")
    if not isinstance(collection, Collection):
        collection = read_collection(collection)
    known = index.paths()
    # indexes built before paths were stored absolute hold them relative to the folder of that run
    known |= {str(Path(p).resolve()) for p in known if parse_array_source(p) is None and not Path(p).is_absolute()}
    new = np.array([i for i in collection.indices if collection.source(int(i)) not in known], dtype=np.int64)
    if len(new) == 0:
        log.info("index: every image of %s is indexed already", collection.spec)
        return np.zeros(0, np.int64), Extraction(np.zeros((0, index.embedding_dim), np.float32), new, [])
    fresh = collection.subset(new)
    key = hashlib.sha256("\n".join(fresh.source(int(i)) for i in new).encode()).hexdigest()[:12]
    extraction = extract_collection(embedder, fresh, Path(work_dir) / f"add-{key}", options)
    extraction.work_dir = Path(work_dir) / f"add-{key}"
    vectors = extraction.embeddings
    if index.info.get("dba"):  # stored vectors were augmented: new ones join on equal terms
        vectors = augment_new(index, vectors, int(index.info["dba"]["n"]), float(index.info["dba"]["alpha"]))
    ids = index.add(vectors, [fresh.source(int(i)) for i in extraction.indices],
                    [fresh.label(int(i)) for i in extraction.indices])
    return ids, extraction


def _model_info(embedder: nn.Module) -> dict:
    return {"model": model_fingerprint(embedder), "input_size": int(embedder.input_size),
            "mean": list(embedder.mean), "std": list(embedder.std), "embedding_dim": int(embedder.embedding_dim)}
