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
                    std: Sequence[float]) -> A.Compose:
    """The configured augmentations, then the evaluation path's resize and normalisation."""
    return A.Compose([*augment, A.Resize(size, size), A.Normalize(mean=tuple(mean), std=tuple(std)),
                      ToTensorV2()])
