"""Train an embedding model: ``python train.py model=resnet34 loss=triplet``. See cbir/conf/train.yaml."""

from cbir.commands.train import main

if __name__ == "__main__":
    main()
