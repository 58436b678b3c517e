"""Retrieval metrics through the index a search would use, next to exact search on the same embeddings.

``eval.py index.kind=ivf`` (or ``bundle=<dir>``, whose index kind it takes) scores the protocol twice: exact
(every query against every gallery item, as training's validation does) and through a FAISS index built over
the protocol's gallery exactly as ``cbir index build`` builds one (kind chosen or forced, ``nprobe``/``efSearch``
tuned to the target recall), searched to the depth a user can ask for (``k`` ≤ 1000). The gap between the two
rows is what the approximate index costs. R-precision and MAP@R are computed over R results as always; where R
is larger than the search depth (Fashion-MNIST classes hold 6,000 images) the missing results count as misses,
which the row says.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY
from cbir.evaluation.metrics import accumulate_ranked_hits, empty_totals, mean_totals
from cbir.index.builder import IndexOptions
from cbir.index.store import CbirIndex

log = logging.getLogger(__name__)


def metrics_through_index(embeddings: torch.Tensor, labels: torch.Tensor, roles: torch.Tensor,
                          options: IndexOptions, ks: Sequence[int] = (1, 2, 4, 8), depth: int = 1000,
                          chunk: int = 1024) -> tuple[dict[str, float], dict]:
    """(metrics, index description) of the queries (``roles`` bit ROLE_QUERY) searched through an index of the
    gallery items (ROLE_GALLERY) built with ``options``; an item in both sets never finds itself."""
    is_query = (roles & ROLE_QUERY).bool().cpu().numpy()
    is_gallery = (roles & ROLE_GALLERY).bool().cpu().numpy()
    vectors = embeddings.float().cpu().numpy()
    labels = labels.cpu().numpy()
    gallery_ids = np.flatnonzero(is_gallery).astype(np.int64)  # positions in the evaluation set
    # a CbirIndex, so a k beyond what the probed lists hold is filled as a served search fills it
    index = CbirIndex.build(vectors[gallery_ids], [str(i) for i in gallery_ids], options=options)
    info = index.info
    query_ids = np.flatnonzero(is_query)
    counts = dict(zip(*np.unique(labels[gallery_ids], return_counts=True)))
    num_relevant = np.array([counts.get(labels[q], 0) - int(is_gallery[q]) for q in query_ids])
    keep = num_relevant > 0
    query_ids, num_relevant = query_ids[keep], num_relevant[keep]
    ks = sorted({int(k) for k in ks})
    depth = int(min(max(ks[-1], int(num_relevant.max(initial=0))), depth, len(gallery_ids)))
    totals = empty_totals(ks)
    for start in range(0, len(query_ids), chunk):
        rows = query_ids[start:start + chunk]
        _, found = index.search(np.ascontiguousarray(vectors[rows]), min(depth + 1, len(gallery_ids)))
        found = np.where(found >= 0, gallery_ids[np.maximum(found - (index.first_id() or 0), 0)], -1)
        found = np.where(found == rows[:, None], -1, found)  # the query itself is not a result
        ranked = np.full((len(rows), depth), -1, np.int64)
        for row, ids in enumerate(found):
            ids = ids[ids >= 0][:depth]
            ranked[row, :len(ids)] = ids
        hits = (ranked >= 0) & (labels[np.maximum(ranked, 0)] == labels[rows][:, None])
        accumulate_ranked_hits(totals, torch.from_numpy(hits), torch.from_numpy(num_relevant[start:start + chunk]),
                               ks)
    evaluated = len(query_ids)
    metrics = mean_totals(totals, evaluated)
    metrics.update(num_queries=float(evaluated), search_depth=float(depth),
                   max_relevant=float(num_relevant.max(initial=0)))
    return metrics, info


def describe_index(info: dict) -> str:
    """``IVF512,Flat nprobe=4`` — the factory and the tuned search parameters of a built index."""
    params = " ".join(f"{k}={v}" for k, v in (info.get("search_params") or {}).items())
    return f"{info.get('factory')}{' ' + params if params else ''}"
