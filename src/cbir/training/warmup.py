"""Warm-up: for the first N epochs only the head (and a proxy loss's proxies) learn; the backbone is a
fixed feature extractor. A common recipe for proxy/classifier losses, whose freshly initialised proxies
and head would otherwise send large, noisy gradients into a pretrained trunk."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from torch import nn

log = logging.getLogger(__name__)


class BackboneWarmup(pl.Callback):
    """Freeze ``pl_module.embedder.backbone`` during epochs ``0 .. epochs-1``, then unfreeze it.

    Frozen means no gradients and eval mode (BatchNorm statistics fixed too). Unfreezing gives back
    exactly the parameters that were trainable before, so stages frozen by ``model.freeze_stages`` stay
    frozen. Unlike Lightning's ``BaseFinetuning``, which adds a param group when it unfreezes, the
    backbone stays in the optimiser from the start (a parameter without a gradient is skipped by the
    optimiser): the scheduler covers it and a resumed run sees the same param groups. Decided per epoch
    from ``trainer.current_epoch``, so resuming in or after the warm-up does the right thing.
    """

    def __init__(self, epochs: int) -> None:
        if epochs < 0:
            raise ValueError(f"warm-up epochs must be >= 0, got {epochs}")
        self.epochs = int(epochs)
        self._trainable: list[nn.Parameter] | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        backbone = pl_module.embedder.backbone
        if self._trainable is None:  # before we froze anything: what freeze_stages left trainable
            self._trainable = [p for p in backbone.parameters() if p.requires_grad]
        warming_up = trainer.current_epoch < self.epochs
        for p in self._trainable:
            p.requires_grad_(not warming_up)
        backbone.train(pl_module.training and not warming_up)
        if warming_up and trainer.current_epoch == 0:
            log.info("warm-up: backbone frozen for %d epoch(s)", self.epochs)
        elif trainer.current_epoch == self.epochs:
            log.info("warm-up over: backbone unfrozen at epoch %d", self.epochs)
