"""The training loss under DDP: mined and scored over the global batch, not each rank's share.

Under DDP every process embeds its own M-per-class batch. Left alone, a pair/triplet loss would only
see pairs inside that share, and a cross-batch memory (``loss.xbm=true``) would fill with one rank's
embeddings, so each rank's memory would differ. pytorch-metric-learning's ``DistributedLossWrapper`` and
``DistributedMinerWrapper`` all-gather every rank's embeddings and labels (the local part keeps its
gradient), mine and score the whole global batch, and scale the loss by the world size so that DDP's
gradient averaging yields the gradient of the global-batch loss: the same gradient as one process with
a batch ``world_size`` times larger. Around ``CrossBatchMemory`` every rank enqueues the global batch, so
all ranks' memories hold the same embeddings.

Losses with their own parameters (proxies, class weights: ProxyAnchor, ArcFace, NormalizedSoftmax...)
are left per rank: the wrapper's world-size scaling would also multiply their proxies' gradient, which
every rank computes from the whole gathered batch. They live in the LightningModule, so DDP all-reduces
their gradients like the network's and the proxies stay identical on every rank; for the per-sample
losses (ArcFace, NormalizedSoftmax, ProxyNCA, SoftTriple) the averaged gradient equals the global
batch's exactly, ProxyAnchor's per-proxy pooling runs over each rank's share.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

# Evaluation metrics are computed from outputs gathered from every rank, so every rank logs the same
# value: Lightning's advice to average them with sync_dist=True does not apply.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")




def gathers_global_batch(loss: nn.Module | None) -> bool:
    """Whether :class:`TrainingLoss` scores ``loss`` over the global batch under DDP (see the module doc)."""
    from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory

    if isinstance(loss, CrossBatchMemory):
        return True
    return isinstance(loss, BaseMetricLossFunction) and not any(p.requires_grad for p in loss.parameters())


class TrainingLoss:
    """``loss(embeddings, labels, miner(embeddings, labels))`` of one training step; under DDP over the
    global batch where :func:`gathers_global_batch` says so. Not an ``nn.Module`` on purpose: the loss
    and miner stay registered where they are, so checkpoints look the same with and without DDP."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None, world: int = 1) -> None:
        self.world = world
        self.local_loss, self.local_miner = loss, miner
        self.loss, self.miner, self.scale = loss, miner, 1
        if world > 1 and gathers_global_batch(loss):
            from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

            self.loss = DistributedLossWrapper(loss)
            self.miner = DistributedMinerWrapper(miner) if miner is not None else None
            self.scale = world  # DistributedLossWrapper returns world x the global-batch loss

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, its value to log: the global-batch loss when gathered)."""
        loss_fn, miner, scale = self.loss, self.miner, self.scale
        if scale > 1 and not same_size_on_every_rank(len(labels), embeddings.device):
            # a rank dropped unreadable images (data.on_bad_image=skip): the gather needs equal batches,
            # so this step's loss is each rank's own
            log.warning("ranks have batches of different sizes (skipped images): this step's loss is per rank")
            loss_fn, miner, scale = self.local_loss, self.local_miner, 1
        pairs_or_triplets = miner(embeddings, labels) if miner is not None else None
        loss = loss_fn(embeddings, labels, pairs_or_triplets)
        return loss, loss.detach() / scale


def same_size_on_every_rank(size: int, device: torch.device) -> bool:
    """Whether every rank's batch has ``size`` items (one small all-reduce)."""
    extremes = torch.tensor([size, -size], device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return int(extremes[0]) == -int(extremes[1])
