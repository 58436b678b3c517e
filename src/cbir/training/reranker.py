"""Training the pairwise re-ranker (:mod:`cbir.models.pairwise`) on a trained, frozen Embedder.

The Embedder embeds the training images once and its trunk's chosen stages are pooled and cached, so the
re-ranker trains on tensors, not images (seconds an epoch on a CPU). Each training query is an *augmented* view
of a training image (``views`` of them; the training augmentation), searched against the clean training images
with itself left out: its first ``candidates`` hits are what the re-ranker learns to re-order — the embedding's
own hard negatives, seen the way unseen queries are (an augmented view ranks less perfectly than the clean
image the embedder memorised). The loss is listwise: softmax over a query's candidates, all positives together
(``-log sum_pos p``). The epoch kept is the one with the best MAP@R on the held-out *validation* classes after
re-ranking; the test classes are never seen. Then the weight of the training-free local term
(:attr:`PairwiseReranker.local_weight`) is chosen the same way, from ``local_weights``: the one with the best
validation MAP@R (ties: the smaller weight, so 0 — off — unless the term helps).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cbir.errors import ConfigError, DataError
from cbir.evaluation.metrics import evaluate_embeddings
from cbir.evaluation.pairwise import pairwise_evaluate
from cbir.evaluation.rerank import top_neighbours
from cbir.models.pairwise import PairwiseReranker

log = logging.getLogger(__name__)


@dataclass
class CachedFeatures:
    """One pass of the frozen Embedder over a set: embeddings, the re-ranker's pooled stages, labels, ids."""

    embeddings: torch.Tensor  # (N, D), L2-normalised
    pooled: list[torch.Tensor]  # per stage (N, grid², C), float16
    labels: torch.Tensor
    ids: torch.Tensor  # catalog indices: a view of image i never retrieves image i
    roles: torch.Tensor  # ROLE_QUERY / ROLE_GALLERY bits (an evaluation set's), both for a training set

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RerankerOptions:
    candidates: int = 20  # first hits re-ordered (training and use)
    epochs: int = 10
    lr: float = 3e-4
    weight_decay: float = 0.05
    batch_queries: int = 64
    views: int = 2  # augmented query views of each training image
    seed: int = 0
    local_weights: tuple[float, ...] = (0.0,)  # local-term weights tried on validation after training


def extract_features(embedder: torch.nn.Module, reranker: PairwiseReranker, batches: Iterable[dict],
                     description: str, total: int | None = None) -> CachedFeatures:
    """Embeddings and pooled stages of every image in ``batches`` (``{"image", "label", "index"}`` dicts)."""
    embeddings, labels, ids, roles = [], [], [], []
    pooled: list[list[torch.Tensor]] = [[] for _ in reranker.stages]
    embedder.eval()
    with torch.no_grad():
        for batch in tqdm(batches, desc=description, unit="batch", total=total, leave=False):
            if "image" not in batch:  # every image of the batch was unreadable (data.on_bad_image=skip)
                continue
            features = embedder.backbone(batch["image"])
            embeddings.append(F.normalize(embedder.head(features).float(), dim=1))
            for store, cells in zip(pooled, reranker.pool(features), strict=True):
                store.append(cells.half())
            labels.append(torch.as_tensor(batch["label"]))
            ids.append(torch.as_tensor(batch["index"]))
            roles.append(torch.as_tensor(batch["role"]))
    if not embeddings:
        raise DataError(f"{description}: no readable images")
    return CachedFeatures(torch.cat(embeddings), [torch.cat(s) for s in pooled], torch.cat(labels), torch.cat(ids),
                          torch.cat(roles))


def candidate_lists(queries: CachedFeatures, gallery: CachedFeatures,
                    candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosines, gallery positions), each (Q, C): every query's first hits, its own image left out."""
    return top_neighbours(queries.embeddings, gallery.embeddings, candidates, queries.ids, gallery.ids)


def listwise_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over queries that have a positive and a negative among their candidates of
    ``logsumexp(all) - logsumexp(positives)``; 0 (with a gradient path) when none has."""
    useful = positive.any(dim=1) & (~positive).any(dim=1)
    if not useful.any():
        return logits.sum() * 0.0
    logits, positive = logits[useful], positive[useful]
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~positive, -1e4), dim=1)).mean()


def tokens_of(reranker: PairwiseReranker, features: CachedFeatures, rows: torch.Tensor | slice | None = None,
              batch: int = 1024, local: bool | None = None) -> torch.Tensor:
    """Encoded tokens of ``features`` (all of them, or ``rows``), ``batch`` images at a time; ``local``: as
    :meth:`PairwiseReranker.encode`."""
    pooled = features.pooled if rows is None else [p[rows] for p in features.pooled]
    count = len(pooled[0])
    return torch.cat([reranker.encode([p[start:start + batch] for p in pooled], local=local)
                      for start in range(0, count, batch)]) if count else pooled[0].new_zeros((0,))


def validation_metrics(reranker: PairwiseReranker | None, val: CachedFeatures, candidates: int,
                       tokens: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics on ``val`` (queries vs gallery by role; all-vs-all when every item is both) after re-ranking, or
    in the embedding's order when ``reranker`` is None. ``tokens``: ``val``'s, encoded already."""
    if reranker is None:
        return evaluate_embeddings(val.embeddings, val.labels, val.roles)
    was_training = reranker.training
    reranker.eval()
    with torch.no_grad():
        tokens = tokens_of(reranker, val) if tokens is None else tokens
        metrics = pairwise_evaluate(val.embeddings, val.labels, val.roles, tokens, reranker, candidates)
    reranker.train(was_training)
    return metrics


def check_local_weights(weights: Iterable[float]) -> tuple[float, ...]:
    """``reranker.local_weights`` as floats; a ConfigError unless each is a finite number >= 0."""
    weights = tuple(float(w) for w in weights)
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"reranker.local_weights: {list(weights)}: need numbers >= 0")
    return weights


def choose_local_weight(reranker: PairwiseReranker, val: CachedFeatures, candidates: int,
                        weights: Iterable[float]) -> tuple[float, dict[float, dict[str, float]]]:
    """Set ``reranker.local_weight`` to the one of ``weights`` with the best validation MAP@R (ties: the
    smaller) and return it with each weight's validation metrics."""
    weights = sorted(set(check_local_weights(weights)))
    with torch.no_grad():
        tokens = tokens_of(reranker, val, local=True)
    scores: dict[float, dict[str, float]] = {}
    best = None
    for weight in weights:
        reranker.local_weight = weight
        metrics = validation_metrics(reranker, val, candidates, tokens)
        scores[weight] = {k: metrics[k] for k in ("precision_at_1", "map_at_r")}
        if best is None or scores[weight]["map_at_r"] > scores[best]["map_at_r"]:
            best = weight
    reranker.local_weight = best
    log.info("re-ranker local term: weight %g kept on validation (%s)", best,
             ", ".join(f"{w:g}: MAP@R {s['map_at_r']:.4f}" for w, s in scores.items()))
    return best, scores


def fit_reranker(reranker: PairwiseReranker, queries: CachedFeatures, gallery: CachedFeatures,
                 val: CachedFeatures | None, options: RerankerOptions) -> tuple[PairwiseReranker, dict]:
    """Train ``reranker`` on ``queries`` (augmented views) against ``gallery`` (the clean training images); keep
    the epoch with the best validation MAP@R (the last epoch without ``val``). Returns the kept re-ranker and a
    report: validation MAP@R / P@1 before (plain embedding) and after, the epoch kept, the losses."""
    generator = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)
    cosine, positions = candidate_lists(queries, gallery, options.candidates)
    positive = queries.labels[:, None] == gallery.labels[positions]
    useful = positive.any(1) & (~positive).any(1)
    log.info("re-ranker training: %d query views, %d with a positive and a negative among their first %d hits",
             len(queries), int(useful.sum()), positions.shape[1])
    if not useful.any():
        raise ConfigError("re-ranker: no training query has both a right and a wrong hit among its candidates "
                         "(nothing to learn); raise reranker.candidates or use more classes")
    query_rows = torch.nonzero(useful).flatten()
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    steps = options.epochs * math.ceil(len(query_rows) / options.batch_queries)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=options.lr, total_steps=max(steps, 1),
                                                   pct_start=0.1)
    report: dict = {"candidates": positions.shape[1], "training_queries": int(len(query_rows)), "epochs": []}
    if val is not None:
        before = validation_metrics(None, val, options.candidates)
        report["val_before"] = {k: before[k] for k in ("precision_at_1", "map_at_r")}
    best_score, best_state = -1.0, copy.deepcopy(reranker.state_dict())
    progress = tqdm(range(options.epochs), desc="re-ranker", unit="epoch", leave=False)
    for epoch in progress:
        reranker.train()
        order = query_rows[torch.randperm(len(query_rows), generator=generator)]
        losses = []
        for start in range(0, len(order), options.batch_queries):
            rows = order[start:start + options.batch_queries]
            query_tokens = tokens_of(reranker, queries, rows)
            candidate_tokens = tokens_of(reranker, gallery, positions[rows].flatten()).view(
                len(rows), positions.shape[1], reranker.num_tokens, -1)
            loss = listwise_loss(reranker.score(query_tokens, candidate_tokens, cosine[rows]), positive[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reranker.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        entry = {"epoch": epoch + 1, "loss": sum(losses) / len(losses)}
        if val is not None:
            metrics = validation_metrics(reranker, val, options.candidates)
            entry.update(val_precision_at_1=metrics["precision_at_1"], val_map_at_r=metrics["map_at_r"])
            score = metrics["map_at_r"]
        else:
            score = float(epoch)
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(reranker.state_dict())
            report["kept_epoch"] = epoch + 1
        report["epochs"].append(entry)
        progress.set_postfix({k: round(v, 4) for k, v in entry.items() if k != "epoch"})
        log.info("re-ranker epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in entry.items()
                                                                 if k != "epoch"))
    reranker.load_state_dict(best_state)
    reranker.eval()
    if val is not None:
        kept = report["epochs"][report["kept_epoch"] - 1]
        report["val_after"] = {"precision_at_1": kept["val_precision_at_1"], "map_at_r": kept["val_map_at_r"]}
        if any(w > 0 for w in options.local_weights):
            weight, scores = choose_local_weight(reranker, val, options.candidates, options.local_weights)
            report["local_weights"] = {f"{w:g}": s for w, s in scores.items()}
            report["local_weight"] = weight
            report["val_after"] = scores[weight]
    return reranker, report
