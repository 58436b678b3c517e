"""Retrieval metrics, computed in one place for validation, ``eval.py`` and the index benchmark.

Definitions (the ones used in the metric-learning literature, e.g. Musgrave et al., "A Metric Learning
Reality Check", 2020):

* ``precision_at_1``: fraction of queries whose nearest gallery item has the query's label.
* ``recall_at_k``: fraction of queries with at least one same-label item among their k nearest.
* ``r_precision``: precision among the R nearest, R = number of same-label gallery items.
* ``map_at_r``: mean average precision over the R nearest (MAP@R).
* ``knn_accuracy``, ``knn_macro_f1`` (with ``knn_k``): k-NN classification — each query's label is the
  similarity-weighted vote of its ``knn_k`` nearest gallery items (negative similarities count 0; ties go
  to the label of the better-ranked item), as :meth:`cbir.Searcher.classify` does; accuracy over queries,
  and F1 averaged over the query classes.

Similarity is the inner product (cosine similarity for the L2-normalised embeddings an ``Embedder``
returns). Ties are broken by gallery position (earlier first), exactly as a stable sort would, so results
never depend on the order a kernel happens to return. A query with no same-label gallery item (a class of
size one in the all-vs-all protocol) has no defined MAP@R; such queries are left out of every metric and
counted in ``num_queries_excluded``.

Memory stays bounded: queries are processed in chunks sized so that one chunk's ``chunk x gallery``
similarity block fits ``memory_budget_mb``; the full query x gallery matrix is never built.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY
from cbir.ranks import distributed_world_size

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)

# bytes held per (query, gallery) pair inside one chunk: similarity, relevance, self mask, tie cumsum, ...
_BYTES_PER_PAIR = 24


def retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    *,
    query_ids: torch.Tensor | None = None,
    gallery_ids: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    memory_budget_mb: float = 256.0,
    knn_k: int | None = None,
    reorder: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    min_depth: int = 0,
) -> dict[str, float]:
    """Compute retrieval metrics of ``query`` embeddings against ``gallery`` embeddings.

    ``reorder(sims, ranked, rows)`` (a re-ranker) may re-order each chunk's ranked gallery positions, at least
    ``min_depth`` deep, before they are scored; ``rows`` are the chunk's positions in ``query``.

    With ``gallery=None`` the protocol is all-vs-all: every query searches all *other* queries (CUB, SOP,
    zero-shot splits). Otherwise it is query-vs-gallery (Fashion-MNIST test→train, In-Shop); pass
    ``query_ids``/``gallery_ids`` when the two sets share items, and pairs with equal ids are skipped.
    """
    if gallery is None:
        if gallery_labels is not None or gallery_ids is not None:
            raise ValueError("gallery_labels/gallery_ids given without a gallery")
        gallery, gallery_labels = query, query_labels
        query_ids = gallery_ids = torch.arange(len(query), device=query.device)
    elif gallery_labels is None:
        raise ValueError("gallery given without gallery_labels")
    if (query_ids is None) != (gallery_ids is None):
        raise ValueError("pass both query_ids and gallery_ids, or neither")
    _check_inputs(query, query_labels, "query")
    _check_inputs(gallery, gallery_labels, "gallery")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} != gallery dim {gallery.shape[1]}")

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    num_gallery = len(gallery)
    gallery = gallery.float()
    chunk = max(1, int(memory_budget_mb * 2**20 // (_BYTES_PER_PAIR * max(num_gallery, 1))))

    if knn_k is not None and int(knn_k) < 1:
        raise ValueError(f"knn_k must be >= 1, got {knn_k}")
    classes = torch.unique(gallery_labels) if knn_k else None
    predicted, truth = [], []
    totals = empty_totals(ks)
    evaluated = 0
    for start in range(0, len(query), chunk):
        stop = min(start + chunk, len(query))
        sims = query[start:stop].float() @ gallery.T
        relevant = query_labels[start:stop, None] == gallery_labels[None, :]
        if query_ids is not None:
            same_item = query_ids[start:stop, None] == gallery_ids[None, :]
            sims.masked_fill_(same_item, float("-inf"))
            relevant &= ~same_item
        num_relevant = relevant.sum(dim=1)
        keep = num_relevant > 0
        if not keep.any():
            continue
        sims, relevant, num_relevant = sims[keep], relevant[keep], num_relevant[keep]

        depth = min(max(ks[-1], int(num_relevant.max()), int(knn_k or 0), min_depth), num_gallery)
        ranked = stable_topk_indices(sims, depth)
        if reorder is not None:
            ranked = reorder(sims, ranked, torch.arange(start, stop, device=sims.device)[keep])
        if knn_k:
            predicted.append(_knn_vote(sims, ranked[:, :knn_k], gallery_labels, classes))
            truth.append(query_labels[start:stop][keep])
        accumulate_ranked_hits(totals, relevant.gather(1, ranked), num_relevant, ks)
        evaluated += int(keep.sum())

    result = mean_totals(totals, evaluated)
    if knn_k:
        result.update(_classification_scores(torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long),
                                             torch.cat(truth) if truth else torch.zeros(0, dtype=torch.long)))
    result["num_queries"] = float(evaluated)
    result["num_queries_excluded"] = float(len(query) - evaluated)
    return result


def empty_totals(ks: Sequence[int]) -> dict[str, float]:
    """The metric sums :func:`accumulate_ranked_hits` adds to, at zero."""
    return {"precision_at_1": 0.0, "r_precision": 0.0, "map_at_r": 0.0, **{f"recall_at_{k}": 0.0 for k in ks}}


def mean_totals(totals: dict[str, float], evaluated: int) -> dict[str, float]:
    """The sums as means over the ``evaluated`` queries (NaN when there were none)."""
    return {name: (value / evaluated if evaluated else float("nan")) for name, value in totals.items()}


def accumulate_ranked_hits(totals: dict[str, float], hits: torch.Tensor, num_relevant: torch.Tensor,
                           ks: Sequence[int]) -> None:
    """Add a chunk of ranked lists to the metric sums: ``hits[q, i]`` is whether query q's i-th result has its
    label, ``num_relevant[q]`` (R) how many gallery items do. Results past the list's end count as misses, so a
    list shorter than R (an ANN index's) lowers R-precision and MAP@R as it would a user's search."""
    positions = torch.arange(hits.shape[1], device=hits.device)
    within_r = positions[None, :] < num_relevant[:, None]
    hits_f = hits.float()
    precision_at_i = hits_f.cumsum(dim=1) / (positions + 1)
    totals["precision_at_1"] += hits_f[:, 0].sum().item()
    for k in ks:
        totals[f"recall_at_{k}"] += hits[:, :k].any(dim=1).float().sum().item()
    totals["r_precision"] += ((hits_f * within_r).sum(1) / num_relevant).sum().item()
    totals["map_at_r"] += ((precision_at_i * hits_f * within_r).sum(1) / num_relevant).sum().item()


def kreciprocal_retrieval_metrics(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                                  gallery_labels: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                                  ks: Sequence[int] = DEFAULT_KS, k: int = 5, candidates: int = 100,
                                  lam: float = 0.3, chunk: int = 256) -> dict[str, float]:
    """:func:`retrieval_metrics` after k-reciprocal re-ranking (:func:`cbir.evaluation.rerank.kreciprocal_scores`)
    of each query's top ``candidates``: the rest of the ranking stays as it was. Pairs with equal ids are
    skipped (the query itself). No k-NN classification columns. ``chunk`` rows are re-scored at a time (their
    ``chunk x candidates x k x k`` neighbour comparison is the largest block)."""
    from cbir.evaluation.rerank import kreciprocal_scores, top_neighbours

    gallery = gallery.float()
    _, gallery_neighbours = top_neighbours(gallery, gallery, k, gallery_ids, gallery_ids)

    def reorder(sims: torch.Tensor, ranked: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        ranked = ranked.clone()
        for rows in torch.arange(len(ranked)).split(chunk):
            top = ranked[rows, :min(candidates, ranked.shape[1])]
            rescored = kreciprocal_scores(sims[rows].gather(1, top), ranked[rows, :k], gallery_neighbours[top], lam)
            ranked[rows, :top.shape[1]] = top.gather(1, torch.argsort(rescored, dim=1, descending=True, stable=True))
        return ranked

    return retrieval_metrics(query, query_labels, gallery, gallery_labels, query_ids=query_ids,
                             gallery_ids=gallery_ids, ks=ks, reorder=reorder, min_depth=candidates)


def _knn_vote(sims: torch.Tensor, top: torch.Tensor, gallery_labels: torch.Tensor,
              classes: torch.Tensor) -> torch.Tensor:
    """The similarity-weighted label vote of each row's ``top`` neighbours (positions into the gallery)."""
    weights = sims.gather(1, top).float().clamp(min=0)
    weights = torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))
    # a vanishing bonus for better ranks: equal votes go to the label met first, as Searcher.classify does
    weights = weights + 1e-6 * torch.linspace(1.0, 0.0, top.shape[1], device=weights.device)
    class_index = torch.searchsorted(classes, gallery_labels[top])
    votes = torch.zeros(len(top), len(classes), device=weights.device).scatter_add_(1, class_index, weights)
    return classes[votes.argmax(dim=1)]


def _classification_scores(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    if len(truth) == 0:
        return {"knn_accuracy": float("nan"), "knn_macro_f1": float("nan")}
    f1s = []
    for label in torch.unique(truth):
        tp = ((predicted == label) & (truth == label)).sum().item()
        fp = ((predicted == label) & (truth != label)).sum().item()
        fn = ((predicted != label) & (truth == label)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"knn_accuracy": (predicted == truth).float().mean().item(), "knn_macro_f1": sum(f1s) / len(f1s)}


def stable_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, highest first, ties broken by column (lower first).

    Equivalent to ``torch.sort(scores, descending=True, stable=True).indices[:, :k]`` but costs a top-k
    plus a few linear passes instead of a full sort of every row.
    """
    num_cols = scores.shape[1]
    if k >= num_cols:
        return torch.sort(scores, dim=1, descending=True, stable=True).indices
    kth = scores.topk(k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    still_needed = k - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=1) <= still_needed))
    columns = chosen.nonzero()[:, 1].view(-1, k)  # ascending column order inside each row
    order = torch.sort(scores.gather(1, columns), dim=1, descending=True, stable=True).indices
    return columns.gather(1, order)


def _check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"{name} embeddings must be 2-D (n, dim), got shape {tuple(embeddings.shape)}")
    if labels.ndim != 1 or len(labels) != len(embeddings):
        raise ValueError(f"{name} labels must be 1-D with {len(embeddings)} entries, got {tuple(labels.shape)}")
    if len(embeddings) == 0:
        raise ValueError(f"{name} set is empty")
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{name} embeddings contain NaN or Inf (did training diverge?)")


def all_gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (first dim may differ per rank) from every process; identity when not
    running distributed. Pads to the largest rank's length, gathers, then trims, because collective ops
    need equal shapes."""
    world = distributed_world_size()
    if world == 1:
        return tensor
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, lengths)])


def unique_by_id(ids: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep the first row of each id (distributed samplers pad with duplicates), sorted by id."""
    unique_ids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    first = torch.full((len(unique_ids),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
    return (unique_ids, *(t[first] for t in tensors))


def perfect_reorder(query_labels: torch.Tensor, gallery_labels: torch.Tensor,
                    depth: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``reorder`` for :func:`retrieval_metrics` that knows the answers: each query's first ``depth`` hits with
    its label go first (in the embedding's order), the others after them. The metrics it gives are the ceiling
    of *any* re-ranker of the first ``depth`` hits: what re-ordering can gain at most, and, against a learned
    re-ranker's row, how much of that it reaches. A diagnostic for evaluation only (it reads the labels)."""
    if int(depth) < 1:
        raise ValueError(f"ceiling: the number of hits re-ordered must be >= 1, got {depth}")

    def reorder(sims: torch.Tensor, ranked: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        top = ranked[:, :int(depth)]
        # -inf: the query itself (or a pair skipped by id) padded into a short list, never a right answer
        right = (query_labels[rows][:, None] == gallery_labels[top]) & torch.isfinite(sims.gather(1, top))
        return sort_first_hits(ranked, right.to(torch.int8))

    return reorder


def sort_first_hits(ranked: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``ranked`` (gallery positions, best first) with its first ``scores.shape[1]`` columns sorted by ``scores``,
    highest first; ties keep the embedding's order. The rest of each row is left where it was."""
    depth = scores.shape[1]
    ranked = ranked.clone()
    ranked[:, :depth] = ranked[:, :depth].gather(1, torch.argsort(scores, dim=1, descending=True, stable=True))
    return ranked


def evaluate_embeddings(embeddings: torch.Tensor, labels: torch.Tensor, roles: torch.Tensor,
                        ks: Sequence[int] = DEFAULT_KS, knn_k: int | None = None, rerank: str = "none",
                        rerank_n: int = 5, rerank_alpha: float = 3.0) -> dict[str, float]:
    """Metrics for one evaluation set: all-vs-all when every item is both query and gallery,
    otherwise query-vs-gallery by role (items in both sets are not matched with themselves). ``rerank``:
    ``aqe`` / ``dba`` / ``dba+aqe`` / ``kreciprocal`` (:mod:`cbir.evaluation.rerank`) on the same embeddings
    first, or ``ceiling``: each query's first ``rerank_n`` hits re-ordered perfectly (:func:`perfect_reorder`)."""
    is_query = (roles & ROLE_QUERY).bool()
    is_gallery = (roles & ROLE_GALLERY).bool()
    ceiling = {}
    if rerank == "ceiling":  # the plain search below, its first rerank_n hits put in the right order
        ceiling = {"reorder": perfect_reorder(labels[is_query], labels[is_gallery], rerank_n), "min_depth": rerank_n}
        rerank = "none"
    if rerank != "none":
        from cbir.evaluation.rerank import rerank_embeddings

        if not (is_query.any() and is_gallery.any()):
            return evaluate_embeddings(embeddings, labels, roles, ks, knn_k)
        ids = torch.arange(len(labels), device=labels.device)
        if rerank == "kreciprocal":
            return kreciprocal_retrieval_metrics(embeddings[is_query], labels[is_query], embeddings[is_gallery],
                                                 labels[is_gallery], ids[is_query], ids[is_gallery], ks, k=rerank_n)
        query, gallery = rerank_embeddings(rerank, embeddings[is_query], embeddings[is_gallery], ids[is_query],
                                           ids[is_gallery], rerank_n, rerank_alpha)
        return retrieval_metrics(query, labels[is_query], gallery, labels[is_gallery], query_ids=ids[is_query],
                                 gallery_ids=ids[is_gallery], ks=ks, knn_k=knn_k)
    if bool(is_query.all()) and bool(is_gallery.all()):
        return retrieval_metrics(embeddings, labels, ks=ks, knn_k=knn_k, **ceiling)
    if not (is_query.any() and is_gallery.any()):
        # only happens when evaluation is truncated (fast_dev_run, limit_*_batches)
        warnings.warn("evaluation saw no queries or no gallery items; metrics skipped", stacklevel=2)
        return {}
    ids = torch.arange(len(labels), device=labels.device)
    return retrieval_metrics(embeddings[is_query], labels[is_query], embeddings[is_gallery], labels[is_gallery],
                             query_ids=ids[is_query], gallery_ids=ids[is_gallery], ks=ks, knn_k=knn_k, **ceiling)
