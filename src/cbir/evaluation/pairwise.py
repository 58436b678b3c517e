"""Retrieval metrics after the learned pairwise re-ranker (:mod:`cbir.models.pairwise`) re-orders each query's
first ``candidates`` hits; the rest of the ranking stays as the embedding ordered it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY
from cbir.evaluation.metrics import DEFAULT_KS, retrieval_metrics
from cbir.models.pairwise import PairwiseReranker, rerank_order


def rerank_ranked(reranker: PairwiseReranker, sims: torch.Tensor, ranked: torch.Tensor, query_tokens: torch.Tensor,
                  gallery_tokens: torch.Tensor, candidates: int) -> torch.Tensor:
    """``ranked`` (gallery positions, best first, one row per query) with its first ``candidates`` columns
    re-ordered by the re-ranker; ``sims`` are the rows' cosines to the whole gallery."""
    depth = min(int(candidates), ranked.shape[1])
    if depth < 2:
        return ranked
    top = ranked[:, :depth]
    cosine = sims.gather(1, top)
    usable = torch.isfinite(cosine)  # -inf: the query itself (or a filtered item) padded into a short list
    order = rerank_order(reranker, query_tokens, gallery_tokens[top], torch.where(usable, cosine, -1e4))
    ranked = ranked.clone()
    ranked[:, :depth] = top.gather(1, order)
    return ranked


def pairwise_retrieval_metrics(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                               gallery_labels: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                               query_tokens: torch.Tensor, gallery_tokens: torch.Tensor, reranker: PairwiseReranker,
                               candidates: int = 20, ks: Sequence[int] = DEFAULT_KS,
                               knn_k: int | None = None) -> dict[str, float]:
    """:func:`retrieval_metrics` (pairs with equal ids skipped) after the re-ranker re-orders each query's first
    ``candidates`` gallery items; ``*_tokens`` are :meth:`PairwiseReranker.tokens` of each image."""
    def reorder(sims: torch.Tensor, ranked: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return rerank_ranked(reranker, sims, ranked, query_tokens[rows], gallery_tokens, candidates)

    return retrieval_metrics(query, query_labels, gallery, gallery_labels, query_ids=query_ids,
                             gallery_ids=gallery_ids, ks=ks, knn_k=knn_k, reorder=reorder, min_depth=candidates)


def pairwise_evaluate(embeddings: torch.Tensor, labels: torch.Tensor, roles: torch.Tensor, tokens: torch.Tensor,
                      reranker: PairwiseReranker, candidates: int = 20, ks: Sequence[int] = DEFAULT_KS,
                      knn_k: int | None = None, dba: tuple[int, float] | None = None) -> dict[str, float]:
    """:func:`pairwise_retrieval_metrics` for one evaluation set, queries and gallery by role (all-vs-all when
    every item is both; an item never retrieves itself). ``dba=(n, alpha)``: the gallery's embeddings get
    database-side augmentation first (an index built with ``index.dba=n``), then the re-ranker re-orders."""
    is_query, is_gallery = (roles & ROLE_QUERY).bool(), (roles & ROLE_GALLERY).bool()
    ids = torch.arange(len(labels), device=labels.device)
    query, gallery = embeddings[is_query], embeddings[is_gallery]
    if dba is not None:
        from cbir.evaluation.rerank import rerank_embeddings

        _, gallery = rerank_embeddings("dba", query, gallery, ids[is_query], ids[is_gallery], *dba)
    return pairwise_retrieval_metrics(query, labels[is_query], gallery, labels[is_gallery], ids[is_query],
                                      ids[is_gallery], tokens[is_query], tokens[is_gallery], reranker, candidates, ks,
                                      knn_k)
