"""Collection → embeddings (extract) → FAISS index chosen by size (builder) + id store (store).

The public names below load lazily, so ``cbir`` verbs that never touch an index do not import faiss/torch.
"""

from __future__ import annotations

import importlib
import logging

# faiss's loader logs every instruction set it tries (and the ModuleNotFoundErrors) at INFO
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

_EXPORTS = {
    "build_collection_index": "pipeline", "build_bundle_index": "pipeline", "add_to_index": "pipeline",
    "CbirIndex": "store", "IdStore": "store", "load_index": "store", "IndexFilesError": "errors",
    "DimensionMismatchError": "errors", "IndexOptions": "builder", "build_index": "builder",
    "read_collection": "collection", "Collection": "collection", "extract_collection": "extract",
    "Extraction": "shards", "ExtractionOptions": "shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cbir.index' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cbir.index.{_EXPORTS[name]}"), name)
