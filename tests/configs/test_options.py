"""Every option of every config group composes, and what it describes instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.configs import compose_config, tiny_train_overrides
from helpers.data_locations import data_location
from hydra.utils import instantiate

from cbir.configs import config_dir
from cbir.training import factory

CONF = config_dir()
NOT_CONFIG_GROUPS = ("sweep",)  # W&B sweep definitions, validated by tests/configs/test_sweeps.py
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_CONFIG_GROUPS)
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]


def test_groups_named_by_the_design_exist():
    for group in ("model", "head", "loss", "miner", "sampler", "data", "augment", "optimizer", "scheduler",
                  "trainer", "logger", "callbacks", "experiment"):
        assert group in GROUPS
    for model in ("resnet18", "resnet34", "resnet50", "mobilenet_v2"):
        assert (CONF / "model" / f"{model}.yaml").is_file()
    for logger in ("csv", "wandb", "tensorboard"):
        assert (CONF / "logger" / f"{logger}.yaml").is_file()


EXPORT_GROUPS = ("index", "preprocess")  # groups of conf/export.yaml, not of train.yaml


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, tiny_folder, tmp_path):
    if group in EXPORT_GROUPS:
        _check_export_option(group, option, tmp_path)
        return
    overrides = tiny_train_overrides(tiny_folder, tmp_path)
    overrides = [o for o in overrides if not o.startswith(f"{group}=") and not o.startswith(f"{group}.")
                 or group == "data" and o.startswith("data.")]
    if group == "data":  # each data option with its own validation split
        overrides = [o for o in overrides if not o.startswith(("data.root=", "data=", "data.val"))]
        # the fixtures have 3 training classes, one held out for validation: 2 classes of m=2 a batch
        overrides += [f"data={option}", "data.batch_size=4"] + data_location(option, tiny_folder, tmp_path)
    elif group == "experiment":
        overrides += [f"experiment={option}"]
    else:
        overrides += [f"{group}={option}"]
    cfg = compose_config("train", overrides)
    _instantiate_all(cfg, tmp_path)


def _check_export_option(group: str, option: str, tmp_path: Path) -> None:
    """Index options are IndexOptions fields (+ extraction settings); preprocess options build."""
    import dataclasses

    from omegaconf import OmegaConf

    from cbir.index.builder import IndexOptions
    from cbir.index.shards import ExtractionOptions
    from cbir.preprocess import build_preprocessor

    cfg = compose_config("export", [f"{group}={option}", f"out={tmp_path / 'bundle'}"])
    node = OmegaConf.to_container(cfg[group], resolve=True)
    if group == "preprocess":
        assert build_preprocessor(node).describe() is not None
        return
    fields = {f.name for f in dataclasses.fields(IndexOptions)}
    extraction = ExtractionOptions.field_names()
    unknown = set(node) - fields - extraction - {"collection", "out"}
    assert not unknown, f"index={option}: keys neither index options nor extraction settings: {unknown}"
    assert IndexOptions(**{k: v for k, v in node.items() if k in fields}).kind == node["kind"]


def _instantiate_all(cfg, tmp_path: Path) -> None:
    if cfg.data.get("mode") == "pairs":
        return _instantiate_pair_mode(cfg)
    catalog = factory.build_catalog(cfg.data)
    assert catalog.records
    embedder = factory.build_embedder_from_config(cfg) if cfg.model.pretrained == "none" else None
    if embedder is None:  # pretrained=imagenet for a model whose weights may not be cached: build untrained
        cfg.model.pretrained = "none"
        embedder = factory.build_embedder_from_config(cfg)
    out = embedder.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, embedder.embedding_dim if cfg.model.backbone == "handcrafted" else cfg.head.dim)

    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[1:] == (3, embedder.input_size, embedder.input_size)
    if cfg.model.backbone == "handcrafted":
        return  # nothing to train: train.py refuses it (tests/models/test_handcrafted.py), eval.py runs it

    module = factory.build_module(cfg, embedder)
    assert module.loss_fn is not None
    optim = module.configure_optimizers()
    assert optim is not None
    loss = module.loss_fn(embedder.train()(batch["image"]), batch["label"],
                          module.miner(embedder(batch["image"]), batch["label"]) if module.miner else None)
    assert torch.isfinite(loss)

    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        cfg.trainer.accelerator, cfg.trainer.precision = "cpu", "bf16-mixed"  # the rest still checked
    loggers = factory.build_loggers(cfg)
    callbacks = factory.build_callbacks(cfg, has_logger=bool(loggers))
    trainer = factory.build_trainer(cfg, logger=loggers or False, callbacks=callbacks)
    assert trainer is not None
    for logger in loggers:
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()


def _instantiate_pair_mode(cfg) -> None:
    """data=pairs: pair batches, the Siamese module (it needs a pair loss), a trainer."""
    cfg.loss = compose_config("train", ["loss=contrastive", "paths.output_dir=/tmp/x"]).loss
    catalog = factory.build_catalog(cfg.data)
    assert catalog.pairs
    embedder = factory.build_embedder_from_config(cfg)
    batch = next(iter(factory.build_datamodule(cfg, catalog, embedder).train_dataloader()))
    assert batch["image_a"].shape == batch["image_b"].shape == (4, 3, embedder.input_size, embedder.input_size)
    module = factory.build_module(cfg, embedder)
    assert torch.isfinite(module.training_step(batch, 0))
    trainer = factory.build_trainer(cfg, logger=False)
    assert trainer.checkpoint_callback.monitor == "val/pair_roc_auc"


def test_eval_config_composes():
    cfg = compose_config("eval", ["ckpt_path=/x.ckpt", "paths.output_dir=/tmp/x"])
    assert cfg.protocol == "test" and cfg.data.test.gallery == "train+val"  # the whole 60k gallery
    assert cfg.data.val.queries == "val" and cfg.data.val.gallery == "train"  # validation: part of train


def test_loss_brings_its_miner_and_miner_can_be_overridden(tmp_path):
    cfg = compose_config("train", ["loss=contrastive", f"paths.output_dir={tmp_path}"])
    assert "PairMarginMiner" in cfg.miner._target_
    cfg = compose_config("train", ["loss=contrastive", "miner=batch_hard", f"paths.output_dir={tmp_path}"])
    assert "BatchHardMiner" in cfg.miner._target_
    cfg = compose_config("train", ["miner=none", f"paths.output_dir={tmp_path}"])
    assert factory.build_module(cfg, _tiny_embedder()).miner is None


def _tiny_embedder():
    from cbir.models.embedder import build_embedder

    return build_embedder("resnet18", pretrained="none", image_size=32)


def test_instantiated_objects_are_the_configured_types(tmp_path):
    cfg = compose_config("train", ["optimizer=sgd", "scheduler=step", f"paths.output_dir={tmp_path}"])
    make_optimizer, loss_lr = factory.optimizer_factory(cfg.optimizer)
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    assert loss_lr == pytest.approx(100 * cfg.optimizer.lr)  # optimizer.loss_lr=null: 100 x lr
    assert isinstance(instantiate(cfg.scheduler)(optimizer), torch.optim.lr_scheduler.StepLR)
