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
