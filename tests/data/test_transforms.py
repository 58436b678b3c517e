"""Augmentations follow the run's seed: albumentations keeps its own random state, which
``seed_everything`` does not touch, so the training transform is seeded from ``seed`` and every
DataLoader worker reseeds its copy (otherwise workers replay one another's augmentations)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers.configs import compose_config, tiny_train_overrides
from helpers.data import write_class_images

from cbir.training import factory


def first_batches(folder, tmp_path, seed: int, workers: int, batches: int = 2) -> list[torch.Tensor]:
    cfg = compose_config("train", tiny_train_overrides(folder, tmp_path) + [
        f"seed={seed}", f"data.num_workers={workers}", "model=resnet18", "augment=default"])
    pl.seed_everything(seed, workers=True)
    embedder = factory.build_embedder_from_config(cfg)
    catalog = factory.build_catalog(cfg.data)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    out = []
    for i, batch in enumerate(loader):
        if i == batches:
            break
        out.append(batch["image"])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_gives_the_same_augmented_batches(tiny_folder, tmp_path, workers):
    a = first_batches(tiny_folder, tmp_path / "a", seed=7, workers=workers)
    b = first_batches(tiny_folder, tmp_path / "b", seed=7, workers=workers)
    c = first_batches(tiny_folder, tmp_path / "c", seed=8, workers=workers)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, z) for x, z in zip(a, c, strict=True))


def test_workers_do_not_replay_each_others_augmentations(tmp_path):
    """Two workers augmenting the same image (each takes every other batch) must not draw the same crops."""
    from PIL import Image

    root = tmp_path / "data"
    write_class_images(root, num_classes=6, per_class=4, size=24, seed=1)
    noisy = Image.effect_noise((24, 24), 60).convert("RGB")
    for image_path in root.rglob("*.png"):  # every image the same picture: only the augmentation differs
        noisy.save(image_path)
    batches = first_batches(root, tmp_path / "run", seed=3, workers=2, batches=2)
    # batch 0 comes from worker 0, batch 1 from worker 1; the images are all the same picture
    assert not torch.equal(batches[0], batches[1])
