"""``train.py``/``cbir train``: build everything from the config, fit, test the best checkpoint."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cbir.commands.args import exit_with_error
from cbir.commands.resume import resumed_argv
from cbir.commands.runner import compose_container, has_hydra_flags, run_hydra
from cbir.errors import CbirError, CheckpointError, ConfigError
from cbir.evaluation.report import format_table, write_results
from cbir.models.checkpoint import verify_checkpoint
from cbir.training import factory, tracking
from cbir.training.module import MONITOR, MetricLearningModule, checkpoint_val_metrics

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float:
    """Train per ``cfg``; returns the best validation MAP@R (the monitored metric: the value sweepers
    optimise), NaN when validation produced no finite score (the Optuna sweeper records a failed trial).

    With ``train.fit=false`` nothing is trained: the model as it comes (pretrained backbone, or the
    hand-crafted descriptor) is evaluated on ``data.test`` and its MAP@R returned — the baseline row."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stage = str(cfg.get("stage") or "embedder")
    if stage not in ("embedder", "reranker"):
        raise ConfigError(f"stage={stage}: choose embedder (train the embedding network) or reranker (train the "
                          "pairwise re-ranker on a trained one)")
    if stage == "reranker":
        from cbir.commands.train_reranker import train_reranker

        result = train_reranker(cfg)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)  # with the Embedder's run's data
        return result
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    fit = bool((cfg.get("train") or {}).get("fit", True))
    embedder = factory.build_embedder_from_config(cfg)  # first: a missing weight fails fast
    if fit and not any(p.requires_grad for p in embedder.parameters()):
        raise ConfigError(f"model={cfg.model.backbone} has nothing to train; evaluate it with "
                          f"`python eval.py model={cfg.model.backbone}` or `python train.py "
                          f"model={cfg.model.backbone} train.fit=false`")
    catalog = factory.build_catalog(cfg.data)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    if not fit:
        return _evaluate_as_is(cfg, embedder, datamodule, output_dir)
    module = factory.build_module(cfg, embedder, catalog)  # the catalog sizes proxy losses
    log.info("%s", describe_run(cfg, embedder, output_dir))
    trainer = factory.build_trainer(cfg)
    try:
        if trainer.is_global_zero:  # the resolved config into every logger, a W&B run id into the run folder
            tracking.start_runs(trainer.loggers, OmegaConf.to_container(cfg, resolve=True), output_dir)
        best_score = _fit_and_test(cfg, trainer, module, datamodule, output_dir)
    except BaseException as exc:
        tracking.finish_runs(trainer.loggers, failed=True)  # a multirun's next job must not log into this run
        if trainer.interrupted and isinstance(exc, SystemExit | KeyboardInterrupt):  # Lightning exits on Ctrl-C
            _exit_interrupted(trainer, "SIGTERM" if isinstance(exc, SIGTERMException) else "Ctrl-C")
        raise
    tracking.finish_runs(trainer.loggers, {tracking.best_metric_name(_monitor(trainer)): best_score})
    return _objective(best_score, _monitor(trainer))


def _fit_and_test(cfg: DictConfig, trainer: pl.Trainer, module, datamodule, output_dir: Path) -> float | None:
    """Fit (resuming from ``ckpt_path``), test the best checkpoint, write results.json; the best score."""
    results: dict[str, dict[str, float]] = {}
    if cfg.get("evaluate_untrained"):
        trainer.test(module, datamodule=datamodule, verbose=False)
        results[_untrained_name(cfg)] = dict(module.last_eval_metrics)

    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg))

    best_score = _best_score(trainer)
    if cfg.get("test_after_fit", True) and not trainer.fast_dev_run:
        best = _best_checkpoint(trainer)
        reused = _validation_of_best(cfg, trainer) if best == "best" else None
        if reused is None:
            trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        results[f"trained ({'best' if best == 'best' else 'last'} checkpoint)"] = reused or dict(
            module.last_eval_metrics)
    if results and trainer.is_global_zero:  # under DDP every rank has the same results: one writes
        table = format_table(results)
        report = "Retrieval on " + _describe_protocol(cfg) + ":\n" + table
        print("\n" + report + "\n")
        _to_log_file(report)
        write_results(output_dir / "results.json", _describe_protocol(cfg), results, best_val_map_at_r=best_score)
    return best_score


def _validation_of_best(cfg: DictConfig, trainer: pl.Trainer) -> dict[str, float] | None:
    """The best checkpoint's own validation metrics when the test protocol is validation's (same queries,
    gallery and subset): testing would embed the same images with the same weights again. None otherwise."""
    val, test = cfg.data.get("val"), cfg.data.get("test")
    if not val or (test and factory.eval_spec(test) != factory.eval_spec(val)):
        return None
    if factory.eval_subset(cfg, "val") != factory.eval_subset(cfg, "test"):
        return None
    metrics = checkpoint_val_metrics(trainer.checkpoint_callback.best_model_path)
    if metrics is not None:
        log.info("data.test is validation's protocol: reporting the best checkpoint's validation metrics "
                 "instead of scoring the same images again")
    return metrics


def _evaluate_as_is(cfg: DictConfig, embedder, datamodule, output_dir: Path) -> float:
    """``train.fit=false``: the untrained evaluation alone, same table and results.json as a training run."""
    module = MetricLearningModule(embedder, ks=tuple(cfg.metrics.ks), knn_k=cfg.metrics.get("knn_k"))  # no loss/optimiser: nothing is fitted
    trainer = factory.build_trainer(cfg, logger=False, callbacks=[])
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = {_untrained_name(cfg): dict(module.last_eval_metrics)}
    print("\nRetrieval on " + _describe_protocol(cfg) + ":\n" + format_table(results) + "\n")
    score = float(module.last_eval_metrics["map_at_r"])
    write_results(output_dir / "results.json", _describe_protocol(cfg), results, test_map_at_r=score)
    return score


def describe_run(cfg: DictConfig, embedder, output_dir: Path) -> str:
    """One line at the start of a run: what was chosen (the full resolved config is in config.yaml)."""
    def pick(group: str) -> str:
        node = cfg.get(group) or {}
        target = str(node.get("_target_", "")).rpartition(".")[2]
        return target or str(node.get("name", "-"))

    total = sum(p.numel() for p in embedder.parameters())
    trained = sum(p.numel() for p in embedder.parameters() if p.requires_grad)
    tune = str((cfg.get("train") or {}).get("tune", "full"))
    if tune == "auto":  # say what auto chose, read from the trunk as built
        frozen = len(getattr(embedder.backbone, "frozen_stages", ()))
        tune += (" (full)" if not frozen else " (stem + first stage frozen)" if frozen == 1
                 else f" (stem + first {frozen} stages frozen)")
    return (f"run: data={cfg.data.name} ({cfg.data.image_size} px, batch {cfg.data.batch_size}) "
            f"model={cfg.model.backbone} (pretrained={cfg.model.pretrained}) head={pick('head')} loss={pick('loss')} "
            f"miner={pick('miner')} optimizer={pick('optimizer')} lr={cfg.optimizer.get('lr')} "
            f"epochs={cfg.trainer.max_epochs} tune={tune}; "
            f"{embedder.embedding_dim}-d embeddings, {total / 1e6:.1f} M parameters, {trained / 1e6:.2f} M trained; "
            f"config: {output_dir / 'config.yaml'}")


def _to_log_file(text: str) -> None:
    """``text`` into the run's log file (train.log) only: the console got it by print already."""
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        # a handler another run closed (or one opened lazily that never wrote) has no stream: not this run's log
        if isinstance(handler, logging.FileHandler) and stream is not None and not stream.closed:
            stream.write(text + "\n")
            handler.flush()


def _exit_interrupted(trainer: pl.Trainer, what: str) -> None:
    """Stopped by SIGTERM or Ctrl-C: say where the state was saved and how to resume; exit non-zero (Lightning's
    SIGTERM exit would otherwise be status 0, which reads as a finished run)."""
    saved = next((c.interrupted_checkpoint for c in trainer.callbacks if getattr(c, "interrupted_checkpoint", None)),
                 None)
    where = (f"training state saved to {saved}; resume with: python train.py ckpt_path={saved}" if saved else
             "no checkpoint saved (callbacks.last_checkpoint is off)")
    print(f"train.py: stopped by {what} at epoch {trainer.current_epoch}, step {trainer.global_step}; {where}",
          file=sys.stderr)
    raise SystemExit(143 if what == "SIGTERM" else 130) from None


def _untrained_name(cfg: DictConfig) -> str:
    return f"untrained ({cfg.model.backbone}, pretrained={cfg.model.pretrained})"


def _resume_path(cfg: DictConfig) -> str | None:
    path = cfg.get("ckpt_path")
    if path in (None, ""):
        return None
    if path == "last":
        last = Path(cfg.paths.ckpt_dir) / "last.ckpt"
        if not last.is_file():
            raise CheckpointError(f"ckpt_path=last: this run folder has no {last} to resume; point hydra.run.dir at "
                                  "the run to continue, or pass ckpt_path=<its checkpoints/last.ckpt>")
        path = str(last)
    if not Path(path).is_file():
        raise CheckpointError(f"ckpt_path: checkpoint {path} does not exist (pass a .ckpt file or 'last')")
    verify_checkpoint(path)
    _check_readable_checkpoint(Path(path), (cfg.get("trainer") or {}).get("max_epochs"))
    return path


def _check_readable_checkpoint(path: Path, max_epochs: int | None = None) -> None:
    """Read the checkpoint once before training starts: a damaged or foreign file, or one already past
    ``trainer.max_epochs``, is one line, not a traceback from inside Lightning after the data and model were set up."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip failure is a damaged file
        raise CheckpointError(f"ckpt_path: cannot read checkpoint {path} ({' '.join(str(exc).split())[:200]}); "
                              "is the file complete? resume from another checkpoint, e.g. last.ckpt") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "epoch" not in checkpoint:
        raise CheckpointError(f"ckpt_path: {path} is not a training checkpoint (no weights or epoch to resume)")
    epoch = int(checkpoint["epoch"])
    if max_epochs not in (None, -1) and epoch > int(max_epochs):  # Lightning's own check, as a traceback
        raise CheckpointError(f"ckpt_path: {path} was saved at epoch {epoch + 1}, past trainer.max_epochs="
                              f"{max_epochs}: a resumed run continues up to trainer.max_epochs; set it above "
                              f"{epoch + 1} to train further")


def _monitor(trainer: pl.Trainer) -> str:
    callback = trainer.checkpoint_callback
    return getattr(callback, "monitor", None) or MONITOR


def _objective(best_score: float | None, monitor: str) -> float:
    """The score as a plain float for sweepers; NaN, with a warning, when there is none to report."""
    if best_score is None or not math.isfinite(best_score):
        log.warning("no finite %s to report (got %s): returning NaN, which an Optuna sweep records as a "
                    "failed trial", monitor, best_score)
        return float("nan")
    return float(best_score)


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


def main(argv=None):
    """``cbir train`` / ``python train.py``: Hydra overrides over conf/train.yaml; resuming a run's checkpoint
    continues that run's config (:mod:`cbir.commands.resume`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not has_hydra_flags(argv):
        try:
            argv = resumed_argv(argv, lambda overrides: compose_container("train", overrides))
        except CbirError as exc:
            exit_with_error(exc)
    return run_hydra("train", train, argv)
