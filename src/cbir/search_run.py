"""``search.py``/``cbir search``: arguments → Searcher → ranked tables, JSON and result grids.

Plain ``key=value`` arguments over conf/search.yaml rather than a Hydra app: a search should start fast,
write no output folder, and ``index=<path>`` must stay a path (``index`` is a config group for export).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbir.entry import config_dir, key_value_config
from cbir.errors import ConfigError
from cbir.search import Searcher, expand_query_paths, format_hits, read_query_image, save_grid


def search_config(argv: Sequence[str]) -> DictConfig:
    """conf/search.yaml with ``key=value`` arguments applied (``--json`` = ``json=true``)."""
    cfg = key_value_config("search", argv, "search", aliases={"--json": "json=true"})
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}=... is required (python search.py bundle=DIR query=IMAGE)")
    return cfg


def preprocess_spec(name_or_spec):
    """``preprocess=clahe`` names a conf/preprocess option; a dict/list is a spec as it is."""
    if name_or_spec is None:
        return None
    if isinstance(name_or_spec, str):
        path = config_dir() / "preprocess" / f"{name_or_spec}.yaml"
        if not path.is_file():
            choices = sorted(p.stem for p in (config_dir() / "preprocess").glob("*.yaml"))
            raise ConfigError(f"preprocess={name_or_spec}: no such option; choose from: {', '.join(choices)}")
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return OmegaConf.to_container(name_or_spec, resolve=True) if OmegaConf.is_config(name_or_spec) else name_or_spec


def run_search(cfg: DictConfig) -> list[dict]:
    queries = [str(q) for q in (cfg.query if OmegaConf.is_list(cfg.query) else [cfg.query])]
    searcher = Searcher.open(cfg.bundle, cfg.index, preprocess=preprocess_spec(cfg.preprocess),
                             device=cfg.device, bf16=bool(cfg.bf16), batch_size=int(cfg.batch_size))
    files = query_sources(queries)
    results = []
    for start in range(0, len(files), searcher.batch_size):
        batch = files[start:start + searcher.batch_size]
        images = [read_query_image(q) if isinstance(q, Path) else searcher.load_source(q) for q in batch]
        for query, image, hits in zip(batch, images, searcher.search_images(images, int(cfg.k))):
            label = query.parent.name if isinstance(query, Path) else dataset_label(searcher, query)
            results.append({"query": str(query), "hits": [hit.to_json() for hit in hits]})
            if cfg.grid:
                grid = Path(cfg.grid)
                stem = query.stem if isinstance(query, Path) else query.replace(":", "_").replace("/", "_")
                target = grid / f"{stem}.png" if len(files) > 1 or grid.suffix.lower() != ".png" else grid
                # a folder-of-classes or dataset query knows its label: borders mark right and wrong hits
                known = label if any(hit.label == label for hit in hits) or not isinstance(query, Path) else None
                save_grid(image, hits, target, query_label=known, load=searcher.load_source)
            if not cfg.json:
                print(format_hits(str(query), hits) + "\n")
    if cfg.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return results


def query_sources(queries: list[str]) -> list[Path | str]:
    """Query files (folders expanded), keeping ``<dataset>:<array>/<row>`` references (e.g.
    ``fashion_mnist:test/0``) as they are: the Searcher reads those from the dataset."""
    from cbir.search import parse_array_source

    sources: list[Path | str] = []
    for query in queries:
        if not Path(query).exists() and parse_array_source(query) is not None:
            sources.append(query)
        else:
            sources += expand_query_paths([query])
    return sources


def dataset_label(searcher: Searcher, source: str) -> str | None:
    """The class name of a dataset-array query (``fashion_mnist:test/0`` → ``Ankle boot``), if known."""
    from cbir.data.formats import ArrayRef
    from cbir.search import parse_array_source

    name, array, row = parse_array_source(source)
    catalog = searcher.dataset_catalog(name)
    wanted = ArrayRef(array, row)
    return next((catalog.class_names[r.label] for r in catalog.records if r.source == wanted), None)
