"""Database-side augmentation (DBA) at index build time: ``index.dba=K``.

Every stored vector is replaced by ``normalise(x + sum_i max(s_i, 0)^alpha * x_i)`` over its K nearest other
vectors of the collection (Radenović, Tolias & Chum, TPAMI 2018; the same update ``eval.py
rerank.methods=[dba]`` measures): an image's stored descriptor leans toward its near duplicates and class mates,
so a query that finds one of them finds the rest. Queries are not changed, so a search costs nothing more.
The neighbours are exact (chunked ``chunk x N`` similarity blocks: memory stays bounded; O(N^2) time, about a
minute per 100k 512-d vectors on 2 cores). Images added later are augmented against what the index holds
(its own search and stored vectors), so they join on equal terms.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from cbir.evaluation.rerank import expand

log = logging.getLogger(__name__)


def augment_collection(embeddings: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The DBA'd copy of ``embeddings`` (float32, rows L2-normalised); each row never uses itself."""
    vectors = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    ids = torch.arange(len(vectors))
    log.info("index: database-side augmentation of %d vectors with their %d nearest (alpha %g)", len(vectors), n,
             alpha)
    return expand(vectors, vectors, n, alpha, ids, ids).numpy()


def augment_new(index, embeddings: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """New vectors augmented with their ``n`` nearest stored vectors of ``index`` (its search and
    :meth:`vectors`)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if len(index) == 0 or len(embeddings) == 0:
        return embeddings
    scores, ids = index.search(embeddings, min(n, len(index)))
    neighbours = [[(float(s), int(i)) for s, i in zip(row_scores, row_ids) if i >= 0]
                  for row_scores, row_ids in zip(scores, ids)]
    return expand_with_stored(index, embeddings, neighbours, alpha)


def expand_with_stored(index, vectors: np.ndarray, neighbours: Sequence[Sequence[tuple[float, int]]],
                       alpha: float) -> np.ndarray:
    """``normalise(v + sum_i max(s_i, 0)^alpha * x_i)`` for each row ``v`` of ``vectors`` over its ``(s_i, id_i)``
    ``neighbours``, the ``x_i`` read from ``index`` in one call — the αQE / DBA update against an index (the
    Searcher's query expansion and images added to a DBA index)."""
    wanted = sorted({image_id for row in neighbours for _, image_id in row})
    stored = dict(zip(wanted, index.vectors(wanted))) if wanted else {}
    out = np.array(vectors, dtype=np.float32, copy=True)
    for row, hits in enumerate(neighbours):
        for score, image_id in hits:
            out[row] += max(score, 0.0) ** alpha * stored[image_id]
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
