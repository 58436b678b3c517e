"""``eval.py``/``cbir eval``: retrieval metrics of a checkpoint, or of a pretrained backbone untrained."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from cbir.commands.resume import override_key
from cbir.commands.runner import run_hydra
from cbir.data.datasets import EvalSpec
from cbir.errors import ConfigError
from cbir.evaluation.report import format_table, write_results
from cbir.evaluation.rerank import METHODS as RERANK_METHODS
from cbir.models.checkpoint import load_embedder_checkpoint, resolve_checkpoint, run_config
from cbir.training import factory
from cbir.training.module import PAIRWISE_METHODS, MetricLearningModule

log = logging.getLogger(__name__)
DIAGNOSTIC_METHODS = ("ceiling",)  # rows that read the labels: what re-ranking could reach, not an option


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` (or, without one, ``cfg.model`` as it comes pretrained) on the data
    config's ``protocol``: its ``test`` or ``val`` set, or a named entry of its ``protocols`` — one
    query/gallery spec, or a list of them whose metrics are averaged (e.g. both cross-vendor
    directions)."""
    if cfg.get("bundle") and cfg.get("ckpt_path"):
        raise ConfigError("eval.py: give bundle=<dir> or ckpt_path=<checkpoint>, not both")
    index_kind = (cfg.get("index") or {}).get("kind")
    if cfg.get("bundle"):
        from cbir.export.bundle import load_bundle

        bundle = load_bundle(cfg.bundle)
        if bundle.config:  # a bundle exported from a run folder knows the run's data
            use_the_runs_data(cfg, bundle.config)
        runtime = bundle.resolve_runtime(str(cfg.get("runtime", "eager")))
        embedder = bundle.module_for(runtime)  # eager, or the bundle's ONNX / INT8 copy as search would run it
        name = f"bundle {cfg.bundle}" + (f" ({runtime})" if runtime != "eager" else "")
        index_kind = index_kind or _bundle_index_kind(Path(bundle.path))
    elif cfg.get("ckpt_path"):
        use_the_runs_data(cfg)
        embedder = load_embedder_checkpoint(cfg.ckpt_path)
        name = f"checkpoint {Path(cfg.ckpt_path).name}"
        if cfg.model.get("scales"):  # multi-scale evaluation of a checkpoint trained at one scale
            embedder.set_scales(list(cfg.model.scales), float(cfg.model.get("scale_power", 1.0)))
            name += f" (scales {', '.join(f'{s:g}' for s in embedder.scales)})"
    else:
        embedder = factory.build_embedder_from_config(cfg)
        name = f"{cfg.model.backbone} (pretrained={cfg.model.pretrained}, not trained)"

    catalog = factory.build_catalog(cfg.data)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    specs = protocol_specs(cfg.data, cfg.protocol)
    module = MetricLearningModule(embedder, ks=tuple(cfg.metrics.ks), knn_k=cfg.metrics.get("knn_k"))
    trainer = factory.build_trainer(cfg, logger=False, callbacks=[])
    rerank = cfg.get("rerank") or {}
    methods = [str(m) for m in (rerank.get("methods") or []) if str(m) != "none"]
    known = (*RERANK_METHODS, *PAIRWISE_METHODS, *DIAGNOSTIC_METHODS)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"rerank.methods: {unknown[0]!r} is not one of {', '.join(known)}")
    n, alpha = int(rerank.get("n", 5)), float(rerank.get("alpha", 3.0))
    candidates, local_weight = (_attach_pairwise(module, embedder, rerank)
                                if any(m in PAIRWISE_METHODS for m in methods) else (None, 0.0))
    if candidates is None:  # the ceiling's depth without a re-ranker
        candidates = 20 if rerank.get("candidates") is None else int(rerank.candidates)
    if "ceiling" in methods and candidates < 1:  # other rows do not read it
        raise ConfigError(f"rerank.candidates={candidates}: re-ranking needs at least 1 hit to re-order")
    results: dict[str, list[dict[str, float]]] = {name: []}
    for spec in specs:
        datamodule.test_spec = spec
        trainer.test(module, datamodule=datamodule, verbose=False)
        results[name].append(dict(module.last_eval_metrics))
        for method in methods:  # the same embeddings, expanded: one forward pass for every row
            settings = _method_settings(method, n, alpha, candidates, local_weight)
            results.setdefault(f"{name} + {method} ({settings})", []).append(
                module.rescore(method, n, alpha, candidates))
        if index_kind:  # the same embeddings through the index a search would use
            for row, metrics in _through_index(module, cfg, str(index_kind)):
                results.setdefault(f"{name} {row}", []).append(metrics)
    rows = {row: average_metrics(parts) for row, parts in results.items()}
    metrics = rows[name]
    protocol = " and ".join(spec.describe() for spec in specs) + (", averaged" if len(specs) > 1 else "")
    if trainer.is_global_zero:  # under DDP (trainer=ddp) every rank has the same gathered metrics: one writes
        print(f"\nRetrieval on {cfg.data.name}, {protocol}:\n" + format_table(rows) + "\n")
        write_results(Path(cfg.paths.output_dir) / "eval.json", f"{cfg.data.name}, {protocol}", rows)
    return metrics


def _method_settings(method: str, n: int, alpha: float, candidates: int | None, local_weight: float = 0.0) -> str:
    """What a re-ranking row was run with, for its name in the table."""
    expansion = f"n={n}, α={alpha:g}"
    pairwise = f"first {candidates}" + (f", local term x{local_weight:g}" if local_weight > 0 else "")
    return {"kreciprocal": f"k={n}, λ=0.3", "pairwise": pairwise, "dba+pairwise": f"{expansion}, {pairwise}",
            "ceiling": f"first {candidates} perfectly re-ordered"}.get(method, expansion)


def _attach_pairwise(module: MetricLearningModule, embedder, rerank) -> tuple[int, float]:
    """Load ``rerank.model`` (a re-ranker file or the ``stage=reranker`` run folder holding one), check it was
    trained on this very model, and have the evaluation keep its tokens; the number of candidates it re-orders
    and the weight of its local term."""
    from cbir.models.pairwise import check_embedder, load_reranker

    if not rerank.get("model"):
        raise ConfigError("rerank.methods=[pairwise] needs rerank.model=<reranker.pt, or the folder of a "
                          "`python train.py stage=reranker` run>")
    if not hasattr(embedder, "backbone"):
        raise ConfigError("rerank.methods=[pairwise] reads the trunk's feature maps: evaluate with runtime=eager")
    reranker, info = load_reranker(rerank.model)
    check_embedder(info, embedder)
    if rerank.get("local_weight") is not None:  # else the weight chosen on validation when it was trained
        reranker.local_weight = float(rerank.local_weight)
    candidates = int(rerank.get("candidates") or info["candidates"])
    module.attach_reranker(reranker, candidates)
    return candidates, reranker.local_weight


def _bundle_index_kind(bundle_dir: Path) -> str | None:
    """The kind of the bundle's own index (``<bundle>/index/index.json``), which ``eval.py bundle=`` scores
    through next to exact search; None without one (or a Milvus one: its FAISS twin is ``index.kind=``)."""
    import json

    info_file = bundle_dir / "index" / "index.json"
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text())
    return None if info.get("backend", "faiss") != "faiss" else info.get("kind")


def _through_index(module: MetricLearningModule, cfg: DictConfig, kind: str) -> list[tuple[str, dict[str, float]]]:
    """The last evaluation's embeddings searched through an index of ``kind`` over its gallery
    (:mod:`cbir.index.evaluate`); the row's name says the index and its tuned parameters. When a class holds more
    images than the search depth, exact search cut at the same depth comes first, so the two rows compare."""
    from cbir.evaluation.metrics import unique_by_id
    from cbir.index.builder import IndexOptions
    from cbir.index.evaluate import describe_index, metrics_through_index

    outputs = module.last_eval_outputs
    _, embeddings, labels, roles = unique_by_id(outputs["index"], outputs["embedding"], outputs["label"],
                                                outputs["role"])
    index_cfg = cfg.get("index") or {}
    options = IndexOptions(kind=kind, target_recall=float(index_cfg.get("target_recall", 0.95)))
    metrics, info = metrics_through_index(embeddings, labels, roles, options, ks=tuple(cfg.metrics.ks))
    depth, most = int(metrics["search_depth"]), int(metrics["max_relevant"])
    rows = [(f"through {describe_index(info)} (recall@{options.k} {info[f'recall_at_{options.k}']:.3f}"
             f"{f', top {depth}' if most > depth else ''})", metrics)]
    if most > depth:  # R-precision and MAP@R past the depth are misses for both: compare like with like
        exact, _ = metrics_through_index(embeddings, labels, roles, IndexOptions(kind="flat"), ks=tuple(cfg.metrics.ks))
        rows.insert(0, (f"exact, top {depth} (R > {depth} counted as misses)", exact))
    return rows


def use_the_runs_data(cfg: DictConfig, run: dict | None = None) -> None:
    """``eval.py ckpt_path=<a run's checkpoint>`` (or ``bundle=`` whose config is ``run``) without ``data=...``
    evaluates on the data the run trained on (its ``config.yaml``), not on eval.yaml's default, with this
    command line's ``data.x=...`` on top; naming ``data=...`` evaluates elsewhere."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    if not HydraConfig.initialized():  # called as a library with a composed config: it says what it means
        return
    keys = [override_key(o) for o in HydraConfig.get().overrides.task]
    if "data" in keys:
        return
    data = ((run if run is not None else run_config(resolve_checkpoint(cfg.ckpt_path))) or {}).get("data")
    if not data:
        return
    mine = {key: OmegaConf.select(cfg, key) for key in keys if key.startswith("data.")}
    with open_dict(cfg):
        cfg.data = data
        for key, value in mine.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    log.info("evaluating on the run's own data (%s; data=... evaluates on other data)", data.get("name"))


def protocol_specs(data_cfg: DictConfig, protocol: str) -> list[EvalSpec]:
    """The evaluation specs of ``protocol``: ``test``/``val``, or an entry of ``data.protocols``."""
    named = (data_cfg.get("protocols") or {}).get(protocol)
    entry = named if named is not None else (data_cfg.get(protocol) if protocol in ("test", "val") else None)
    if entry is None:
        choices = ["test", "val", *(data_cfg.get("protocols") or {})]
        raise ConfigError(f"protocol={protocol}: data config '{data_cfg.name}' has no such evaluation; "
                          f"choose from: {', '.join(choices)}")
    entries = entry if isinstance(entry, ListConfig) else [entry]
    return [factory.eval_spec(e) for e in entries]


def average_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each rate over the protocol's parts; query counts are summed."""
    return {key: (sum(r[key] for r in results) if key.startswith("num_") else
                  sum(r[key] for r in results) / len(results)) for key in results[0]}


def main(argv=None):
    """``cbir eval`` / ``python eval.py``: Hydra overrides over conf/eval.yaml."""
    return run_hydra("eval", evaluate, argv)
