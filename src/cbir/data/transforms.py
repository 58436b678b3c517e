"""Albumentations pipelines: training augmentation from config, and the deterministic evaluation path.

Both end in the same resize → normalise → tensor steps, with the backbone's own input size and mean/std,
so an exported bundle can rebuild the evaluation path exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
from albumentations.pytorch import ToTensorV2


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Resize to ``size`` x ``size``, normalise, to CHW float tensor."""
    return A.Compose([A.Resize(size, size), A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()])


def train_transform(augment: Sequence[A.BasicTransform], size: int, mean: Sequence[float],
                    std: Sequence[float], seed: int | None = None) -> A.Compose:
    """The configured augmentations, then the evaluation path's resize and normalisation.

    Albumentations keeps its own random state, untouched by ``seed_everything``: ``seed`` fixes it, so
    two runs with the same seed see the same augmentations (DataLoader workers reseed it per worker,
    :func:`seed_transform_in_worker`)."""
    return A.Compose([*augment, A.Resize(size, size), A.Normalize(mean=tuple(mean), std=tuple(std)),
                      ToTensorV2()], seed=seed)


class CleanAndAugmented:
    """Training views for the clean/degraded consistency term (``train.consistency_weight``): ``image`` → both
    the augmented view and the *same crop and flip* without the photometric augmentations (noise, blur, JPEG,
    colour...) — so the pair differs only by the damage the term teaches the embedding to ignore. The leading
    geometric transforms (albumentations ``DualTransform``s: crops, flips, affine) run once and feed both
    views; the rest only the augmented one. Called like an albumentations pipeline:
    ``views(image=x)`` → ``{"image": augmented, "clean_image": clean}`` (normalised CHW tensors)."""

    def __init__(self, augment: Sequence[A.BasicTransform], size: int, mean: Sequence[float],
                 std: Sequence[float], seed: int | None = None) -> None:
        augment = list(augment)
        split = next((i for i, t in enumerate(augment) if not isinstance(t, A.DualTransform)), len(augment))
        self.geometry = A.Compose(augment[:split], seed=seed)
        self.augmented = train_transform(augment[split:], size, mean, std, seed=None if seed is None else seed + 1)
        self.clean = eval_transform(size, mean, std)

    def __call__(self, *, image):
        cropped = self.geometry(image=image)["image"]
        return {"image": self.augmented(image=cropped)["image"], "clean_image": self.clean(image=cropped)["image"]}

    def set_random_seed(self, seed: int) -> None:
        self.geometry.set_random_seed(seed)
        self.augmented.set_random_seed((seed + 1) % 2**32)


def seed_transform_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the worker's copy of the dataset's albumentations pipeline
    (and NumPy) from the worker's torch seed, which the DataLoader derives from the global seed and the
    worker id — without it every worker would replay the same augmentation stream as its siblings."""
    import numpy as np
    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
