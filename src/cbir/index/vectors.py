"""Vectors handed to an index, checked the same way whatever the backend (FAISS files or Milvus)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cbir.index.errors import DimensionMismatchError


def query_matrix(queries, dim: int, k: int) -> np.ndarray:
    """Query embeddings as a contiguous float32 (Q, dim) array for any backend's ``search``; a wrong
    dimension is a DimensionMismatchError (a torch tensor is accepted too), ``k < 1`` a ValueError."""
    if type(queries).__module__.startswith("torch"):  # a torch tensor, recognised without importing torch
        queries = queries.detach().float().cpu().numpy()
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if queries.shape[1] != dim:
        raise DimensionMismatchError(
            f"query embeddings have {queries.shape[1]} dimensions but the index holds {dim}-d "
            "vectors: search with the model that built the index, or rebuild the index with this model")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return queries


def new_embeddings(embeddings: np.ndarray, paths: Sequence[str], dim: int) -> np.ndarray:
    """Embeddings of images being added, as float32 (N, dim), checked against the index and the paths."""
    embeddings = np.ascontiguousarray(np.atleast_2d(embeddings), dtype=np.float32)
    if embeddings.shape[1] != dim:
        raise DimensionMismatchError(f"new embeddings have {embeddings.shape[1]} dimensions, the index "
                                     f"{dim}: add images with the model that built the index")
    if len(embeddings) != len(paths):
        raise ValueError(f"{len(embeddings)} embeddings for {len(paths)} paths")
    return embeddings
