"""``python -m cbir.serve`` / ``cbir serve``: ``key=value`` arguments over conf/serve.yaml → uvicorn.

Plain ``key=value`` parsing like ``search.py`` (no Hydra app): a server should start fast, write no output
folder, and ``index=<path>`` stays a path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from cbir.commands.args import guarded, key_value_config
from cbir.errors import ConfigError
from cbir.serve.app import PATH_STYLES

USAGE = """usage: python -m cbir.serve bundle=DIR [index=DIR] [host=127.0.0.1] [port=8000] [api_key=KEY]
                          [k=10] [max_batch=16] [batch_window_ms=0] [max_upload_mb=10] [paths=relative|name|absolute] ...
       (every key of conf/serve.yaml; the API key may also come from $CBIR_API_KEY)"""


def serve_config(argv: Sequence[str]) -> DictConfig:
    """conf/serve.yaml with ``key=value`` arguments applied."""
    cfg = key_value_config("serve", argv, "serve")
    if OmegaConf.is_missing(cfg, "bundle"):
        raise ConfigError("bundle=... is required (python -m cbir.serve bundle=DIR; make one with export.py)")
    if cfg.api_key is None and os.environ.get("CBIR_API_KEY"):
        cfg.api_key = os.environ["CBIR_API_KEY"]
    for key in ("port", "k", "max_pixels", "thumbnail_size", "thumbnail_cache", "max_batch", "batch_size",
                "max_decodes", "max_waiting"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]!r}: must be a whole number >= 0")
    if cfg.max_batch < 1:
        raise ConfigError(f"max_batch={cfg.max_batch}: must be at least 1 (1 = no micro-batching)")
    from cbir.search import MAX_K

    for key, low, high in (("port", 1, 65535), ("k", 1, MAX_K), ("max_pixels", 1, None), ("thumbnail_size", 1, None),
                           ("batch_size", 1, None), ("max_decodes", 1, None)):
        if cfg[key] < low or (high is not None and cfg[key] > high):
            raise ConfigError(f"{key}={cfg[key]}: must lie in {low}..{high if high is not None else 'any'}")
    if cfg.api_key is not None:
        cfg.api_key = str(cfg.api_key)
        if not cfg.api_key.isascii() or not cfg.api_key.isprintable() or not cfg.api_key.strip():
            raise ConfigError("api_key: use printable ASCII characters (HTTP headers cannot carry others, so no "
                              "client could ever send it)")
    for key in ("max_upload_mb", "batch_window_ms", "clean_timeout_s"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]!r}: must be a number >= 0")
    if cfg.clean_timeout_s <= 0:
        raise ConfigError(f"clean_timeout_s={cfg.clean_timeout_s}: must be > 0 seconds (every query would time out)")
    if cfg.paths not in PATH_STYLES:
        raise ConfigError(f"paths={cfg.paths!r}: choose from {', '.join(PATH_STYLES)}")
    return cfg


def build_app(cfg: DictConfig):
    """The Searcher (bundle + index, loaded once) and the app over it, from a serve config."""
    from cbir.commands.search import searcher_options
    from cbir.search import Searcher
    from cbir.serve.app import create_app

    searcher = Searcher.open(cfg.bundle, cfg.index, **searcher_options(cfg))
    return create_app(searcher, api_key=cfg.api_key or None, max_upload_bytes=int(float(cfg.max_upload_mb) * 2**20),
                      max_pixels=int(cfg.max_pixels), thumbnail_size=int(cfg.thumbnail_size),
                      thumbnail_cache=int(cfg.thumbnail_cache), batch_window_ms=float(cfg.batch_window_ms),
                      max_batch=int(cfg.max_batch), default_k=int(cfg.k), path_style=str(cfg.paths),
                      max_decodes=int(cfg.max_decodes), max_waiting=int(cfg.max_waiting),
                      clean_timeout_s=float(cfg.clean_timeout_s))


def run_server(cfg: DictConfig) -> None:
    import asyncio

    import anyio.to_thread
    import uvicorn

    app = build_app(cfg)
    health = app.state.searcher.info()
    shown_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{shown_host}:{cfg.port}/"
    print(f"cbir serve: {health['index_size']:,} images, {health['backbone']} ({health['embedding_dim']}-d)")
    print(f"open {url}{'?key=<your API key>' if cfg.api_key else ''} in a browser  (API schema: {url}docs)",
          flush=True)
    config = uvicorn.Config(app, host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.log_level))
    server = uvicorn.Server(config)

    async def serve() -> None:
        if cfg.threads:
            anyio.to_thread.current_default_thread_limiter().total_tokens = int(cfg.threads)
        await server.serve()

    asyncio.run(serve())


def _main(argv: Sequence[str]) -> int:
    run_server(serve_config(argv))
    return 0


main = guarded(_main, USAGE)
