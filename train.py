"""Train an embedding model: ``python train.py model=resnet34 loss=triplet``. See conf/train.yaml."""

from cbir.entry import run_hydra
from cbir.training.run import train

if __name__ == "__main__":
    run_hydra("train", train)
