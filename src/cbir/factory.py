"""Config → objects. The one place where Hydra configs meet library code; everything it builds is a
plain object that tests and notebooks can also build by hand."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cbir.data.datamodule import EvalSpec, RetrievalDataModule
from cbir.data.formats import Catalog
from cbir.errors import CheckpointError
from cbir.models.embedder import Embedder, build_embedder
from cbir.training.module import MetricLearningModule

log = logging.getLogger(__name__)


def build_catalog(data_cfg: DictConfig) -> Catalog:
    catalog = instantiate(data_cfg.reader)
    log.info(catalog.summary())
    return catalog


def model_config(cfg: DictConfig) -> dict:
    """What a checkpoint needs to rebuild the Embedder: backbone, input size, the head config, and the
    training (freezing) and inference (scales) options."""
    scales = cfg.model.get("scales")
    return {
        "backbone": cfg.model.backbone,
        "image_size": int(cfg.model.image_size),
        "head": OmegaConf.to_container(cfg.head, resolve=True),
        "freeze_stages": cfg.model.get("freeze_stages", 0),
        "bn_frozen": bool(cfg.model.get("bn_frozen", False)),
        "scales": [float(s) for s in scales] if scales else None,
        "scale_power": float(cfg.model.get("scale_power", 1.0)),
    }


def embedder_from_model_config(model_cfg: dict, pretrained: str | None) -> Embedder:
    head = instantiate(model_cfg["head"]) if model_cfg.get("head") else None
    return build_embedder(model_cfg["backbone"], pretrained=pretrained, image_size=model_cfg["image_size"],
                          head=head, freeze_stages=model_cfg.get("freeze_stages", 0),
                          bn_frozen=model_cfg.get("bn_frozen", False), scales=model_cfg.get("scales"),
                          scale_power=model_cfg.get("scale_power", 1.0))


def build_embedder_from_config(cfg: DictConfig) -> Embedder:
    return embedder_from_model_config(model_config(cfg), cfg.model.pretrained)


def build_datamodule(cfg: DictConfig, catalog: Catalog, embedder: Embedder) -> RetrievalDataModule:
    data = cfg.data
    augment = instantiate(cfg.augment.transforms) if "augment" in cfg else []
    sampler = instantiate(cfg.sampler) if "sampler" in cfg else None
    return RetrievalDataModule(
        catalog,
        image_size=embedder.input_size,
        mean=embedder.mean,
        std=embedder.std,
        augment=list(augment),
        batch_size=int(data.batch_size),
        batch_sampler=sampler,
        eval_batch_size=data.get("eval_batch_size"),
        num_workers=data.get("num_workers"),
        train_split=data.get("train_split", "train"),
        val=eval_spec(data.get("val")),
        test=eval_spec(data.get("test")),
        on_bad_image=data.get("on_bad_image", "fail"),
        cache_images=data.get("cache_images", "auto"),
        cache_max_mb=float(data.get("cache_max_mb", 2048)),
    )


def eval_spec(spec_cfg) -> EvalSpec | None:
    if not spec_cfg:
        return None
    return EvalSpec(queries=spec_cfg.queries, gallery=spec_cfg.get("gallery"))


def build_module(cfg: DictConfig, embedder: Embedder) -> MetricLearningModule:
    miner_cfg = cfg.get("miner")
    miner = instantiate(miner_cfg) if miner_cfg and "_target_" in miner_cfg else None
    scheduler_cfg = cfg.get("scheduler")
    return MetricLearningModule(
        embedder,
        loss=instantiate(cfg.loss),
        miner=miner,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(scheduler_cfg) if scheduler_cfg and "_target_" in scheduler_cfg else None,
        ks=tuple(cfg.metrics.ks),
        model_config=model_config(cfg),
    )


def build_loggers(cfg: DictConfig) -> list:
    logger_cfg = cfg.get("logger") or {}
    return [instantiate(c) for c in logger_cfg.values() if c and "_target_" in c]


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list[pl.Callback]:
    callbacks = []
    for name, c in (cfg.get("callbacks") or {}).items():
        if not c or "_target_" not in c:
            continue
        if name == "lr_monitor" and not has_logger:
            continue  # LearningRateMonitor refuses to run without a logger
        callbacks.append(instantiate(c))
    return callbacks


def build_trainer(cfg: DictConfig, **overrides) -> pl.Trainer:
    loggers = overrides.pop("logger", None)
    if loggers is None:
        loggers = build_loggers(cfg)
    callbacks = overrides.pop("callbacks", None)
    if callbacks is None:
        callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **overrides)


def load_embedder_checkpoint(ckpt_path: str | Path) -> Embedder:
    """Rebuild the Embedder stored in a training checkpoint (no training config needed)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path: checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unreadable user file
        raise CheckpointError(f"ckpt_path: cannot read checkpoint {path}: {exc}") from None
    model_cfg = (checkpoint.get("hyper_parameters") or {}).get("model_config")
    if not model_cfg:
        raise CheckpointError(f"ckpt_path: {path} is not a cbir training checkpoint (no model_config)")
    embedder = embedder_from_model_config(model_cfg, pretrained="none")
    state = {k[len("embedder."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("embedder.")}
    result = embedder.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise CheckpointError(f"ckpt_path: {path} lacks {len(result.missing_keys)} embedder weights "
                              f"(first: {result.missing_keys[0]})")
    return embedder

