"""Query expansion and database-side augmentation on embeddings, for evaluation (``eval.py rerank=...``).

- **αQE** (alpha query expansion; Radenović, Tolias & Chum, "Fine-tuning CNN Image Retrieval with No Human
  Annotation", TPAMI 2018): each query is replaced by the normalised sum of itself and its ``n`` nearest
  gallery items weighted by ``similarity^alpha``, then searched again. Neighbours of the same item (equal ids)
  are skipped, so an item never expands with itself.
- **DBA** (database-side augmentation, same paper): every gallery item gets the same treatment against the
  gallery, once, before searching.

- **k-reciprocal** (neighbourhood re-ranking, after Zhong et al., "Re-ranking Person Re-identification with
  k-reciprocal Encoding", CVPR 2017): each query's top ``candidates`` are re-ordered by
  ``(1 - lam) * cosine + lam * Jaccard(N_k(query), N_k(candidate))``, the overlap of the two images' k nearest
  gallery neighbours — a candidate whose own neighbourhood looks like the query's rises, a lone look-alike
  falls. Not in the embedding space: :func:`kreciprocal_scores` re-scores a candidate list.

All run on the embeddings already computed, chunked so that one ``chunk x gallery`` similarity block is the
largest thing in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("none", "aqe", "dba", "dba+aqe", "kreciprocal")
EMBEDDING_METHODS = ("aqe", "dba", "dba+aqe")  # those that change the embeddings (rerank_embeddings)


def top_neighbours(query: torch.Tensor, gallery: torch.Tensor, n: int, query_ids: torch.Tensor | None = None,
                   gallery_ids: torch.Tensor | None = None, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, gallery positions), each (Q, n), best first; a gallery item whose id equals the query's is
    never a neighbour. ``n`` is cut to the gallery size (minus one when ids can coincide)."""
    n = min(int(n), len(gallery) - (1 if query_ids is not None else 0))
    if n < 1:
        return query.new_zeros((len(query), 0)), torch.zeros((len(query), 0), dtype=torch.long, device=query.device)
    scores, positions = [], []
    gallery = gallery.float()
    for start in range(0, len(query), chunk):
        sims = query[start:start + chunk].float() @ gallery.T
        if query_ids is not None:
            same = query_ids[start:start + chunk, None] == gallery_ids[None, :]
            sims = sims.masked_fill(same, float("-inf"))
        top = torch.topk(sims, n, dim=1)
        scores.append(top.values)
        positions.append(top.indices)
    return torch.cat(scores), torch.cat(positions)


def expand(vectors: torch.Tensor, gallery: torch.Tensor, n: int, alpha: float, vector_ids: torch.Tensor | None = None,
           gallery_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``normalise(v + sum_i max(sim_i, 0)^alpha * g_i)`` over the ``n`` nearest gallery items ``g_i`` of each
    ``v`` (the αQE / DBA update)."""
    scores, positions = top_neighbours(vectors, gallery, n, vector_ids, gallery_ids)
    if scores.shape[1] == 0:
        return F.normalize(vectors.float(), dim=1)
    weights = scores.clamp(min=0) ** float(alpha)
    gallery = gallery.float()
    out = torch.empty((len(vectors), vectors.shape[1]), dtype=torch.float32, device=vectors.device)
    for start in range(0, len(vectors), 4096):  # the (chunk, n, dim) neighbour block, not (Q, n, dim)
        rows = slice(start, start + 4096)
        out[rows] = vectors[rows].float() + torch.einsum("qn,qnd->qd", weights[rows], gallery[positions[rows]])
    return F.normalize(out, dim=1)


def rerank_embeddings(method: str, query: torch.Tensor, gallery: torch.Tensor, query_ids: torch.Tensor,
                      gallery_ids: torch.Tensor, n: int = 5, alpha: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, gallery) after ``method``: ``none``, ``aqe``, ``dba`` or ``dba+aqe`` (DBA first, then αQE
    against the augmented gallery)."""
    if method not in ("none", *EMBEDDING_METHODS):
        raise ValueError(f"rerank method {method!r}: choose from none, {', '.join(EMBEDDING_METHODS)}")
    if "dba" in method:
        gallery = expand(gallery, gallery, n, alpha, gallery_ids, gallery_ids)
    if "aqe" in method:
        query = expand(query, gallery, n, alpha, query_ids, gallery_ids)
    return query, gallery


def kreciprocal_scores(scores: torch.Tensor, query_neighbours: torch.Tensor, candidate_neighbours: torch.Tensor,
                       lam: float = 0.3) -> torch.Tensor:
    """Re-scored candidates: ``(1 - lam) * scores + lam * J``, J the Jaccard overlap of the query's neighbour ids
    (Q, k) with each candidate's (Q, C, k). ``scores`` (Q, C) are the candidates' cosines; -1 ids are padding."""
    same = candidate_neighbours[..., :, None] == query_neighbours[:, None, None, :]
    valid = (candidate_neighbours >= 0)[..., :, None] & (query_neighbours >= 0)[:, None, None, :]
    shared = (same & valid).any(dim=-1).sum(dim=-1).float()
    sizes = (candidate_neighbours >= 0).sum(-1).float() + (query_neighbours >= 0).sum(-1, keepdim=True).float()
    jaccard = shared / (sizes - shared).clamp(min=1.0)
    return (1.0 - lam) * scores.float() + lam * jaccard

