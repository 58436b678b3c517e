"""A learned pairwise re-ranker: scores a (query, candidate) pair from both images' local features.

The embedding compares two images through one global vector each. The re-ranker looks at both images' trunk
feature maps together, cell against cell (in the spirit of open-metric-learning's pairwise re-ranker, which feeds
both images to one network), and re-orders a query's first candidates. It sits on top of a trained Embedder,
which it never changes:

- ``pool`` (fixed): each chosen trunk stage's map → adaptive average pool to ``grid x grid`` cells;
- ``encode`` (learned, one image at a time): a linear projection of each cell to ``dim``, plus stage and position
  embeddings → ``T = stages x grid²`` tokens. A gallery image's tokens can be computed once;
- ``score`` (learned, one pair at a time): each stage's token correlation matrix, summarised (best match on the
  other side, same-place similarity...) → a small MLP → a logit, plus a learned multiple of the pair's embedding
  cosine. The MLP's output starts at zero, so an untrained re-ranker keeps the embedding's order and
  training only has to learn corrections. A pair costs ``T² x dim`` multiply-adds: re-ranking 20 candidates takes
  well under a millisecond, and the whole thing trains on cached features in seconds an epoch;
- ``local_weight`` (not learned; chosen on the validation classes after training, 0 = off): plus ``local_weight``
  x how well each image's *raw* pooled cells find a match in the other's (the mean best-match cosine, both ways),
  on the cosine's scale. The learned projection and judge are fitted on training classes the embedder already
  separates; the raw cells are the trunk's own features, which carry over to unseen kinds of images.

A re-ranker file (:func:`save_reranker`) records the fingerprint of the Embedder whose trunk it reads: tokens
from another model's feature maps mean nothing to it, and :func:`check_embedder` refuses them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cbir.errors import CheckpointError, ConfigError
from cbir.models.checkpoint import hash_state

FORMAT = "cbir-pairwise-reranker/1"
GLOBAL_STAGES = ("cls", "cls_mean")  # ViT pooled vectors (1 x 1 "maps"): no local features to compare
# per stage, what the judge sees of a pair's token correlations (see PairwiseReranker.score)
EVIDENCE = ("query cells best match, mean", "candidate cells best match, mean", "query cells best match, worst",
            "candidate cells best match, worst", "same-place similarity, mean", "all pairs, mean")


def mutual_best_match(query_cells: torch.Tensor, candidate_cells: torch.Tensor) -> torch.Tensor:
    """``(Q, C)``: how well each side's cells find a match on the other, both ways — the mean best-match cosine of
    the query's cells ``(Q, T, d)`` among each candidate's ``(Q, C, S, d)`` and of the candidate's among the
    query's, averaged (cells unit length). The re-ranker's local term; training-free local matching."""
    correlation = torch.einsum("qtd,qcsd->qcts", query_cells, candidate_cells)
    return 0.5 * (correlation.amax(dim=3).mean(-1) + correlation.amax(dim=2).mean(-1))


def default_stages(channels: dict[str, int], count: int = 2) -> list[str]:
    """The trunk's last ``count`` stages that are feature maps (a ViT's pooled CLS entry is not)."""
    spatial = [stage for stage in channels if stage not in GLOBAL_STAGES]
    return spatial[-count:]


class PairwiseReranker(nn.Module):
    """``score(query tokens, candidate tokens, cosine)`` → one logit per pair (higher = same class)."""

    def __init__(self, channels: dict[str, int], dim: int = 64, grid: int = 4, hidden: int = 32,
                 dropout: float = 0.1, local_weight: float = 0.0) -> None:
        super().__init__()
        if not channels:
            raise ConfigError("reranker: no trunk stages to read (reranker.stages is empty)")
        if dim < 1 or grid < 1 or hidden < 1:
            raise ConfigError(f"reranker: dim={dim}, grid={grid}, hidden={hidden}: need positive sizes")
        self.config = {"channels": {str(k): int(v) for k, v in channels.items()}, "dim": int(dim), "grid": int(grid),
                       "hidden": int(hidden), "dropout": float(dropout), "local_weight": 0.0}
        self.stages = list(self.config["channels"])
        self.grid = int(grid)
        self.dim = int(dim)
        self.widths = list(self.config["channels"].values())
        self.local_width = max(self.widths)  # raw cells, zero-padded to the widest stage
        self.local_weight = local_weight
        self.project = nn.ModuleList([nn.Linear(width, dim) for width in self.widths])
        self.position = nn.Parameter(torch.zeros(len(self.stages), grid * grid, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.judge = nn.Sequential(nn.Linear(len(EVIDENCE) * len(self.stages) + 1, hidden), nn.GELU(),
                                   nn.Dropout(dropout), nn.Linear(hidden, 1))
        nn.init.zeros_(self.judge[-1].weight)
        nn.init.zeros_(self.judge[-1].bias)
        self.cosine_scale = nn.Parameter(torch.tensor(10.0))

    @property
    def num_tokens(self) -> int:
        return len(self.stages) * self.grid * self.grid

    @property
    def local_weight(self) -> float:
        """Weight of the raw cells' best-match similarity in :meth:`score` (0: tokens carry no raw cells)."""
        return self.config["local_weight"]

    @local_weight.setter
    def local_weight(self, value: float) -> None:
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ConfigError(f"reranker: local_weight={value}: need a number >= 0")
        self.config["local_weight"] = float(value)

    def pool(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The chosen stages of a trunk's output, each ``(B, grid², C)`` (not learned: cacheable)."""
        missing = [stage for stage in self.stages if stage not in features]
        if missing:
            raise ConfigError(f"reranker reads trunk stage {missing[0]!r}, which this model does not have "
                              f"(it has {', '.join(features)}): it was trained on another model")
        return [F.adaptive_avg_pool2d(features[stage].float(), self.grid).flatten(2).transpose(1, 2)
                for stage in self.stages]

    def encode(self, pooled: Sequence[torch.Tensor], local: bool | None = None) -> torch.Tensor:
        """Pooled stages → unit-length tokens ``(B, T, dim)`` (projected cells that know their stage and place);
        with ``local`` (default: when :attr:`local_weight` > 0) each token is followed by its raw cell, unit length
        and zero-padded to the widest stage: ``(B, T, dim + local_width)``."""
        tokens = [project(cells.float()) + self.position[i] for i, (project, cells)
                  in enumerate(zip(self.project, pooled, strict=True))]
        tokens = F.normalize(torch.cat(tokens, dim=1), dim=-1)
        if not (self.local_weight > 0 if local is None else local):
            return tokens
        raw = torch.cat([F.pad(F.normalize(cells.float(), dim=-1), (0, self.local_width - cells.shape[-1]))
                         for cells in pooled], dim=1)
        return torch.cat([tokens, raw], dim=-1)

    def tokens(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(self.pool(features))

    def score(self, query: torch.Tensor, candidates: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
        """Logits ``(Q, C)`` of query tokens ``(Q, T, dim)`` against candidate tokens ``(Q, C, T, dim)`` whose
        embedding cosines are ``(Q, C)``. Each stage's token correlation matrix is summarised (:data:`EVIDENCE`):
        how well the query's cells are matched anywhere in the candidate and the candidate's in the query (on
        average and at worst), how alike the same places are, and the overall likeness — local evidence that the
        single global vector averaged away. Summaries, not the cells themselves, reach the judging MLP: it cannot
        learn the training classes' cells by heart, only what a match looks like (which holds for unseen ones)."""
        if candidates.shape[0] == 0 or candidates.shape[1] == 0:
            return cosine.float() * self.cosine_scale
        cells, evidence, local = self.grid * self.grid, [], 0.0
        with_local = self.local_weight > 0 and query.shape[-1] > self.dim
        if self.local_weight > 0 and not with_local:
            raise ConfigError("reranker: local_weight > 0 but the tokens carry no raw cells (encode them with "
                              "local=True)")
        for i in range(len(self.stages)):
            block = slice(i * cells, (i + 1) * cells)
            correlation = torch.einsum("qtd,qcsd->qcts", query[:, block, :self.dim].float(),
                                       candidates[:, :, block, :self.dim].float())
            query_best, candidate_best = correlation.amax(dim=3), correlation.amax(dim=2)
            evidence += [query_best.mean(-1), candidate_best.mean(-1), query_best.amin(-1), candidate_best.amin(-1),
                         torch.diagonal(correlation, dim1=2, dim2=3).mean(-1), correlation.mean(dim=(2, 3))]
            if with_local:
                raw = slice(self.dim, self.dim + self.widths[i])  # this stage's width; the rest is padding
                local = local + mutual_best_match(query[:, block, raw].float(),
                                                  candidates[:, :, block, raw].float()) / len(self.stages)
        evidence = torch.stack([*evidence, cosine.float()], dim=-1)
        logits = self.judge(evidence).squeeze(-1) + self.cosine_scale * cosine.float()
        return logits + self.cosine_scale.abs() * self.local_weight * local if with_local else logits


def rerank_order(reranker: PairwiseReranker, query_tokens: torch.Tensor, candidate_tokens: torch.Tensor,
                 cosine: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Each row's candidate positions ``(Q, C)`` sorted by the re-ranker's score, best first (ties keep the
    embedding's order); scored ``batch`` queries at a time, without gradients."""
    order = []
    with torch.no_grad():
        for start in range(0, len(query_tokens), batch):
            rows = slice(start, start + batch)
            logits = reranker.score(query_tokens[rows], candidate_tokens[rows], cosine[rows])
            order.append(torch.argsort(logits, dim=1, descending=True, stable=True))
    return torch.cat(order) if order else torch.zeros(cosine.shape, dtype=torch.long)


def embedder_fingerprint(embedder: nn.Module) -> str:
    """Hash of the trunk's weights and input size: the re-ranker is only valid on the feature maps it learned."""
    digest = hashlib.sha256(repr(getattr(embedder, "input_size", None)).encode())
    hash_state(digest, embedder.backbone)
    return digest.hexdigest()


def save_reranker(reranker: PairwiseReranker, path: str | Path, *, embedder: nn.Module, candidates: int,
                  extra: dict | None = None) -> Path:
    """The re-ranker, its config, how many candidates it re-orders and the Embedder it belongs to, in one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "config": reranker.config, "state_dict": reranker.state_dict(),
                "candidates": int(candidates), "embedder_fingerprint": embedder_fingerprint(embedder),
                **(extra or {})}, tmp)
    tmp.replace(path)  # never a half-written file under the real name
    return path


def load_reranker(path: str | Path) -> tuple[PairwiseReranker, dict]:
    """The re-ranker in ``path`` (eval mode) and the file's other fields (``candidates``, the fingerprint...)."""
    path = Path(path)
    if path.is_dir():
        path = path / "reranker.pt"
    if not path.is_file():
        raise CheckpointError(f"reranker: {path} does not exist (train one with `python train.py stage=reranker "
                              "reranker.embedder=<run>`)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged user file
        raise CheckpointError(f"reranker: cannot read {path} ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise CheckpointError(f"reranker: {path} is not a cbir pairwise re-ranker (expected format {FORMAT})")
    reranker = PairwiseReranker(**saved["config"])
    reranker.load_state_dict(saved["state_dict"])
    reranker.eval()
    info = {k: v for k, v in saved.items() if k not in ("config", "state_dict")}
    info["path"] = str(path)
    return reranker, info


def check_embedder(info: dict, embedder: nn.Module) -> None:
    """ConfigError unless ``embedder`` is the model the re-ranker was trained on."""
    if info.get("embedder_fingerprint") != embedder_fingerprint(embedder):
        raise ConfigError(f"reranker {info.get('path', '')} was trained on another model's features (embedder "
                          "fingerprint differs): use the re-ranker trained for this checkpoint/bundle, or train one "
                          "with `python train.py stage=reranker reranker.embedder=<this run>`")
