"""open-metric-learning's training pieces on our data, for ``benchmarks/train_speed.py --peers``.

It runs in its own environment, because open-metric-learning pins ``numpy<2`` (see ``train_speed.py``),
so it imports nothing from ``cbir``. The network matches ours (``model=mobilenet_v2 head=gem``): torchvision
MobileNetV2 features with the same ImageNet weights file → GeM (p = 3, learnable) → linear 512 → BN → L2.
The rest is OML's own: ``ImageLabeledDataset`` (reads the files each step, as OML does), ``BalanceSampler``
(n_labels × n_instances per batch), ``TripletLossWithMiner`` with ``HardTripletsMiner``; AdamW, the same
augmentation (random resized crop 0.7–1, horizontal flip, ImageNet normalisation), 2 loader workers.
Timed like ``train.py``'s ``train/images_per_second``: from the epoch's start (the loader's first batch
included) to the last step's end; model and data set-up excluded.

    python benchmarks/peers/oml_train.py --csv train.csv --weights mobilenet_v2.pth --batches 30

``--csv``: ``path,label`` rows. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import albumentations as albu
import pandas as pd
import torch
import torchvision
from albumentations.pytorch import ToTensorV2
from oml.datasets import ImageLabeledDataset
from oml.losses import TripletLossWithMiner
from oml.miners import HardTripletsMiner
from oml.samplers import BalanceSampler
from torch import nn
from torch.nn import functional as F


class GeMEmbedder(nn.Module):
    """MobileNetV2 features → GeM → linear → BN → L2, as ``cbir``'s ``model=mobilenet_v2 head=gem``."""

    def __init__(self, weights: str, dim: int = 512, p: float = 3.0):
        super().__init__()
        net = torchvision.models.mobilenet_v2()
        net.load_state_dict(torch.load(weights, map_location="cpu"))
        self.features = net.features
        self.p = nn.Parameter(torch.tensor(p))
        self.fc = nn.Linear(1280, dim)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.features(images).clamp(min=1e-6)
        pooled = maps.pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return F.normalize(self.bn(self.fc(pooled)), dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--weights", required=True, help="torchvision MobileNetV2 ImageNet state dict (.pth)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-labels", type=int, default=32)
    parser.add_argument("--n-instances", type=int, default=4)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    rows = pd.read_csv(args.csv)
    df = pd.DataFrame({"path": rows["path"], "label": pd.factorize(rows["label"])[0]})
    transform = albu.Compose([
        albu.RandomResizedCrop(size=(args.image_size, args.image_size), scale=(0.7, 1.0)),
        albu.HorizontalFlip(p=0.5),
        albu.Normalize(),
        ToTensorV2(),
    ])
    dataset = ImageLabeledDataset(df, transform=transform)
    sampler = BalanceSampler(df["label"].tolist(), n_labels=args.n_labels, n_instances=args.n_instances)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers)
    model = GeMEmbedder(args.weights).train()
    criterion = TripletLossWithMiner(margin=0.1, miner=HardTripletsMiner(), need_logs=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    images_seen, steps = 0, 0
    started = last_end = time.perf_counter()  # as train.py's epoch: the loader's start-up counts
    # OML's epoch (812 emoji classes / 32 per batch) is shorter than train.py's: go on into the next one
    batches = (batch for _ in itertools.count() for batch in loader)
    for batch in itertools.islice(batches, args.batches):
        embeddings = model(batch["input_tensors"])
        loss = criterion(embeddings, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images_seen += len(batch["labels"])
        steps += 1
        last_end = time.perf_counter()
    print(json.dumps({"peer": "open-metric-learning", "images_per_second": images_seen / (last_end - started),
                      "batches": steps, "images": images_seen, "loss": loss.item()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
