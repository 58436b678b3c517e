"""Clean/degraded consistency (``train.consistency_weight``): the embedding of an augmented (possibly
degraded) training view is pulled towards the embedding of the same crop and flip without the photometric
augmentations (:class:`cbir.data.transforms.CleanAndAugmented`), normalised as the gallery's images are. The
clean embedding is the fixed target (no gradient), so the term
moves what damage does to an embedding back to where the clean image lies instead of moving the clean
images: a camera-grade query lands next to its own gallery entry, and clean search keeps its geometry."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def consistency_loss(embeddings: torch.Tensor, clean_embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between each augmented view and its clean target (detached): 0 when every
    augmented view embeds where its clean image does, at most 2."""
    if embeddings.shape != clean_embeddings.shape:
        raise ValueError(f"consistency: {tuple(embeddings.shape)} augmented embeddings against "
                         f"{tuple(clean_embeddings.shape)} clean ones")
    return (1.0 - F.cosine_similarity(embeddings.float(), clean_embeddings.detach().float(), dim=1)).mean()
