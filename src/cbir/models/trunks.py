"""Which trunk a ``model.backbone`` name means: a torchvision CNN (:mod:`cbir.models.backbones`) or a ViT
(:mod:`cbir.models.vit`). The rest of the code asks here instead of knowing both families."""

from __future__ import annotations

from torch import nn

from cbir.errors import ConfigError
from cbir.models.backbones import BACKBONES, Backbone
from cbir.models.vit import VIT_SPECS, ViTBackbone


def trunk_names() -> list[str]:
    return [*BACKBONES, *VIT_SPECS]


def is_vit(name: str) -> bool:
    return name in VIT_SPECS


def stage_count(name: str) -> int:
    """How many stages ``freeze_stages`` and ``train.tune=last:N`` count for this trunk."""
    if is_vit(name):
        return VIT_SPECS[name].stages
    if name in BACKBONES:
        return len(BACKBONES[name].stages)
    raise ConfigError(f"model.backbone={name!r} is unknown; choose one of {', '.join(trunk_names())}")


def build_trunk(name: str, model: nn.Module, freeze_stages: int | str = 0, bn_frozen: bool = False,
                pooling: str = "gem") -> Backbone | ViTBackbone:
    """The stage-returning trunk around ``model`` (a torchvision model or a :class:`VisionTransformer`)."""
    if is_vit(name):
        return ViTBackbone(name, model, freeze_stages=freeze_stages, bn_frozen=bn_frozen, pooling=pooling)
    if str(pooling or "gem") != "gem":
        raise ConfigError(f"model.pooling={pooling}: only ViT trunks have a CLS token; a CNN pools with its head")
    return Backbone(name, model, freeze_stages=freeze_stages, bn_frozen=bn_frozen)
