"""Training-speed switches: the ChannelsLast callback and bf16 autocast through the real training loop."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from helpers.configs import compose_config, tiny_train_overrides
from torch import nn

from cbir.training import factory
from cbir.training.speed import ChannelsLast, to_channels_last

CL = torch.channels_last


class _ConvModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)


def test_callback_converts_parameters_and_every_stage_batch():
    module = _ConvModule()
    assert not module.conv.weight.is_contiguous(memory_format=CL)
    callback = ChannelsLast()
    callback.on_fit_start(None, module)
    assert module.conv.weight.is_contiguous(memory_format=CL)
    assert module.fc.weight.is_contiguous()  # 2-D parameters are left alone

    hooks = [lambda b: callback.on_train_batch_start(None, module, b, 0),
             lambda b: callback.on_validation_batch_start(None, module, b, 0),
             lambda b: callback.on_test_batch_start(None, module, b, 0)]
    for hook in hooks:
        images = torch.randn(4, 3, 8, 8)
        batch = {"image": images, "label": torch.arange(4)}
        hook(batch)
        assert batch["image"].is_contiguous(memory_format=CL)
        assert not images.is_contiguous(memory_format=CL)  # a converted copy replaces it in the dict
        assert torch.equal(batch["image"], images)  # same values


def test_to_channels_last_passes_other_batches_through():
    batch = {"bad_images": ["x"]}
    assert to_channels_last(batch) is batch and "image" not in batch
    flat = {"image": torch.randn(4, 10)}
    assert to_channels_last(flat)["image"].dim() == 2


class _Probe(pl.Callback):
    """Records what the training step saw: batch layout, conv output dtype (autocast) and the loss."""

    def __init__(self) -> None:
        self.image_channels_last: list[bool] = []
        self.conv_dtypes: list[torch.dtype] = []
        self.weight_channels_last: list[bool] = []
        self.losses: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        conv = next(m for m in pl_module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1)
        conv.register_forward_hook(lambda mod, inp, out: self.conv_dtypes.append(out.dtype))
        self.weight_channels_last.append(conv.weight.is_contiguous(memory_format=CL))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.image_channels_last.append(batch["image"].is_contiguous(memory_format=CL))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_fast_dev_run_bf16_channels_last_gives_finite_loss(tiny_folder, tmp_path):
    """trainer.precision=bf16-mixed + the channels_last callback (as conf/callbacks/default.yaml wires it)."""
    cfg = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path) + [
        "model=mobilenet_v2", "loss=triplet", "trainer=debug", "trainer.precision=bf16-mixed",
        "callbacks=default", "data.image_size=32"])
    callbacks = factory.build_callbacks(cfg, has_logger=False)
    assert any(isinstance(c, ChannelsLast) for c in callbacks), "conf/callbacks/default.yaml lost channels_last"
    probe = _Probe()
    embedder = factory.build_embedder_from_config(cfg)
    datamodule = factory.build_datamodule(cfg, factory.build_catalog(cfg.data), embedder)
    module = factory.build_module(cfg, embedder)
    trainer = factory.build_trainer(cfg, logger=False, callbacks=[*callbacks, probe])
    trainer.fit(module, datamodule=datamodule)

    assert probe.weight_channels_last == [True]
    assert probe.image_channels_last and all(probe.image_channels_last)
    assert probe.conv_dtypes and probe.conv_dtypes[0] == torch.bfloat16  # autocast really ran
    assert probe.losses and all(math.isfinite(v) for v in probe.losses)
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay fp32


def test_callbacks_none_means_none(tmp_path, tiny_folder):
    cfg = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path) + ["callbacks=none"])
    assert factory.build_callbacks(cfg, has_logger=True) == []
    cfg = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path) + ["callbacks.channels_last=null"])
    assert not any(isinstance(c, ChannelsLast) for c in factory.build_callbacks(cfg, has_logger=True))


def test_testing_before_training_keeps_weights_trainable(tiny_folder, tmp_path):
    """evaluate_untrained=true converts the weights inside the test loop's inference mode first; training
    must still be able to backpropagate through them."""
    from cbir.commands.train import train

    cfg = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path) + [
        "model=resnet18", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "evaluate_untrained=true",
        "test_after_fit=false"])
    assert train(cfg) is not None
    import torch

    ckpt = torch.load(next((tmp_path / "checkpoints").glob("last.ckpt")), weights_only=False)
    assert ckpt["global_step"] == 2
