"""``train.py``/``cbir train``: build everything from the config, fit, test the best checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from cbir import factory
from cbir.errors import CheckpointError
from cbir.evaluation.report import format_table, write_json
from cbir.training.module import MONITOR

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Train per ``cfg``; returns the best validation MAP@R (the value sweepers optimise)."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    embedder = factory.build_embedder_from_config(cfg)  # first: a missing weight fails fast
    catalog = factory.build_catalog(cfg.data)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    module = factory.build_module(cfg, embedder)
    trainer = factory.build_trainer(cfg)

    results: dict[str, dict[str, float]] = {}
    if cfg.get("evaluate_untrained"):
        trainer.test(module, datamodule=datamodule, verbose=False)
        results[f"untrained ({cfg.model.backbone}, pretrained={cfg.model.pretrained})"] = dict(module.last_eval_metrics)

    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg))

    best_score = _best_score(trainer)
    if cfg.get("test_after_fit", True) and not trainer.fast_dev_run:
        best = _best_checkpoint(trainer)
        trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        results[f"trained ({'best' if best == 'best' else 'last'} checkpoint)"] = dict(module.last_eval_metrics)
    if results:
        table = format_table(results)
        print("\nRetrieval on " + _describe_protocol(cfg) + ":\n" + table + "\n")
        write_json(output_dir / "results.json", {"protocol": _describe_protocol(cfg), "results": results,
                                                 "best_val_map_at_r": best_score})
    return best_score


def _resume_path(cfg: DictConfig) -> str | None:
    path = cfg.get("ckpt_path")
    if path in (None, ""):
        return None
    if path != "last" and not Path(path).is_file():
        raise CheckpointError(f"ckpt_path: checkpoint {path} does not exist (pass a .ckpt file or 'last')")
    return path


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "best_model_path", ""):
        return "best"
    return None  # no checkpointing: test the weights in memory


def _best_score(trainer: pl.Trainer) -> float | None:
    callback = trainer.checkpoint_callback
    score = getattr(callback, "best_model_score", None) if callback is not None else None
    if score is None:
        score = trainer.callback_metrics.get(MONITOR)
    return float(score) if score is not None else None


def _describe_protocol(cfg: DictConfig) -> str:
    spec = factory.eval_spec(cfg.data.get("test") or cfg.data.get("val"))
    return f"{cfg.data.name}, {spec.describe()}" if spec else cfg.data.name
