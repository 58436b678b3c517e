"""The one model class that is trained, exported and served."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cbir.errors import ConfigError
from cbir.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone
from cbir.models.pooling import GeMHead
from cbir.models.trunks import build_trunk
from cbir.models.vit import ViTBackbone
from cbir.models.weights import build_pretrained_model


class Embedder(nn.Module):
    """image batch → backbone stages → head → L2-normalised embedding.

    Carries the preprocessing it expects (``input_size``, ``mean``, ``std``) so a bundle can rebuild it.

    Multi-scale inference: with ``scales`` such as ``(1, 0.7071, 0.5)``, eval mode embeds the batch at
    each scale (bilinear, antialiased resize of the input) and combines the normalised embeddings with a
    generalised mean of exponent ``scale_power`` (1 = plain mean; applied to signed values as
    sign(x)·|x|^p, since embeddings can be negative), then re-normalises. Training always uses one scale.
    """

    def __init__(self, backbone: Backbone | ViTBackbone, head: nn.Module, input_size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 scales: Sequence[float] | None = None, scale_power: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.set_scales(scales, scale_power)

    @property
    def embedding_dim(self) -> int:
        return int(self.head.dim)

    def set_scales(self, scales: Sequence[float] | None, power: float = 1.0) -> None:
        """Inference scales (``None`` or ``[1]`` = single scale) and the power-mean exponent combining them."""
        scales = tuple(float(s) for s in (scales or (1.0,)))
        if any(s <= 0 for s in scales) or power <= 0:
            raise ConfigError(f"model.scales={list(scales)} / model.scale_power={power}: scales and power must be > 0")
        self.scales, self.scale_power = scales, float(power)

    def embed_single_scale(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training or self.scales == (1.0,):
            return self.embed_single_scale(images)
        embeddings = torch.stack([self.embed_single_scale(_rescale(images, s)) for s in self.scales]).float()
        p = self.scale_power
        if p == 1.0:
            combined = embeddings.mean(dim=0)
        else:
            powered = embeddings.sign() * embeddings.abs().pow(p)
            mean = powered.mean(dim=0)
            combined = mean.sign() * mean.abs().pow(1.0 / p)
        return F.normalize(combined, dim=1)


def _rescale(images: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return images
    size = [max(1, round(side * scale)) for side in images.shape[-2:]]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0)


def build_embedder(backbone: str, pretrained: str | None = "imagenet", image_size: int = 224,
                   head: Callable[..., nn.Module] | None = None, freeze_stages: int | str = 0,
                   bn_frozen: bool = False, pooling: str = "gem", scales: Sequence[float] | None = None,
                   scale_power: float = 1.0) -> Embedder:
    """Build an :class:`Embedder`; ``head`` is a factory called with ``channels={stage: width}``
    (a Hydra ``_partial_`` head config), GeM on the last stage by default. ``pooling`` (ViT trunks):
    what the last stage is, see :mod:`cbir.models.vit`."""
    trunk = build_trunk(backbone, build_pretrained_model(backbone, pretrained), freeze_stages=freeze_stages,
                        bn_frozen=bn_frozen, pooling=pooling)
    head_module = (head or GeMHead)(channels=trunk.channels)
    return Embedder(trunk, head_module, input_size=image_size, scales=scales, scale_power=scale_power)
