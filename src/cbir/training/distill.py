"""Keep what the pretrained trunk knew while fine-tuning (``train.distill_weight``).

A frozen copy of the trunk as it was before training (the teacher) embeds every training batch too:
GeM-pooled last-stage features, L2-normalised. The added loss is the mean squared difference between the
batch's cosine-similarity matrix under the student (the embeddings being trained) and under the teacher,
so the fine-tuned space keeps the pretrained neighbourhood structure that transfers to other domains,
while the metric loss reshapes it for the training classes. Comparing similarity matrices rather than
features leaves the head free to use any embedding width and basis (relational distillation, as in
RKD / similarity-preserving KD; LDIFS applies the same idea to features)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def similarity_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    normalised = F.normalize(embeddings.float(), dim=1)
    return normalised @ normalised.T


class SimilarityDistillation(nn.Module):
    """``loss(images, student_embeddings)``: MSE between the student's and the frozen teacher's batch
    cosine-similarity matrices (off-diagonal entries; the diagonal is 1 for both)."""

    def __init__(self, backbone: nn.Module, p: float = 3.0) -> None:
        super().__init__()
        self.teacher = copy.deepcopy(backbone).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.p = float(p)

    def train(self, mode: bool = True) -> SimilarityDistillation:
        super().train(mode)
        self.teacher.eval()  # always: fixed BatchNorm statistics, no dropout
        return self

    @torch.no_grad()
    def teacher_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        features = list(self.teacher(images).values())[-1].float()  # the last stage's map
        pooled = features.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return F.normalize(pooled, dim=1)

    def forward(self, images: torch.Tensor, student_embeddings: torch.Tensor) -> torch.Tensor:
        target = similarity_matrix(self.teacher_embeddings(images))
        current = similarity_matrix(student_embeddings)
        off_diagonal = ~torch.eye(len(target), dtype=torch.bool, device=target.device)
        return F.mse_loss(current[off_diagonal], target[off_diagonal])
