"""Global pooling of a feature map, and the GeM embedding head built on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cbir.errors import ConfigError


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al., 2018) with a learnable exponent ``p``.

    ``p=1`` is average pooling, ``p→∞`` max pooling; ``p=3`` is the usual initialisation. Signed inputs
    (ViT tokens, ConvNeXt stages, SiLU outputs) get the signed power mean ``sign(m)·|m|^(1/p)`` of
    ``sign(x)·|x|^p``, so negative activations count instead of being clamped away; on the non-negative
    maps of ReLU trunks it is the usual GeM. A ``1 x 1`` map (a ViT's CLS token) passes through unchanged.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 even under bf16 autocast: x**p and its mean lose too much precision in bf16
        p = self.p.float().clamp(min=1.0)
        x = x.float()
        mean = F.adaptive_avg_pool2d(x.sign() * x.abs().clamp(min=self.eps).pow(p), 1).flatten(1)
        return mean.sign() * mean.abs().clamp(min=self.eps).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


def resolve_stage(channels: dict[str, int], stage: str | int | None, default: int = -1,
                  key: str = "head.stage") -> str:
    """A backbone stage named by ``stage``: its name, an index into the stages (``-1`` = last, ``-2`` =
    penultimate, so one head config fits every backbone), or ``None`` for ``default``."""
    names = list(channels)
    if stage is None:
        stage = default
    if isinstance(stage, str) and stage.lstrip("-").isdigit():
        stage = int(stage)
    if isinstance(stage, int):
        if -len(names) <= stage < len(names):
            return names[stage]
    elif stage in channels:
        return stage
    raise ConfigError(f"{key}={stage!r} is not a backbone stage; use a name ({', '.join(names)}) "
                      f"or an index from {-len(names)} to {len(names) - 1}")


class GeMHead(nn.Module):
    """Embedding head: GeM on one backbone stage (the last by default) → linear projection → optional BN.

    The ``Embedder`` L2-normalises the output.
    """

    def __init__(self, channels: dict[str, int], dim: int = 512, bn: bool = True, stage: str | int | None = None,
                 p: float = 3.0) -> None:
        super().__init__()
        self.stage = resolve_stage(channels, stage)
        self.dim = dim
        self.pool = GeM(p)
        self.proj = nn.Linear(channels[self.stage], dim)
        self.bn = nn.BatchNorm1d(dim) if bn else nn.Identity()

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bn(self.proj(self.pool(features[self.stage])))
