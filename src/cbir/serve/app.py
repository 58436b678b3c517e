"""The HTTP service: FastAPI over one :class:`cbir.Searcher` (the same query path as the CLI).

``create_app(searcher, ...)`` builds an app with no global state, so tests build one per fixture.

    POST /search        multipart ``image`` (+ ``k``, ``preprocess``) → ranked hits with thumbnail URLs
    POST /classify      the same upload → its k-NN label (similarity-weighted vote), confidence and hits
    GET  /images/{id}   thumbnail of an indexed image, by id only (no client path ever reaches the disk)
    GET  /health        status, index size, model, embedding dimension (open even with an API key)
    GET  /              the web page (open; it sends the key it is given)
    GET  /openapi.json  the schema (FastAPI's default; /docs renders it)

Every user mistake is a 4xx JSON ``{"error": "...", "detail": ...}``; uploads are size-limited while
they are read (413), decoded by content (never by name or content type) and pixel-limited before
decoding (decompression bombs).
"""

import asyncio
import enum
import hmac
import io
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import anyio
import anyio.to_thread
import numpy as np
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from cbir.errors import BadImageError, CbirError, ConfigError
from cbir.preprocess.query import CleanUpTimeout
from cbir.search import (
    DEFAULT_MAX_PIXELS,
    MAX_K,
    Hit,
    ImageTooLargeError,
    Searcher,
    parse_array_source,
    read_query_image_and_size,
    vote,
)
from cbir.serve.batching import QueryBatcher
from cbir.serve.thumbnails import ThumbnailNotFound, Thumbnails

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
PATH_STYLES = ("relative", "name", "absolute")  # how result paths are shown: serve option `paths`
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_FILTER_CHARS = 2000  # a label filter is a short expression, not a payload
MULTIPART_SLACK_BYTES = 64 * 1024  # boundaries, headers and the small form fields around the image


LIGHT_QUERY_PIXELS = 1 << 20  # uploads up to this size (1 Mpx) decode in the light lane


def declared_pixels(data: bytes) -> int:
    """Width x height from an upload's header (nothing is decoded); 0 when it has none (the decoder then says
    what is wrong)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.width) * int(image.height)
    except Exception:  # noqa: BLE001 - any unreadable header: the decode step reports it properly
        return 0


class ApiError(Exception):
    """A user mistake answered with ``status`` and ``{"error": message, "detail": detail}``."""

    def __init__(self, status: int, message: str, detail=None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.detail, self.headers = status, message, detail, headers


def error_response(status: int, message: str, detail=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


class UploadLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` while it is read, not after.

    A declared Content-Length over the limit is refused before reading; a longer body than declared (or a
    chunked one) is cut off at the limit and the app's answer replaced by the 413."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        message = (f"upload larger than the limit of {self.max_bytes:,} bytes: send a smaller image "
                   "(resize or compress it)")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, message, {"limit_bytes": self.max_bytes,
                                                       "content_length": int(declared)})(scope, receive, send)
        state = {"read": 0, "over": False, "answered": False}

        async def limited_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            event = await receive()
            if event["type"] == "http.request":
                state["read"] += len(event.get("body", b""))
                if state["read"] > self.max_bytes:
                    state["over"] = True
                    return {"type": "http.disconnect"}  # the form parser stops here
            return event

        async def guarded_send(event):
            if not state["over"]:
                return await send(event)
            if not state["answered"]:
                state["answered"] = True
                await error_response(413, message, {"limit_bytes": self.max_bytes})(scope, receive, send)

        await self.app(scope, limited_receive, guarded_send)


def preprocess_choices() -> dict[str, object]:
    """conf/preprocess option names → their specs (the same files ``search.py preprocess=NAME`` reads)."""
    from cbir.configs import group_options, preset

    return {name: preset("preprocess", name) for name in group_options("preprocess")}


def display_path(path: str | None, root: Path | None, style: str) -> str | None:
    """What a client sees of an indexed image's path: relative to the collection root (default), the
    file name only, or (when configured) the server's absolute path."""
    if path is None or style == "absolute":
        return path
    if parse_array_source(path) is not None:
        return path  # a dataset reference (fashion_mnist:train/123), not a server path
    if style == "relative" and root is not None:
        try:
            return Path(path).resolve().relative_to(root).as_posix()
        except (ValueError, OSError):
            pass
    return Path(path).name if "/" in path or "\\" in path else path


def create_app(searcher: Searcher, *, api_key: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               thumbnail_size: int = 256, thumbnail_cache: int = 2048, batch_window_ms: float = 0.0,
               max_batch: int = 16, default_k: int = 10, path_style: str = "relative",
               max_decodes: int = 4, max_waiting: int = 16, clean_timeout_s: float = 20.0,
               title: str = "cbir image search") -> FastAPI:
    """A FastAPI app that answers queries with ``searcher`` (loaded once, shared read-only).

    ``max_batch > 1`` embeds concurrent queries together (``batch_window_ms > 0`` also waits that long
    for more; ``max_batch=1``: one forward pass per query); ``api_key`` protects /search and /images (header ``X-API-Key``)."""
    if path_style not in PATH_STYLES:
        raise ConfigError(f"serve.paths={path_style!r}: choose from {', '.join(PATH_STYLES)}")
    choices = preprocess_choices()
    Preprocess = enum.Enum("Preprocess", {name: name for name in choices}, type=str)
    batcher = QueryBatcher(searcher, window_ms=batch_window_ms, max_batch=max_batch)
    # decoding and preprocessing: at most max_decodes at once (a 6000x6000 upload decodes to ~100 MB), at
    # most max_waiting queued behind them; beyond that a 503 with Retry-After rather than memory or latency
    # growing with the number of clients
    decode_limiter = anyio.CapacityLimiter(max_decodes)
    # small uploads (by the size their header declares) have their own lane: an everyday query never waits
    # behind large photos or slow clean-ups (measured: benchmarks/serve_abuse.py)
    light_limiter = anyio.CapacityLimiter(max_decodes)
    admitted = {"count": 0}  # in the decode stage or waiting for it (changed on the event loop only)
    thumbnails = Thumbnails(searcher, size=thumbnail_size, capacity=thumbnail_cache)
    index_meta = getattr(searcher.index, "metadata", None) or {}
    collection = index_meta.get("collection")
    collection_root = Path(collection).resolve() if collection and Path(collection).is_dir() else None
    info = searcher.info()

    @asynccontextmanager
    async def lifespan(_app):
        # read the first indexed image once in the background: an array-backed collection (Fashion-MNIST) loads
        # its dataset on the first thumbnail, which would otherwise leave the first results grey for seconds
        warming = asyncio.get_running_loop().run_in_executor(None, thumbnails.warm)
        yield
        await batcher.close()
        await warming

    app = FastAPI(title=title, version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Content-based image retrieval: upload a query image, get the most similar "
                              "indexed images.")
    app.state.searcher, app.state.batcher, app.state.thumbnails = searcher, batcher, thumbnails
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes + MULTIPART_SLACK_BYTES)
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required when the service runs with an API key")

    def require_key(given: Annotated[str | None, Depends(key_header)]) -> None:
        if api_key and not (given and hmac.compare_digest(given.encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send it in the X-API-Key header "
                                "(the web page: open it with ?key=...)")

    # -- errors: always {"error", "detail"} ---------------------------------------------------------
    @app.exception_handler(ApiError)
    async def on_api_error(_request, exc: ApiError):
        headers = {"WWW-Authenticate": "X-API-Key"} if exc.status == 401 else exc.headers
        return error_response(exc.status, exc.message, exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(_request, exc: RequestValidationError):
        problems = [{"field": ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")),
                     "where": (err.get("loc") or ["?"])[0], "problem": err.get("msg", "")}
                    for err in exc.errors()]  # no "input": it may be the raw bytes of an upload
        if any(p["field"] == "image" and "missing" in str(err.get("type")) for p, err in zip(problems, exc.errors())):
            message = "no image: upload it as the multipart/form-data field 'image'"
        else:
            message = "; ".join(f"{p['field'] or p['where']}: {p['problem']}" for p in problems) or "invalid request"
        return error_response(422, message, problems)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no such page: {request.url.path}", 405: f"method {request.method} not allowed here"}.get(
            exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, exc.detail, getattr(exc, "headers", None))

    # -- routes ---------------------------------------------------------------------------------------
    def hit_json(hit: Hit) -> dict:
        return {"rank": hit.rank, "score": hit.score, "match": hit.match, "id": hit.id, "label": hit.label,
                "path": display_path(hit.path, collection_root, path_style),
                "thumbnail_url": str(app.url_path_for("thumbnail", image_id=str(hit.id)))}

    async def query_hits(image: UploadFile, k: int | None, k_query: int | None, preprocess,
                         filter: str | None = None) -> dict:
        """Read, decode and clean one upload (bounded, off the inference worker), then its top-k hits."""
        started = time.perf_counter()
        data = await image.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"image larger than the limit of {max_upload_bytes:,} bytes: send a smaller one",
                           {"limit_bytes": max_upload_bytes})
        name = Path(image.filename or "upload").name[:100]
        if admitted["count"] >= max_decodes + max_waiting:
            raise ApiError(503, f"busy: {max_decodes} queries are being decoded and {max_waiting} wait; retry in a "
                                "moment", {"retry_after_seconds": 1}, headers={"Retry-After": "1"})
        spec = choices.get(preprocess.value) if preprocess else None
        filter = filter.strip() if filter and filter.strip() else None
        try:
            searcher.check_filter(filter)  # before the upload is decoded
        except CbirError as exc:
            raise ApiError(422, str(exc)) from None

        deadline = time.monotonic() + clean_timeout_s  # waiting for a slot counts: an overloaded server sheds

        def decode_and_clean() -> tuple[np.ndarray, tuple[int, int]]:
            pixels, size = read_query_image_and_size(data, name=name, max_pixels=max_pixels)
            return searcher.clean_images([pixels], spec, deadline=deadline)[0], size

        admitted["count"] += 1
        try:
            pixels = declared_pixels(data)
            heavy = pixels > LIGHT_QUERY_PIXELS or (spec is not None and pixels > LIGHT_QUERY_PIXELS // 4)
            cleaned, (width, height) = await anyio.to_thread.run_sync(
                decode_and_clean, limiter=decode_limiter if heavy else light_limiter)
        except CleanUpTimeout:
            raise ApiError(503, f"decoding and cleaning this query took more than {clean_timeout_s:g} s "
                                "(serve option clean_timeout_s): retry, send a smaller image, or ask for a lighter "
                                "preprocess", {"retry_after_seconds": 1}, headers={"Retry-After": "1"}) from None
        except BadImageError as exc:
            too_big = isinstance(exc, ImageTooLargeError)
            raise ApiError(413 if too_big else 422, str(exc), {"max_pixels": max_pixels} if too_big else None) \
                from None
        except CbirError as exc:
            raise ApiError(422, str(exc)) from None
        finally:
            admitted["count"] -= 1
        chosen_k = k if k is not None else (k_query if k_query is not None else default_k)
        try:
            hits = await batcher.search(cleaned, chosen_k, filter)
        except CbirError as exc:
            raise ApiError(422, str(exc)) from None
        return {"query": {"name": name, "width": width, "height": height}, "k": chosen_k,
                "preprocess": preprocess.value if preprocess else None, "filter": filter, "hits": hits,
                "started": started}

    upload_responses = {401: {"description": "API key missing or wrong"},
                        413: {"description": "upload or image too large"},
                        422: {"description": "not an image, or k/preprocess invalid"},
                        503: {"description": "too many uploads at once: retry after Retry-After seconds"}}

    @app.post("/search", dependencies=[Depends(require_key)],
              summary="the top-k indexed images most similar to an uploaded image", responses=upload_responses)
    async def search(image: Annotated[UploadFile, File(description="the query image (any format Pillow decodes)")],
                     k: Annotated[int | None, Form(ge=1, le=MAX_K, description=f"results, 1..{MAX_K}")] = None,
                     preprocess: Annotated[Preprocess | None, Form(
                         description="query clean-up (a conf/preprocess option); default: the bundle's")] = None,
                     filter: Annotated[str | None, Form(max_length=MAX_FILTER_CHARS, description=(
                         "only hits whose label passes: label == 'cat', label in ['cat', 'dog'] (a Milvus-backed "
                         "index: any Milvus expression)"))] = None,
                     k_query: Annotated[int | None, Query(alias="k", ge=1, le=MAX_K,
                                                             description="k as a query parameter")] = None):
        found = await query_hits(image, k, k_query, preprocess, filter)
        body = {"query": found["query"], "k": found["k"], "preprocess": found["preprocess"], "filter": found["filter"],
                "took_ms": round((time.perf_counter() - found["started"]) * 1000, 2),
                "results": [hit_json(hit) for hit in found["hits"]]}
        if searcher.labelled and found["hits"]:  # the k-NN label of the same hits (POST /classify, for free)
            prediction = vote(found["hits"])
            body["predicted"] = {"label": prediction.label, "confidence": round(prediction.confidence, 4)}
        return body

    @app.post("/classify", dependencies=[Depends(require_key)],
              summary="the k-NN label of an uploaded image: a similarity-weighted vote of its top-k hits",
              responses={**upload_responses, 422: {"description": "not an image, k/preprocess invalid, or an "
                                                                  "index without labels"}})
    async def classify(image: Annotated[UploadFile, File(description="the query image (any format Pillow decodes)")],
                       k: Annotated[int | None, Form(ge=1, le=MAX_K, description=f"neighbours, 1..{MAX_K}")] = None,
                       preprocess: Annotated[Preprocess | None, Form(
                           description="query clean-up (a conf/preprocess option); default: the bundle's")] = None,
                       filter: Annotated[str | None, Form(max_length=MAX_FILTER_CHARS, description=(
                           "only hits whose label passes: label == 'cat', label in ['cat', 'dog'] (a Milvus-backed "
                           "index: any Milvus expression)"))] = None,
                       k_query: Annotated[int | None, Query(alias="k", ge=1, le=MAX_K,
                                                               description="k as a query parameter")] = None):
        if not searcher.labelled:
            raise ApiError(422, searcher.no_labels_message())
        found = await query_hits(image, k, k_query, preprocess, filter)
        prediction = vote(found["hits"])
        return {"query": found["query"], "k": found["k"], "preprocess": found["preprocess"], "filter": found["filter"],
                "label": prediction.label, "confidence": prediction.confidence, "votes": prediction.votes,
                "took_ms": round((time.perf_counter() - found["started"]) * 1000, 2),
                "results": [hit_json(hit) for hit in found["hits"]]}

    @app.get("/images/{image_id}", name="thumbnail", dependencies=[Depends(require_key)],
             summary="a thumbnail of an indexed image, by its id",
             responses={200: {"content": {"image/jpeg": {}, "image/png": {}}},
                        404: {"description": "no indexed image with this id"}},
             response_class=Response)
    async def thumbnail(image_id: str):
        if not (image_id.isascii() and image_id.isdigit() and len(image_id) < 19):
            raise ApiError(404, f"no indexed image with id {image_id!r}: ids are the whole numbers /search returns")
        try:
            data, media_type = await anyio.to_thread.run_sync(thumbnails.get, int(image_id))
        except ThumbnailNotFound as exc:
            raise ApiError(404, str(exc)) from None
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/health", summary="service status, index size and model")
    async def health():
        return {"status": "ok", "index_size": len(searcher.index), "model": info.get("backbone"),
                "embedding_dim": int(info["embedding_dim"]), "index_type": info.get("index_type") or index_meta.get("factory"),
                "max_k": MAX_K, "default_k": default_k, "preprocess_options": sorted(choices), "labelled": searcher.labelled,
                "api_key_required": bool(api_key), "max_upload_bytes": max_upload_bytes,
                "micro_batching": {"enabled": batcher.enabled, "window_ms": batch_window_ms,
                                   "max_batch": max_batch, "batches": batcher.batches,
                                   "queries": batcher.batched_queries}}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(STATIC_DIR / "favicon.png", media_type="image/png")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        """Swagger UI from the assets of PyPI swagger-ui-bundle, served here: FastAPI's own /docs loads them
        from a CDN and stays blank offline."""
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} — API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/favicon.ico")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
    return app

