"""``search.py``/``cbir search``: arguments → Searcher → ranked tables, JSON and result grids.

Plain ``key=value`` arguments over conf/search.yaml rather than a Hydra app: a search should start fast,
write no output folder, and ``index=<path>`` must stay a path (``index`` is a config group for export).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbir.commands.args import guarded, key_value_config
from cbir.configs import preset
from cbir.data.catalog import ArrayRef
from cbir.errors import ConfigError
from cbir.search import Searcher, expand_query_paths, format_hits, parse_array_source, read_query_image
from cbir.visual.grid import save_grid

USAGE = """usage: python search.py bundle=DIR query=IMAGE|FOLDER [index=DIR] [k=10] [json=true|--json]
                        [grid=out.png] [filter="label == 'cat'"] [preprocess=NAME] [device=cpu|cuda] [precision=auto|fp32|bf16]
                        [runtime=auto|eager|compiled|onnx|onnx-int8] [batch_size=32]"""


def search_config(argv: Sequence[str]) -> DictConfig:
    """conf/search.yaml with ``key=value`` arguments applied (``--json`` = ``json=true``)."""
    cfg = key_value_config("search", argv, "search", aliases={"--json": "json=true"})
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}=... is required (python search.py bundle=DIR query=IMAGE)")
    for key in ("k", "batch_size"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r}: must be a whole number >= 1")
    return cfg


def preprocess_spec(name_or_spec):
    """``preprocess=clahe`` names a conf/preprocess option; a dict/list is a spec as it is."""
    return preset("preprocess", name_or_spec)


def searcher_options(cfg: DictConfig, one_shot: bool = False) -> dict:
    """The Searcher's keyword arguments from a search/classify/serve config (``one_shot``: a CLI process that
    searches its queries and exits, where start-up time counts most)."""
    rerank = cfg.get("rerank") or {}
    return {"preprocess": preprocess_spec(cfg.preprocess), "device": cfg.device, "precision": str(cfg.precision),
            "runtime": str(cfg.get("runtime", "auto")), "one_shot": one_shot,
            "batch_size": int(cfg.batch_size), "rerank": str(rerank.get("method", "none")),
            "rerank_n": int(rerank.get("n", 3)), "rerank_alpha": float(rerank.get("alpha", 3.0))}


def run_search(cfg: DictConfig) -> list[dict]:
    queries = [str(q) for q in (cfg.query if OmegaConf.is_list(cfg.query) else [cfg.query])]
    searcher = Searcher.open(cfg.bundle, cfg.index, **searcher_options(cfg, one_shot=True))
    searcher.check_filter(cfg.filter)
    files = query_sources(queries)
    grids = grid_paths(cfg.grid, files) if cfg.grid else {}
    results = []
    for batch, images in query_batches(searcher, files):
        own = [str(q) for q in batch] if cfg.exclude_self else None
        for query, image, hits in zip(batch, images, searcher.search_images(images, int(cfg.k), exclude=own,
                                                                                  filter=cfg.filter)):
            label = query.parent.name if isinstance(query, Path) else dataset_label(searcher, query)
            results.append({"query": str(query), "hits": [hit.to_json() for hit in hits]})
            if cfg.grid:
                # a folder-of-classes or dataset query knows its label: borders mark right and wrong hits
                known = label if any(hit.label == label for hit in hits) or not isinstance(query, Path) else None
                save_grid(image, hits, grids[str(query)], query_label=known, load=searcher.load_source)
                results[-1]["grid"] = str(grids[str(query)])
            if not cfg.json:
                print(format_hits(str(query), hits) + "\n")
    if cfg.json:
        print(json.dumps(results, indent=2))  # a list, for one query as for many
    return results


def query_batches(searcher: Searcher, files: list[Path | str]):
    """``(queries, decoded images)`` in batches of the Searcher's size: files decoded, dataset references
    (``fashion_mnist:test/0``) read from their dataset."""
    for start in range(0, len(files), searcher.batch_size):
        batch = files[start:start + searcher.batch_size]
        yield batch, [read_query_image(q) if isinstance(q, Path) else searcher.load_source(q) for q in batch]


def grid_paths(grid: str, queries: list[Path | str]) -> dict[str, Path]:
    """Where each query's result grid goes: ``grid`` itself for one query and a ``.png`` name, else
    ``grid/<query name>.png``, numbered (``shoe-2.png``) when queries from different folders share a name."""
    grid = Path(grid)
    if len(queries) == 1 and grid.suffix.lower() == ".png":
        return {str(queries[0]): grid}
    targets: dict[str, Path] = {}
    used: set[str] = set()
    for query in queries:
        stem = query.stem if isinstance(query, Path) else query.replace(":", "_").replace("/", "_")
        name, n = f"{stem}.png", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        targets[str(query)] = grid / name
    return targets


def query_sources(queries: list[str]) -> list[Path | str]:
    """Query files (folders expanded), keeping ``<dataset>:<array>/<row>`` references (e.g.
    ``fashion_mnist:test/0``) as they are: the Searcher reads those from the dataset."""
    sources: list[Path | str] = []
    for query in queries:
        if not Path(query).exists() and parse_array_source(query) is not None:
            sources.append(query)
        else:
            sources += expand_query_paths([query])
    return sources


def dataset_label(searcher: Searcher, source: str) -> str | None:
    """The class name of a dataset-array query (``fashion_mnist:test/0`` → ``Ankle boot``), if known."""
    name, array, row = parse_array_source(source)
    catalog = searcher.dataset_catalog(name)
    wanted = ArrayRef(array, row)
    return next((catalog.class_names[r.label] for r in catalog.records if r.source == wanted), None)


def _main(argv: Sequence[str]) -> int:
    run_search(search_config(argv))
    return 0


main = guarded(_main, USAGE)
