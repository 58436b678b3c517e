"""The one model class that is trained, exported and served."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cbir.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone
from cbir.models.pooling import GeMHead
from cbir.models.weights import build_pretrained_model


class Embedder(nn.Module):
    """image batch → backbone stages → head → L2-normalised embedding.

    Carries the preprocessing it expects (``input_size``, ``mean``, ``std``) so a bundle can rebuild it.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, input_size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    @property
    def embedding_dim(self) -> int:
        return int(self.head.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)


def build_embedder(backbone: str, pretrained: str | None = "imagenet", image_size: int = 224,
                   head: Callable[..., nn.Module] | None = None) -> Embedder:
    """Build an :class:`Embedder`; ``head`` is a factory called with ``channels={stage: width}``
    (a Hydra ``_partial_`` head config), GeM on the last stage by default."""
    trunk = Backbone(backbone, build_pretrained_model(backbone, pretrained))
    head_module = (head or GeMHead)(channels=trunk.channels)
    return Embedder(trunk, head_module, input_size=image_size)
