"""Abuse benchmark of the search service (issue 15): what one hostile or careless client can do to everyone
else. A real uvicorn server (``python -m cbir.serve``) on loopback; bounded in count and time.

Phases, each with a steady stream of normal queries (Fashion-MNIST PNGs, ``--normal-concurrency``
connections) running alongside, whose latencies are the figures that matter:

1. ``baseline`` — normal queries alone;
2. ``pixel flood`` — ``--flood`` concurrent uploads of a 6000 x 6000 PNG (≈ 100 KB on the wire, 108 MB
   decoded: under the 40 Mpx limit, so each is decoded), ``--flood-rounds`` times;
3. ``slow preprocessing`` — ``--slow`` concurrent 6000 x 6000 uploads asking for ``preprocess=nlm``
   (non-local means: about a second per megapixel here, so 43 s for the full image before the clean-up
   size cap);
4. ``cold thumbnails`` — a freshly started server, ``--thumbnails`` concurrent ``GET /images/{id}`` for
   distinct ids.

Per phase: normal-query p50 / p99, the abusive requests' status codes, 5xx count, and the server's peak
RSS (sampled every 50 ms from /proc). The bundle is the demo-like one of ``serve_load.py`` (ImageNet
MobileNetV2 at 64 px over 3000 Fashion-MNIST test PNGs, built once under ``--work``), or ``--bundle``.

    python benchmarks/serve_abuse.py --out benchmarks/results/serve_abuse.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from serve_load import ROOT, build_bundle, busy_processes, query_uploads, start_server

from cbir.evaluation.report import write_json

GOAL_RSS_MB, GOAL_P99_S = 2500, 3.0  # the "done when"


def big_png(side: int = 6000) -> bytes:
    """A smooth colour gradient: decodes to side² x 3 bytes, compresses to about 100 KB."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    image = np.stack([np.broadcast_to(ramp[None, :], (side, side)), np.broadcast_to(ramp[:, None], (side, side)),
                      np.full((side, side), 128, np.float32)], axis=2).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG", optimize=True)
    return out.getvalue()


class RssSampler:
    """The peak resident memory of a process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def normal_stream(client: httpx.AsyncClient, uploads: list[bytes], stop: asyncio.Event, concurrency: int,
                        minimum: int) -> tuple[list[float], list[int]]:
    """Normal searches on ``concurrency`` connections until ``stop`` is set (and at least ``minimum`` ran)."""
    latencies: list[float] = []
    statuses: list[int] = []
    counter = iter(range(10**9))

    async def worker() -> None:
        for n in counter:
            if stop.is_set() and len(latencies) >= minimum:
                return
            started = time.perf_counter()
            try:
                response = await client.post("/search", files={"image": ("q.png", uploads[n % len(uploads)])},
                                             data={"k": "10"})
                statuses.append(response.status_code)
            except httpx.HTTPError:
                statuses.append(-1)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return latencies, statuses


async def abusive(client: httpx.AsyncClient, requests: list[tuple[str, str, dict]], concurrency: int) -> list[int]:
    """``requests`` (method, path, kwargs) sent ``concurrency`` at a time; their status codes."""
    statuses: list[int] = []
    queue = list(requests)

    async def worker() -> None:
        while queue:
            method, path, kwargs = queue.pop()
            try:
                statuses.append((await client.request(method, path, **kwargs)).status_code)
            except httpx.HTTPError:
                statuses.append(-1)

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return statuses


async def phase(url: str, uploads: list[bytes], attack: list[tuple[str, str, dict]], attack_concurrency: int,
                normal_concurrency: int, minimum: int) -> dict:
    limits = httpx.Limits(max_connections=normal_concurrency + attack_concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        stop = asyncio.Event()
        normal = asyncio.create_task(normal_stream(client, uploads, stop, normal_concurrency, minimum))
        started = time.perf_counter()
        attack_statuses = await abusive(client, attack, attack_concurrency) if attack else []
        attack_seconds = time.perf_counter() - started
        stop.set()
        latencies, statuses = await normal
    ms = np.array(latencies) * 1000
    codes = {str(c): attack_statuses.count(c) for c in sorted(set(attack_statuses))}
    return {"normal_queries": len(ms), "normal_p50_ms": round(float(np.percentile(ms, 50)), 1),
            "normal_p99_ms": round(float(np.percentile(ms, 99)), 1),
            "normal_errors": sum(s != 200 for s in statuses), "attack_requests": len(attack_statuses),
            "attack_statuses": codes, "attack_seconds": round(attack_seconds, 1),
            "server_errors_5xx": sum(500 <= s < 600 and s != 503 for s in statuses + attack_statuses),
            "busy_503": sum(s == 503 for s in statuses + attack_statuses)}


def run_phase(name: str, server, url: str, uploads, attack, attack_concurrency, args) -> dict:
    with RssSampler(server.pid) as rss:
        row = asyncio.run(phase(url, uploads, attack, attack_concurrency, args.normal_concurrency, args.minimum))
    row.update(phase=name, rss_peak_mb=round(rss.peak / 2**20, 1), loadavg_1min=os.getloadavg()[0])
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle with its index (default: build the demo-like one)")
    parser.add_argument("--flood", type=int, default=16, help="concurrent large-pixel uploads")
    parser.add_argument("--flood-rounds", type=int, default=3)
    parser.add_argument("--slow", type=int, default=4, help="concurrent preprocess=nlm uploads of 36 Mpx")
    parser.add_argument("--thumbnails", type=int, default=50, help="concurrent cold thumbnail requests")
    parser.add_argument("--normal-concurrency", type=int, default=2)
    parser.add_argument("--minimum", type=int, default=50, help="normal queries per phase at least")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cbir_serve_load"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_abuse.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or build_bundle(args.work, 3000, 64)
    uploads = query_uploads(64)
    big = big_png()
    load_before, busy = os.getloadavg(), busy_processes()
    rows = []
    server, url = start_server(bundle, 0.0, 16, args.work / "server_abuse.log")
    try:
        asyncio.run(phase(url, uploads, [], 1, 2, 10))  # warm-up
        rows.append(run_phase("baseline", server, url, uploads, [], 1, args))
        flood = [("POST", "/search", {"files": {"image": ("big.png", big)}})] * (args.flood * args.flood_rounds)
        rows.append(run_phase("pixel flood", server, url, uploads, flood, args.flood, args))
        slow = [("POST", "/search", {"files": {"image": ("big.png", big)}, "data": {"preprocess": "nlm"}})] * args.slow
        rows.append(run_phase("slow preprocessing (nlm)", server, url, uploads, slow, args.slow, args))
    finally:
        server.kill()
        server.wait()
    server, url = start_server(bundle, 0.0, 16, args.work / "server_abuse_cold.log")
    try:
        size = httpx.get(f"{url}/health").json().get("index_size", 1000)
        ids = np.random.default_rng(0).choice(size, min(args.thumbnails, size), replace=False)
        thumbs = [("GET", f"/images/{int(i)}", {}) for i in ids]
        rows.append(run_phase("cold thumbnails", server, url, uploads, thumbs, args.thumbnails, args))
    finally:
        server.kill()
        server.wait()
    result = {"benchmark": "serve_abuse", "bundle": str(bundle), "goals": {"rss_peak_mb": GOAL_RSS_MB,
              "normal_p99_s_under_slow_preprocessing": GOAL_P99_S, "server_errors_5xx": 0},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_before": load_before,
              "busy_processes_before": busy, "rows": rows}
    write_json(args.out, result)
    print("| phase | normal queries | p50 ms | p99 ms | attack statuses | 5xx | 503 | server RSS peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        statuses = ", ".join(f"{k}×{v}" for k, v in r["attack_statuses"].items()) or "–"
        print(f"| {r['phase']} | {r['normal_queries']} | {r['normal_p50_ms']} | {r['normal_p99_ms']} | {statuses} "
              f"| {r['server_errors_5xx']} | {r['busy_503']} | {r['rss_peak_mb']} |")


if __name__ == "__main__":
    main()
