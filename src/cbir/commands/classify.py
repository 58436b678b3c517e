"""``cbir classify``: the k-NN label of each query image, voted by its top-k hits in a labelled index.

The same ``key=value`` arguments as ``search.py`` (conf/search.yaml): ``bundle=DIR query=IMAGE|FOLDER
[index=DIR] [k=10] [json=true|--json] [preprocess=NAME]``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from cbir.commands.args import guarded
from cbir.commands.search import query_batches, query_sources, search_config, searcher_options
from cbir.search import Prediction, Searcher

USAGE = """usage: cbir classify bundle=DIR query=IMAGE|FOLDER [index=DIR] [k=10] [json=true|--json] [filter=EXPR] [preprocess=NAME]"""


def run_classify(cfg: DictConfig) -> list[dict]:
    queries = [str(q) for q in (cfg.query if OmegaConf.is_list(cfg.query) else [cfg.query])]
    searcher = Searcher.open(cfg.bundle, cfg.index, **searcher_options(cfg, one_shot=True))
    files = query_sources(queries)
    results = []
    for batch, images in query_batches(searcher, files):
        own = [str(q) for q in batch] if cfg.exclude_self else None
        for query, prediction in zip(batch, searcher.classify(images, int(cfg.k), exclude=own, filter=cfg.filter)):
            results.append({"query": str(query), **prediction.to_json()})
            if not cfg.json:
                print(format_prediction(str(query), prediction))
    if cfg.json:
        print(json.dumps(results, indent=2))
    return results


def format_prediction(query: str, prediction: Prediction) -> str:
    runners = ", ".join(f"{label} {weight:.2f}" for label, weight in list(prediction.votes.items())[1:3])
    return (f"{query}: {prediction.label} (confidence {prediction.confidence:.2f} of {len(prediction.hits)} "
            f"neighbours{'; then ' + runners if runners else ''})")


def _main(argv: Sequence[str]) -> int:
    run_classify(search_config(argv))
    return 0


main = guarded(_main, USAGE)
