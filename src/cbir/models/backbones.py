"""torchvision CNN backbones exposing named intermediate stages.

Each backbone returns a dict ``{stage name: feature map}`` for the stages listed in its spec (from
shallow to deep), built with torchvision's FX feature extractor, so heads can fuse local features from
several depths. The classifier is pruned away.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from cbir.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a torchvision model and which of its nodes are the stages (shallow → deep)."""

    builder: Callable[..., nn.Module]
    imagenet_weights: str  # attribute of the model's weights enum, e.g. "IMAGENET1K_V1"
    stages: dict[str, str]  # stage name -> FX node name


_RESNET_STAGES = {f"layer{i}": f"layer{i}" for i in range(1, 5)}

BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(torchvision.models.resnet18, "IMAGENET1K_V1", _RESNET_STAGES),
    "resnet34": BackboneSpec(torchvision.models.resnet34, "IMAGENET1K_V1", _RESNET_STAGES),
    "resnet50": BackboneSpec(torchvision.models.resnet50, "IMAGENET1K_V1", _RESNET_STAGES),
    "mobilenet_v2": BackboneSpec(
        torchvision.models.mobilenet_v2, "IMAGENET1K_V1",
        {"stage2": "features.3", "stage3": "features.6", "stage4": "features.13", "stage5": "features.18"},
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"model.backbone={name!r} is unknown; choose one of {', '.join(BACKBONES)}") from None


class Backbone(nn.Module):
    """A torchvision trunk returning ``{stage: feature map}``; ``channels`` gives each stage's width."""

    def __init__(self, name: str, model: nn.Module | None = None) -> None:
        super().__init__()
        spec = backbone_spec(name)
        self.name = name
        model = model if model is not None else spec.builder(weights=None)
        self.body = create_feature_extractor(model, return_nodes={node: stage for stage, node in spec.stages.items()})
        self.channels = self._probe_channels()

    def _probe_channels(self) -> dict[str, int]:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            features = self.body(torch.zeros(1, 3, 64, 64))
        self.train(was_training)
        return {stage: int(f.shape[1]) for stage, f in features.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.body(x)
