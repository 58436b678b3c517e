"""``cbir index build|add|remove|info``: embed a collection into a search index, grow it, shrink it, describe it.

    cbir index build  bundle=DIR | ckpt=FILE  collection=SPEC  out=DIR  [kind=auto] [target_recall=0.95]
                      [processes=N] [resume=false] [batch_size=64] ...   (any key of conf/index/auto.yaml)
                      (or: torchrun --nproc_per_node N -m cbir.cli index build ...)
    cbir index add    index=DIR  bundle=DIR | ckpt=FILE  collection=SPEC  [batch_size=64] [processes=N]
    cbir index remove index=DIR  [id=12 | id=[12,40]]  [path=a.jpg | path=[a.jpg,b.jpg]]
    cbir index info   index=DIR  [json=true | --json]

SPEC is a folder of images, a CSV (path[,label]) or a data config's split such as ``emoji:test``.
Arguments are ``key=value`` overrides, as for every cbir command.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from cbir.commands.args import guarded, key_value_config
from cbir.configs import load_option
from cbir.errors import ConfigError

log = logging.getLogger(__name__)

ACTIONS = ("build", "add", "remove", "info")
COMMAND_KEYS = {"bundle": None, "ckpt": None, "collection": None, "out": None, "index": None, "id": [], "path": [],
                "json": False}


def index_config(argv: Sequence[str]) -> DictConfig:
    """conf/index/auto.yaml plus the command's own keys, with ``key=value`` arguments applied."""
    base = OmegaConf.merge(load_option("index", "auto"), COMMAND_KEYS)
    return key_value_config("index", argv, "index", aliases={"--json": "json=true"}, base=base)


def load_model(cfg: DictConfig):
    """(Embedder, bundle or None) from ``bundle=`` or ``ckpt=``."""
    if bool(cfg.bundle) == bool(cfg.ckpt):
        raise ConfigError("cbir index: give the model with bundle=DIR (from `cbir export`) or ckpt=FILE, not both")
    if cfg.bundle:
        from cbir.export.bundle import load_bundle

        bundle = load_bundle(cfg.bundle)
        return bundle.embedder, bundle
    from cbir.models.checkpoint import load_embedder_checkpoint

    return load_embedder_checkpoint(cfg.ckpt), None


def require(cfg: DictConfig, action: str, *keys: str) -> None:
    missing = [key for key in keys if not cfg[key]]
    if missing:
        raise ConfigError(f"cbir index {action}: {missing[0]}=... is required (cbir index --help)")


def settings(cfg: DictConfig) -> dict:
    """The index and extraction settings of ``cfg`` (everything but the command's own keys)."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in COMMAND_KEYS}


def run_index_command(action: str, cfg: DictConfig) -> None:
    from cbir.index import add_to_index, build_bundle_index, build_collection_index, load_index
    from cbir.index.pipeline import bundle_model, drop_shards, split_options, with_resolved_precision
    from cbir.index.store import index_writer

    if action == "build":
        require(cfg, action, "collection", "out")
        embedder, bundle = load_model(cfg)
        if bundle is not None:
            index = build_bundle_index(bundle, cfg.collection, cfg.out, **settings(cfg))
        else:
            index = build_collection_index(embedder, cfg.collection, cfg.out, **settings(cfg))
        if index is not None:  # None on the torchrun ranks other than 0 (they only extract)
            print(f"index {cfg.out}: {index.describe()}")
        return
    require(cfg, action, "index")
    if action == "info":
        index = load_index(cfg.index)
        print(json.dumps(index.info, indent=1) if cfg.json else f"index {cfg.index}: {index.describe()}")
        return
    if action == "add":
        require(cfg, action, "collection")
        embedder, bundle = load_model(cfg)  # before the lock: a slow model load does not hold other writers up
    with index_writer(cfg.index) as index:  # one writer at a time; a second waits, then sees this one's images
        if action == "add":
            extraction_options = split_options(settings(cfg))[0]
            if bundle is not None:  # its runtime copy (runtime=onnx|onnx-int8) and precision made concrete
                embedder, extraction_options = bundle_model(bundle, extraction_options)
            else:
                extraction_options = with_resolved_precision(extraction_options, None)
            ids, extraction = add_to_index(index, embedder, cfg.collection, index.path / "embeddings",
                                           extraction_options)
            index.save(index.path)
            if extraction.work_dir is not None and not extraction_options.keep_shards:
                drop_shards(extraction.work_dir, index.path, f"skipped-{extraction.work_dir.name}.json")
            print(f"index {cfg.index}: added {len(ids)} images ({len(extraction.skipped)} unreadable, skipped); "
                  f"{len(index)} in all")
        else:
            _remove(cfg, index)


def _remove(cfg: DictConfig, index) -> None:
    ids, paths = _as_list(cfg.id), [str(p) for p in _as_list(cfg.path)]
    if not ids and not paths:
        raise ConfigError("cbir index remove: name the images to remove with id=N|[N,...] and/or path=P|[P,...]")
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise ConfigError(f"cbir index remove: id={cfg.id}: ids are whole numbers") from None
    unknown = [str(i) for i in index.unknown_ids(ids)]
    stored = index.paths() if paths else set()
    unknown += [p for p in paths if p not in stored]
    if unknown:  # nothing is removed: a typo must not pass for done
        raise ConfigError(f"cbir index remove: {len(unknown)} of the given ids/paths are not in {cfg.index} "
                          f"(first: {unknown[0]}); nothing removed. `cbir index info index={cfg.index}` "
                          "describes the index")
    removed = index.remove(ids) + index.remove_paths(paths)
    index.save(index.path)
    print(f"index {cfg.index}: removed {removed} images; {len(index)} left")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]


def _main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in ACTIONS:
        raise ConfigError(f"cbir index: choose an action: {' | '.join(ACTIONS)} (cbir index --help)")
    logging.getLogger().setLevel(logging.INFO)
    run_index_command(argv[0], index_config(argv[1:]))
    return 0


main = guarded(_main, __doc__)
