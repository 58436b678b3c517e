"""Config → objects. The one place where Hydra configs meet library code; everything it builds is a
plain object that tests and notebooks can also build by hand."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cbir.data.catalog import Catalog
from cbir.data.datamodule import LoaderOptions, PairDataModule, RetrievalDataModule
from cbir.data.datasets import EvalSpec
from cbir.data.readers import catalog_from_config
from cbir.data.readers.pairs import PairCatalog
from cbir.errors import ConfigError
from cbir.models.embedder import Embedder
from cbir.models.from_config import HANDCRAFTED, embedder_from_model_config
from cbir.training.module import MetricLearningModule, PairModule

log = logging.getLogger(__name__)


def build_catalog(data_cfg: DictConfig) -> Catalog:
    """The data config's reader → its catalog (a :class:`PairCatalog` for ``data=pairs``)."""
    return catalog_from_config(data_cfg)


def loader_options(cfg: DictConfig) -> LoaderOptions:
    """The ``data.*`` batching and reading keys as one :class:`LoaderOptions`."""
    data = cfg.data
    defaults = LoaderOptions()
    return LoaderOptions(batch_size=int(data.batch_size), eval_batch_size=data.get("eval_batch_size"),
                         num_workers=data.get("num_workers"),
                         train_split=data.get("train_split", defaults.train_split),
                         on_bad_image=data.get("on_bad_image", defaults.on_bad_image),
                         cache_images=data.get("cache_images", defaults.cache_images),
                         cache_max_mb=float(data.get("cache_max_mb", defaults.cache_max_mb)), seed=cfg.get("seed"),
                         val_subset=eval_subset(cfg, "val"), test_subset=eval_subset(cfg, "test"))


def eval_subset(cfg: DictConfig, which: str) -> int | float | None:
    """How much of the ``which`` (val/test) retrieval set to evaluate on: ``subset.<which>`` (an image count or
    a fraction), else Lightning's ``trainer.limit_<which>_batches`` read as images (N batches of
    ``data.eval_batch_size``, or a fraction) — a random subset, since the first N batches may hold queries
    and no gallery. None: all of it."""
    subset = (cfg.get("subset") or {}).get(which)
    limit = (cfg.get("trainer") or {}).get(f"limit_{which}_batches")
    value = subset if subset is not None else limit
    if value is None or value == 0 or (isinstance(value, float) and value == 1.0):
        return None  # all of it; 0 batches: Lightning skips the loop
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        key = f"subset.{which}" if subset is not None else f"trainer.limit_{which}_batches"
        raise ConfigError(f"{key}={value!r}: an image count / batch count >= 1, or a fraction in (0, 1)")
    if isinstance(value, float) and value < 1:
        return float(value)
    if subset is not None:
        return int(value)
    batch = cfg.data.get("eval_batch_size") or 2 * int(cfg.data.batch_size)
    return int(value) * int(batch)


def model_config(cfg: DictConfig) -> dict:
    """What a checkpoint needs to rebuild the Embedder: backbone, input size, the head config, and the
    training (freezing) and inference (scales) options; for ``model=handcrafted``, the descriptor options."""
    if cfg.model.backbone == HANDCRAFTED:
        return {"backbone": HANDCRAFTED, "image_size": int(cfg.model.image_size),
                "descriptor": OmegaConf.to_container(cfg.model.get("descriptor") or {}, resolve=True)}
    scales = cfg.model.get("scales")
    return {
        "backbone": cfg.model.backbone,
        "image_size": int(cfg.model.image_size),
        "head": OmegaConf.to_container(cfg.head, resolve=True),
        "freeze_stages": freeze_stages_for(cfg),
        "bn_frozen": bool(cfg.model.get("bn_frozen", False)),
        "pooling": str(cfg.model.get("pooling", "gem")),
        "scales": [float(s) for s in scales] if scales else None,
        "scale_power": float(cfg.model.get("scale_power", 1.0)),
        **lora_config(cfg),
    }


def lora_config(cfg: DictConfig) -> dict:
    """``{"lora": {"rank", "alpha"}}`` for ``train.tune=lora`` (a checkpoint merges its adapters with these),
    else nothing."""
    train = cfg.get("train") or {}
    if str(train.get("tune", "full")).strip() != "lora":
        return {}
    return {"lora": {"rank": int(train.get("lora_rank", 8)), "alpha": float(train.get("lora_alpha", 16.0))}}


TUNE_MODES = "auto, full, head, last:N, lora"
AUTO_FROZEN_CNN_STAGES = 1  # train.tune=auto on a CNN: the stem and the first stage keep their weights


def freeze_stages_for(cfg: DictConfig) -> int | str:
    """``train.tune`` as the trunk's ``freeze_stages``: ``full`` trains every stage (or what
    ``model.freeze_stages`` says), ``head`` freezes the whole trunk (only the head learns), ``last:N``
    trains only the last N stages (the stem and earlier stages keep their pretrained weights).

    ``auto`` (the default) is ``full`` for a ViT and, for a pretrained CNN, freezes the stem and the first
    stage, as detectron2 does by default: their filters are generic edges and colours, and back-propagating
    through them at the highest resolution is the costliest part of a step (MobileNetV2 at 64 px trains
    ~1.25x faster, at unchanged accuracy; README *Training speed*). ``model.freeze_stages``, when set,
    wins; a randomly initialised trunk (``model.pretrained=none``) has nothing to keep and trains in full."""
    from cbir.models.trunks import is_vit, stage_count

    tune = str((cfg.get("train") or {}).get("tune", "full") or "full").strip()
    freeze = cfg.model.get("freeze_stages", 0)
    unset = str(freeze).strip().lower() in ("0", "none", "")
    if tune == "auto":
        pretrained = str(cfg.model.get("pretrained") or "none").strip().lower() != "none"  # as weights.py reads it
        if not unset or is_vit(cfg.model.backbone) or not pretrained:
            return freeze
        return min(AUTO_FROZEN_CNN_STAGES, stage_count(cfg.model.backbone) - 1)
    if tune == "full":
        return freeze
    if not unset:
        raise ConfigError(f"train.tune={tune} and model.freeze_stages={freeze}: choose one way to freeze the trunk")
    stages = stage_count(cfg.model.backbone)
    if tune == "head":
        return "all"
    if tune == "lora":  # the trunk stays frozen; adapters are added on top (build_embedder_from_config)
        if not is_vit(cfg.model.backbone):
            raise ConfigError(f"train.tune=lora adapts a ViT's attention and MLP layers; model={cfg.model.backbone} "
                              "is a CNN: use train.tune=last:N or head, or model=dinov2_vits14")
        return "all"
    mode, _, count = tune.partition(":")
    if mode == "last" and count.isdigit() and 1 <= int(count) <= stages:
        return stages - int(count)
    raise ConfigError(f"train.tune={tune}: choose from {TUNE_MODES} (N from 1 to {stages} for {cfg.model.backbone})")


def build_embedder_from_config(cfg: DictConfig) -> Embedder:
    """The Embedder to train: ``model_config(cfg)`` built with its pretrained weights, with LoRA adapters on
    the trunk for ``train.tune=lora``."""
    model_cfg = model_config(cfg)
    embedder = embedder_from_model_config(model_cfg, cfg.model.pretrained)
    if model_cfg.get("lora"):
        from cbir.models.lora import add_lora

        add_lora(embedder.backbone.body, **model_cfg["lora"])
    return embedder


def build_datamodule(cfg: DictConfig, catalog: Catalog | PairCatalog,
                     embedder: Embedder) -> RetrievalDataModule | PairDataModule:
    augment = list(instantiate(cfg.augment.transforms)) if "augment" in cfg else []
    options = loader_options(cfg)
    if isinstance(catalog, PairCatalog):  # data=pairs (Siamese mode): shuffled pairs, no class sampler
        return PairDataModule(catalog, embedder, options, augment, eval_split=cfg.data.get("eval_split"))
    sampler = instantiate(cfg.sampler) if "sampler" in cfg else None
    return RetrievalDataModule(catalog, embedder, options, augment, batch_sampler=sampler,
                               val=eval_spec(cfg.data.get("val")), test=eval_spec(cfg.data.get("test")),
                               clean_views=consistency_weight(cfg) > 0)


def consistency_weight(cfg: DictConfig) -> float:
    """``train.consistency_weight`` (0 when absent); data=pairs has no single clean view to agree with."""
    weight = float((cfg.get("train") or {}).get("consistency_weight", 0.0) or 0.0)
    if weight < 0:
        raise ConfigError(f"train.consistency_weight must be >= 0, got {weight}")
    if weight > 0 and cfg.data.get("mode") == "pairs":
        raise ConfigError("train.consistency_weight applies to class-labelled data; data=pairs trains on given "
                          "pairs of images — set train.consistency_weight=0")
    return weight


def eval_spec(spec_cfg) -> EvalSpec | None:
    if not spec_cfg:
        return None
    return EvalSpec(queries=spec_cfg.queries, gallery=spec_cfg.get("gallery"))


LOSS_LR_MULTIPLIER = 100.0  # proxies/class weights learn 100x faster than the network (Proxy-Anchor recipe)


def build_module(cfg: DictConfig, embedder: Embedder, catalog: Catalog | None = None) -> MetricLearningModule:
    """The LightningModule for ``cfg`` (a :class:`PairModule` for ``data=pairs``). Proxy/classifier
    losses get ``num_classes`` (the training classes, read from ``catalog``, or from ``cfg.data`` when
    not given) and ``embedding_size`` (the Embedder's) here; with ``loss.xbm=true`` the loss and its
    miner are wrapped in PML's ``CrossBatchMemory``."""
    miner = _instantiate_optional(cfg.get("miner"))
    loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
    xbm = bool(loss_cfg.pop("xbm", False))
    xbm_memory_size = int(loss_cfg.pop("xbm_memory_size", 4096))
    pair_mode = cfg.data.get("mode") == "pairs"
    if pair_mode:
        check_pair_loss(loss_cfg["_target_"].rsplit(".", 1)[-1], xbm)
    train_classes = None
    if "num_classes" in loss_cfg:
        if catalog is None:
            catalog = build_catalog(cfg.data)
        train_classes = training_classes(catalog, cfg.data.get("train_split", "train"))
        loss_cfg["num_classes"] = len(train_classes)
    if "embedding_size" in loss_cfg:
        loss_cfg["embedding_size"] = embedder.embedding_dim
    loss = instantiate(loss_cfg)
    if xbm:
        loss, miner = cross_batch_memory(loss, miner, embedder.embedding_dim, xbm_memory_size), None
    module_class = PairModule if pair_mode else MetricLearningModule
    if pair_mode:
        miner = None  # the pairs are given: nothing to mine
    optimizer, loss_lr = optimizer_factory(cfg.optimizer)
    return module_class(
        embedder,
        loss=loss,
        miner=miner,
        optimizer=optimizer,
        loss_lr=loss_lr,
        scheduler=_instantiate_optional(cfg.get("scheduler")),
        ks=tuple(cfg.metrics.ks),
        knn_k=cfg.metrics.get("knn_k"),
        model_config=model_config(cfg),
        train_classes=train_classes,
        warmup_epochs=int((cfg.get("train") or {}).get("warmup_epochs", 0)),
        distill_weight=float((cfg.get("train") or {}).get("distill_weight", 0.0) or 0.0),
        layer_decay=(cfg.get("train") or {}).get("layer_decay"),
        consistency_weight=consistency_weight(cfg),
    )


def check_pair_loss(loss_name: str, xbm: bool) -> None:
    """data=pairs needs a loss that scores each given pair on its own (see PairModule.SUPPORTED_LOSSES)."""
    if loss_name not in PairModule.SUPPORTED_LOSSES or xbm:
        raise ConfigError(f"data=pairs trains on explicit pairs; {loss_name}{' with loss.xbm=true' if xbm else ''} "
                          "cannot use them. Use loss=contrastive or loss=multi_similarity, with loss.xbm=false")


def _instantiate_optional(node):
    return instantiate(node) if node and "_target_" in node else None


def training_classes(catalog: Catalog, train_split: str = "train") -> list[int]:
    """The sorted label ids of the training split: proxy losses need one proxy per class, with the
    labels remapped to 0..C-1 (zero-shot splits hold out classes, so the ids have gaps)."""
    labels = catalog.labels(catalog.select(train_split))
    if len(labels) == 0:
        raise ConfigError(f"data.train_split={train_split!r} selects no images; a proxy/classifier loss "
                          "needs training classes")
    return sorted({int(label) for label in labels})


def cross_batch_memory(loss, miner, embedding_size: int, memory_size: int):
    """``loss.xbm=true``: PML's CrossBatchMemory around the loss (the miner then mines against the memory)."""
    from pytorch_metric_learning.losses import CrossBatchMemory

    name = type(loss).__name__
    if name not in CrossBatchMemory.supported_losses():
        raise ConfigError(f"loss.xbm=true: cross-batch memory does not support {name}; use it with a pair or "
                          f"triplet loss ({', '.join(CrossBatchMemory.supported_losses())}) or set loss.xbm=false")
    return CrossBatchMemory(loss, embedding_size=embedding_size, memory_size=memory_size, miner=miner)


def optimizer_factory(optimizer_cfg: DictConfig):
    """The optimiser partial, and the lr of loss parameters (``optimizer.loss_lr``; null = 100 x lr)."""
    options = OmegaConf.to_container(optimizer_cfg, resolve=True)
    for key in ("lr", "loss_lr", "weight_decay", "momentum"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"optimizer.{key}={value!r}: must be a number >= 0 (e.g. optimizer.{key}=3e-4)")
    loss_lr = options.pop("loss_lr", None)
    if loss_lr is None:
        loss_lr = LOSS_LR_MULTIPLIER * float(options["lr"])
    return instantiate(options), float(loss_lr)


def build_loggers(cfg: DictConfig) -> list:
    logger_cfg = cfg.get("logger") or {}
    return [instantiate(c, **(wandb_run_identity(cfg, c) if c._target_ == WANDB_TARGET else {}))
            for c in logger_cfg.values() if c and "_target_" in c]


WANDB_TARGET = "cbir.training.tracking.wandb_logger"


def wandb_run_identity(cfg: DictConfig, wandb_cfg: DictConfig) -> dict:
    """The W&B run's name, group and id (``cbir.training.tracking.run_identity``): null config values are filled
    from the Hydra job that runs this config and from the run folder of ``ckpt_path``."""
    from cbir.training import tracking

    output_dir = cfg.paths.output_dir
    return tracking.run_identity(hydra_job(output_dir), name=wandb_cfg.get("name"), group=wandb_cfg.get("group"),
                                 run_id=wandb_cfg.get("id"), resume=wandb_cfg.get("resume", "allow"),
                                 ckpt_path=cfg.get("ckpt_path"), run_dir=output_dir)


def hydra_job(output_dir: str | Path):
    """The Hydra job writing to ``output_dir`` as a plain ``cbir.training.tracking.JobInfo``; None outside Hydra
    (compose API, notebooks) or when the Hydra job left behind in this process wrote somewhere else."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cbir.training.tracking import JobInfo

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if Path(hydra_cfg.runtime.output_dir).resolve() != Path(output_dir).resolve():
        return None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return JobInfo(list(hydra_cfg.overrides.task), int(hydra_cfg.job.num), str(hydra_cfg.sweep.dir))
    return JobInfo(list(hydra_cfg.overrides.task))


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
    if cfg.trainer.get("strategy") == "ddp" and int((cfg.get("train") or {}).get("warmup_epochs", 0)) > 0:
        # the warm-up freezes the backbone after DDP has wrapped the model: DDP must expect parameters
        # without gradients (it otherwise stops at the second step)
        overrides.setdefault("strategy", "ddp_find_unused_parameters_true")
    for key in ("limit_val_batches", "limit_test_batches"):
        # retrieval sets are subsampled by the data module (eval_subset) instead; 0 still means "skip it"
        if cfg.data.get("name") != "pairs" and cfg.trainer.get(key) not in (None, 0):
            overrides.setdefault(key, None)
    if "plugins" not in overrides and not cfg.trainer.get("plugins"):
        from cbir.training.checkpoint_io import VerifiedCheckpointIO

        overrides["plugins"] = [VerifiedCheckpointIO()]  # atomic checkpoint files with a .sha256 beside each
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **overrides)
