"""Micro-batching: concurrent queries are embedded as one batch by a single inference worker.

A batched forward pass costs less per image than separate ones (one dispatch overhead, better matrix
shapes, no threads fighting over the cores). While the worker runs a batch, new queries queue up; the next
batch takes all of them (up to ``max_batch``), so a lone query never waits. ``window_ms > 0`` additionally
holds a batch open that long for company. ``max_batch=1`` turns batching off: each query then runs on its
own in the thread pool. Inference never runs on the event loop (benchmarks/serve_load.py measures both).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import anyio.to_thread
import numpy as np

from cbir.search import Hit, Searcher


@dataclass
class _Query:
    image: np.ndarray  # preprocessed already (the request's own thread did it, not this worker)
    k: int
    future: asyncio.Future
    filter: str | None = None
    queued_at: float = field(default_factory=time.perf_counter)


class QueryBatcher:
    """Embeds and searches query images through one :class:`Searcher`, batching concurrent ones when
    ``max_batch > 1``. Images arrive preprocessed (:meth:`Searcher.clean_images`): a slow clean-up of one
    large upload never holds up the other queries' forward pass."""

    def __init__(self, searcher: Searcher, *, window_ms: float = 0.0, max_batch: int = 16) -> None:
        self.searcher = searcher
        self.window_s = max(0.0, float(window_ms)) / 1000.0
        self.max_batch = max(1, int(max_batch))
        self._queue: asyncio.Queue[_Query] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0  # counters for /health: how much batching actually happened
        self.batched_queries = 0

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1

    async def search(self, image: np.ndarray, k: int, filter: str | None = None) -> list[Hit]:
        """The top-``k`` hits of one decoded, preprocessed query image (``filter``: a label filter)."""
        if not self.enabled:
            return (await anyio.to_thread.run_sync(self._search_images, [image], k, filter))[0]
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Query(image, k, future, filter))
        return await future

    def _search_images(self, images: list[np.ndarray], k: int, filter: str | None = None) -> list[list[Hit]]:
        embeddings, tokens = self.searcher.embed_queries(images)
        return self.searcher.search_embeddings(embeddings, k, filter=filter, images=images, tokens=tokens)

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._run(), name="cbir-query-batcher")

    async def close(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._worker = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():  # what queued meanwhile
                batch.append(self._queue.get_nowait())
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [q for q in batch if not q.future.cancelled()]
            if not live:
                continue
            try:
                results = await anyio.to_thread.run_sync(self._search_batch, live)
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request, not swallowed
                for query in live:
                    if not query.future.done():
                        query.future.set_exception(exc)
                continue
            self.batches += 1
            self.batched_queries += len(live)
            for query, hits in zip(live, results):
                if not query.future.done():
                    query.future.set_result(hits)

    def _search_batch(self, queries: list[_Query]) -> list[list[Hit]]:
        """One forward pass for the whole batch; one index search per distinct filter."""
        embeddings, tokens = self.searcher.embed_queries([q.image for q in queries])
        results: list[list[Hit]] = [[] for _ in queries]
        for filter in dict.fromkeys(q.filter for q in queries):
            rows = [i for i, q in enumerate(queries) if q.filter == filter]
            hits = self.searcher.search_embeddings(embeddings[rows], max(queries[i].k for i in rows), filter=filter,
                                                   images=[queries[i].image for i in rows],
                                                   tokens=None if tokens is None else tokens[rows])
            for i, row in zip(rows, hits):
                results[i] = row[:queries[i].k]  # top-k is a prefix of top-max(k)
        return results
