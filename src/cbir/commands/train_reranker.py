"""``python train.py stage=reranker reranker.embedder=<run>``: train the pairwise re-ranker on a trained Embedder.

Reads the Embedder's run for its data (``data=...`` on the command line trains on other data), caches the training
images' embeddings and feature maps once, trains (:mod:`cbir.training.reranker`), keeps the epoch with the best
validation MAP@R after re-ranking, and writes ``reranker.pt`` and ``results.json`` into the run folder. Use it with
``eval.py ... rerank.methods=[pairwise] rerank.model=<that folder>``, ``export.py ... reranker=<that folder>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from cbir.commands.eval import use_the_runs_data
from cbir.errors import ConfigError
from cbir.evaluation.report import format_table, write_results
from cbir.models.checkpoint import load_embedder_checkpoint, resolve_checkpoint, run_config
from cbir.models.pairwise import PairwiseReranker, default_stages, save_reranker
from cbir.training import factory
from cbir.training.reranker import (
    CachedFeatures,
    RerankerOptions,
    check_local_weights,
    extract_features,
    fit_reranker,
)

log = logging.getLogger(__name__)


def train_reranker(cfg: DictConfig) -> float:
    """Train and save the re-ranker; returns its best validation MAP@R (NaN without a validation set)."""
    settings = cfg.get("reranker") or {}
    if not settings.get("embedder"):
        raise ConfigError("stage=reranker needs the trained model to re-rank for: reranker.embedder=<training run "
                          "folder or checkpoint>")
    checkpoint = resolve_checkpoint(settings.embedder)
    embedder = load_embedder_checkpoint(checkpoint)
    for parameter in embedder.parameters():
        parameter.requires_grad_(False)
    use_the_runs_data(cfg, run_config(checkpoint) or {})
    torch.manual_seed(int(cfg.seed))

    channels = embedder.backbone.channels
    stages = list(settings.get("stages") or default_stages(channels))
    unknown = [s for s in stages if s not in channels]
    if unknown:
        raise ConfigError(f"reranker.stages: {unknown[0]!r} is not a stage of {checkpoint.name}'s trunk "
                          f"(it has {', '.join(channels)})")
    # the defaults live in conf/train.yaml's reranker: section, not here
    reranker = PairwiseReranker({s: channels[s] for s in stages}, dim=int(settings.dim), grid=int(settings.grid),
                                hidden=int(settings.hidden))
    options = RerankerOptions(candidates=int(settings.candidates), epochs=int(settings.epochs), lr=float(settings.lr),
                              views=int(settings.views), batch_queries=int(settings.batch_queries), seed=int(cfg.seed),
                              local_weights=check_local_weights(settings.get("local_weights") or [0.0]))
    if options.views < 1 or options.candidates < 2 or options.epochs < 1:
        raise ConfigError("reranker: need views >= 1, candidates >= 2 and epochs >= 1")

    catalog = factory.build_catalog(cfg.data)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    datamodule.setup("fit")
    split = str(cfg.data.get("train_split", "train"))
    log.info("re-ranker for %s: stages %s, %d candidates, %d views of data=%s split '%s'", checkpoint, stages,
             options.candidates, options.views, cfg.data.name, split)
    gallery = extract_features(embedder, reranker, datamodule.split_dataloader(split), "embedding the training set")
    views = [extract_features(embedder, reranker, datamodule.split_dataloader(split, augmented=True),
                              f"augmented view {i + 1}/{options.views}") for i in range(options.views)]
    queries = _concatenate(views)
    val = None
    if datamodule.val_spec is not None:
        val = extract_features(embedder, reranker, datamodule.val_dataloader(), "embedding the validation set")
    else:
        log.warning("data=%s has no validation set: the re-ranker's last epoch is kept, unchecked", cfg.data.name)

    reranker, report = fit_reranker(reranker, queries, gallery, val, options)
    output_dir = Path(cfg.paths.output_dir)
    path = save_reranker(reranker, output_dir / "reranker.pt", embedder=embedder, candidates=options.candidates,
                         extra={"embedder_checkpoint": str(checkpoint), "report": report})
    rows = {}
    if "val_before" in report:
        name = f"pairwise re-ranker, first {options.candidates} (epoch {report['kept_epoch']})"
        rows = {"embedding order": report["val_before"]}
        if "local_weights" in report:  # each local-term weight tried, in order; the kept one says so
            rows.update({f"{name}, local term x{w}" + (" (kept)" if float(w) == report["local_weight"] else ""):
                         scores for w, scores in report["local_weights"].items()})
        else:
            rows[name] = report["val_after"]
        print(f"\nRe-ranking on the validation set of {cfg.data.name}:\n" + format_table(rows) + "\n")
    write_results(output_dir / "results.json", f"{cfg.data.name} validation, pairwise re-ranker", rows,
                  reranker=str(path), embedder_checkpoint=str(checkpoint))
    print(f"re-ranker: {path}  (eval.py ckpt_path={checkpoint} rerank.methods=[pairwise] rerank.model={path})")
    return float(report.get("val_after", {}).get("map_at_r", float("nan")))


def _concatenate(parts: list[CachedFeatures]) -> CachedFeatures:
    return CachedFeatures(torch.cat([p.embeddings for p in parts]),
                          [torch.cat(stage) for stage in zip(*(p.pooled for p in parts), strict=True)],
                          torch.cat([p.labels for p in parts]), torch.cat([p.ids for p in parts]),
                          torch.cat([p.roles for p in parts]))
