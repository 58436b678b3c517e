"""Heads that fuse several backbone stages into one embedding.

Both end like :class:`~cbir.models.pooling.GeMHead`: a linear projection to ``dim`` → optional BN; the
``Embedder`` L2-normalises. Stages are named or indexed (``-2`` = penultimate, ``-1`` = last) so one head
config fits every backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cbir.errors import ConfigError
from cbir.models.pooling import GeM, resolve_stage

FUSE_MODES = ("concat", "sum")


class FusionHead(nn.Module):
    """Multi-stage GeM: GeM on each of ``stages`` (e.g. layer3 + layer4) → linear to ``branch_dim`` →
    L2 norm → fused → linear to ``dim`` → optional BN.

    ``fuse="concat"`` concatenates the branches; ``fuse="sum"`` adds them with learned softmax weights.
    Branches are L2-normalised before fusion so a deep stage's larger activations do not drown a
    shallower one and the fusion weights compare like with like.
    """

    def __init__(self, channels: dict[str, int], dim: int = 512, stages: Sequence[str | int] = (-2, -1),
                 fuse: str = "concat", branch_dim: int | None = None, bn: bool = True, p: float = 3.0) -> None:
        super().__init__()
        self.stages = [resolve_stage(channels, s, key="head.stages") for s in stages]
        if len(set(self.stages)) < 2 or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"head.stages={list(stages)!r}: give two or more different stages "
                              f"({', '.join(channels)})")
        if fuse not in FUSE_MODES:
            raise ConfigError(f"head.fuse={fuse!r}: choose one of {', '.join(FUSE_MODES)}")
        self.dim = dim
        self.fuse = fuse
        branch_dim = int(branch_dim or dim)
        self.pools = nn.ModuleDict({s: GeM(p) for s in self.stages})
        self.branches = nn.ModuleDict({s: nn.Linear(channels[s], branch_dim) for s in self.stages})
        if fuse == "sum":
            self.fuse_logits = nn.Parameter(torch.zeros(len(self.stages)))  # softmax → equal weights at init
            fused_dim = branch_dim
        else:
            fused_dim = branch_dim * len(self.stages)
        self.proj = nn.Linear(fused_dim, dim)
        self.bn = nn.BatchNorm1d(dim) if bn else nn.Identity()

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [F.normalize(self.branches[s](self.pools[s](features[s])), dim=1) for s in self.stages]
        if self.fuse == "sum":
            weights = torch.softmax(self.fuse_logits, dim=0)
            fused = sum(w * part for w, part in zip(weights, parts))
        else:
            fused = torch.cat(parts, dim=1)
        return self.bn(self.proj(fused))


class DOLGHead(nn.Module):
    """DOLG-style orthogonal fusion of local and global features (Yang et al., "DOLG: Single-Stage Image
    Retrieval with Deep Orthogonal Fusion of Local and Global Features", ICCV 2021).

    Global: GeM on ``global_stage`` (the last) → linear to ``local_dim`` = f_g. Local: ``local_stage``
    (the penultimate) → 1×1 conv → BN → ReLU, L2-normalised per position and weighted by a spatial
    attention map (1×1 conv → ReLU → 1×1 conv → softplus). Each local feature keeps only its component
    orthogonal to f_g (what the global vector does not already say), these are average-pooled,
    concatenated with f_g, and projected to ``dim`` → optional BN.

    Simplified: the paper's local branch runs multi-atrous convolutions (dilations 6/12/18 plus image
    pooling) before the attention; here a single 1×1 reduction does, which is cheaper and works on the
    small feature maps of low-resolution inputs.
    """

    def __init__(self, channels: dict[str, int], dim: int = 512, local_stage: str | int = -2,
                 global_stage: str | int = -1, local_dim: int = 512, bn: bool = True, p: float = 3.0) -> None:
        super().__init__()
        self.local_stage = resolve_stage(channels, local_stage, key="head.local_stage")
        self.global_stage = resolve_stage(channels, global_stage, key="head.global_stage")
        if self.local_stage == self.global_stage:
            raise ConfigError(f"head.local_stage and head.global_stage are both {self.local_stage!r}; "
                              "DOLG fuses two different stages")
        self.dim = dim
        self.local_reduce = nn.Sequential(
            nn.Conv2d(channels[self.local_stage], local_dim, 1, bias=False), nn.BatchNorm2d(local_dim), nn.ReLU())
        self.attention = nn.Sequential(
            nn.Conv2d(local_dim, local_dim, 1), nn.ReLU(), nn.Conv2d(local_dim, 1, 1), nn.Softplus())
        self.global_pool = GeM(p)
        self.global_proj = nn.Linear(channels[self.global_stage], local_dim)
        self.proj = nn.Linear(2 * local_dim, dim)
        self.bn = nn.BatchNorm1d(dim) if bn else nn.Identity()

    def orthogonal_parts(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f_g, pooled local component orthogonal to f_g)``, both ``(N, local_dim)``."""
        local = self.local_reduce(features[self.local_stage])
        local = F.normalize(local, dim=1) * self.attention(local)
        global_vec = self.global_proj(self.global_pool(features[self.global_stage]))
        unit = F.normalize(global_vec, dim=1)[:, :, None, None]
        orthogonal = local - (local * unit).sum(dim=1, keepdim=True) * unit
        return global_vec, orthogonal.mean(dim=(2, 3))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        global_vec, local_vec = self.orthogonal_parts(features)
        return self.bn(self.proj(torch.cat([global_vec, local_vec], dim=1)))
