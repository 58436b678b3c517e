"""Training-speed switches as Lightning callbacks, so a config (``conf/callbacks/``) turns them on and the
LightningModule stays unaware of them.

- :class:`ChannelsLast`: NHWC weights and image batches, the layout oneDNN (CPU) and cuDNN tensor cores
  prefer for convolutions. Measured by ``benchmarks/train_speed.py``.

bf16 autocast needs no callback: it is Lightning's own ``trainer.precision=bf16-mixed`` (CPU and CUDA).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


def to_channels_last(batch: Any, key: str = "image") -> Any:
    """Convert ``batch[key]`` (a 4-D image tensor) to channels-last in place; other batches pass through."""
    if isinstance(batch, dict):
        images = batch.get(key)
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            batch[key] = images.contiguous(memory_format=torch.channels_last)
    return batch


class ChannelsLast(pl.Callback):
    """Keep the module's 4-D parameters and every batch's ``image`` tensor in channels-last memory format.

    The module is converted when fitting, validating, testing or predicting starts (after Lightning has
    moved it to its device; ``Module.to`` and checkpoint loading preserve the format), and each batch
    after it reached the device, just before the step sees it."""

    def __init__(self, key: str = "image") -> None:
        self.key = key

    @staticmethod
    def _convert(pl_module: pl.LightningModule) -> None:
        # test/predict hooks run under inference_mode: weights converted there would become inference
        # tensors and a later fit (evaluate_untrained=true, then training) could not backpropagate
        with torch.inference_mode(False), torch.no_grad():
            pl_module.to(memory_format=torch.channels_last)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before the strategy wraps the module: DDP lays out its gradient buckets with the strides the
        # parameters have then, and parameters converted later cost a copy per step (and a warning)
        self._convert(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        to_channels_last(batch, self.key)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        to_channels_last(batch, self.key)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        to_channels_last(batch, self.key)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        to_channels_last(batch, self.key)
