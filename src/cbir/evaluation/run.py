"""``eval.py``/``cbir eval``: retrieval metrics of a checkpoint, or of a pretrained backbone untrained."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from cbir import factory
from cbir.errors import ConfigError
from cbir.evaluation.report import format_table, write_json
from cbir.training.module import MetricLearningModule

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` (or, without one, ``cfg.model`` as it comes pretrained) on the data
    config's ``protocol`` set (``test`` or ``val``)."""
    if cfg.get("ckpt_path"):
        embedder = factory.load_embedder_checkpoint(cfg.ckpt_path)
        name = f"checkpoint {Path(cfg.ckpt_path).name}"
        if cfg.model.get("scales"):  # multi-scale evaluation of a checkpoint trained at one scale
            embedder.set_scales(list(cfg.model.scales), float(cfg.model.get("scale_power", 1.0)))
            name += f" (scales {', '.join(f'{s:g}' for s in embedder.scales)})"
    else:
        embedder = factory.build_embedder_from_config(cfg)
        name = f"{cfg.model.backbone} (pretrained={cfg.model.pretrained}, not trained)"

    catalog = factory.build_catalog(cfg.data)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    spec_cfg = cfg.data.get(cfg.protocol)
    if spec_cfg is None:
        raise ConfigError(f"protocol={cfg.protocol}: data config '{cfg.data.name}' defines no '{cfg.protocol}' set")
    datamodule.test_spec = factory.eval_spec(spec_cfg)
    module = MetricLearningModule(embedder, ks=tuple(cfg.metrics.ks))
    trainer = factory.build_trainer(cfg, logger=False, callbacks=[])
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = dict(module.last_eval_metrics)
    protocol = datamodule.test_spec.describe()
    print(f"\nRetrieval on {cfg.data.name}, {protocol}:\n" + format_table({name: metrics}) + "\n")
    write_json(Path(cfg.paths.output_dir) / "eval.json", {"model": name, "protocol": protocol, "metrics": metrics})
    return metrics

