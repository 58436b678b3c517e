"""Load benchmark of the search service: a real uvicorn server (``python -m cbir.serve``) on loopback,
hit by an httpx AsyncClient at several concurrencies, with micro-batching off and on.

The bundle is demo-like: ImageNet MobileNetV2 (untrained head) at 64 px over ``--collection`` Fashion-MNIST
test images written as PNGs (built once under ``--work`` and reused). Queries are other Fashion-MNIST
images (train split) as PNG uploads, k=10. Each setting's server is started and warmed up, then
``--requests`` requests are sent at each concurrency. All settings' servers run at once and are loaded
in interleaved rounds, so the shared machine's changing load falls on each setting alike. Prints a
Markdown table (throughput, p50/p99 latency, errors, mean micro-batch size) and writes JSON. Loopback
only; bounded.

    python benchmarks/serve_load.py --requests 300 --concurrency 1 8 32 --settings off 0 5 \\
        --out benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from cbir.evaluation.report import write_json

ROOT = Path(__file__).resolve().parents[1]


def build_bundle(work: Path, collection_size: int, image_size: int) -> Path:
    """A bundle + flat index over ``collection_size`` Fashion-MNIST test images (reused when present)."""
    bundle_dir = work / f"bundle_{image_size}px_{collection_size}"
    if (bundle_dir / "index" / "index.json").is_file():
        return bundle_dir
    from hydra import compose, initialize_config_dir

    from cbir.configs import config_dir
    from cbir.data.readers.fashion_mnist import read_fashion_mnist
    from cbir.export.bundle import export_bundle, load_bundle
    from cbir.index import build_bundle_index
    from cbir.training.factory import build_embedder_from_config, model_config

    catalog = read_fashion_mnist(download=False)
    collection = work / f"collection_{collection_size}"
    if not (collection / ".complete").is_file():
        labels = {r.source.index: r.label for r in catalog.records if r.source.array == "test"}
        for i in range(collection_size):
            label = catalog.class_names[labels[i]]
            path = collection / label.replace("/", "_") / f"test_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(catalog.arrays["test"][i]).save(path)
        (collection / ".complete").touch()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=mobilenet_v2", f"data.image_size={image_size}"])
    if bundle_dir.exists():
        import shutil

        shutil.rmtree(bundle_dir)
    export_bundle(build_embedder_from_config(cfg), bundle_dir, model_config=model_config(cfg), runtimes=[])
    build_bundle_index(load_bundle(bundle_dir), collection, bundle_dir / "index", kind="flat", num_workers=0)
    return bundle_dir


def query_uploads(count: int) -> list[bytes]:
    from cbir.data.readers.fashion_mnist import read_fashion_mnist

    train = read_fashion_mnist(download=False).arrays["train"]
    uploads = []
    for i in range(count):
        out = io.BytesIO()
        Image.fromarray(train[i * 97 % len(train)]).save(out, "PNG")
        uploads.append(out.getvalue())
    return uploads


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(bundle: Path, window_ms: float, max_batch: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, "-m", "cbir.serve", f"bundle={bundle}", f"port={port}",
                                f"batch_window_ms={window_ms}", f"max_batch={max_batch}", "log_level=warning"],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not start in 300 s")


async def load(url: str, uploads: list[bytes], requests: int, concurrency: int, k: int) -> dict:
    """Send ``requests`` searches over ``concurrency`` connections; raw latencies, wall time, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for n in counter:
            started = time.perf_counter()
            try:
                response = await client.post("/search", files={"image": ("q.png", uploads[n % len(uploads)])},
                                             data={"k": str(k)})
                if response.status_code != 200 or len(response.json()["results"]) != k:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(f"{exc.__class__.__name__}: {exc}")
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - started
    return {"latencies": latencies, "seconds": wall, "errors": errors}


def summarise_cell(parts: list[dict], concurrency: int) -> dict:
    ms = np.array([x for p in parts for x in p["latencies"]]) * 1000
    seconds = sum(p["seconds"] for p in parts)
    errors = [e for p in parts for e in p["errors"]]
    return {"requests": len(ms), "concurrency": concurrency, "seconds": seconds,
            "requests_per_second": len(ms) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "errors": len(errors),
            "error_examples": errors[:3]}


def busy_processes() -> list[str]:
    """The other CPU consumers at the time (the machine is shared)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:9]
    except (OSError, subprocess.SubprocessError):
        return []
    return [" ".join(line.split()[:2] + [" ".join(line.split()[2:])[:100]]) for line in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="requests per (setting, concurrency)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--settings", nargs="+", default=["off", "0", "5"],
                        help="micro-batching settings to compare: off, or a window in ms (0 = batch what queued)")
    parser.add_argument("--max-batch", type=int, default=16, help="largest micro-batch when batching is on")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--collection", type=int, default=3000, help="Fashion-MNIST test images indexed")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cbir_serve_load"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bundle = build_bundle(args.work, args.collection, args.image_size)
    uploads = query_uploads(64)
    rows = []
    load_before = os.getloadavg()
    busy = busy_processes()
    servers = {}
    try:
        for setting in args.settings:  # every setting's server runs at once: measured side by side
            window, max_batch = (0.0, 1) if setting == "off" else (float(setting), args.max_batch)
            process, url = start_server(bundle, window, max_batch, args.work / f"server_{setting}.log")
            servers[setting] = (process, url, window, max_batch)
            asyncio.run(load(url, uploads, 20, 4, args.k))  # warm-up
        for concurrency in args.concurrency:
            parts = {setting: [] for setting in servers}
            before = {s: httpx.get(f"{u}/health").json()["micro_batching"] for s, (_, u, _, _) in servers.items()}
            for _ in range(args.rounds):  # interleaved rounds: the shared machine's load hits every setting
                for setting, (_, url, _, _) in servers.items():
                    parts[setting].append(asyncio.run(load(url, uploads, args.requests // args.rounds,
                                                           concurrency, args.k)))
            for setting, (_, url, window, max_batch) in servers.items():
                after = httpx.get(f"{url}/health").json()["micro_batching"]
                batches = after["batches"] - before[setting]["batches"]
                row = summarise_cell(parts[setting], concurrency)
                row.update(batching=setting != "off", window_ms=window, max_batch=max_batch,
                           loadavg_1min=os.getloadavg()[0],
                           mean_batch=(after["queries"] - before[setting]["queries"]) / batches if batches else 1.0)
                rows.append(row)
                print(f"batching {setting}, concurrency {concurrency}: {row['requests_per_second']:.1f} req/s, "
                      f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, errors {row['errors']}", flush=True)
    finally:
        for process, *_ in servers.values():
            process.terminate()
            process.wait(timeout=30)

    lines = ["| micro-batching | concurrency | requests | req/s | p50 ms | p99 ms | errors | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        setting = f"on (window {r['window_ms']:g} ms, ≤{r['max_batch']})" if r["batching"] else "off"
        lines.append(f"| {setting} | {r['concurrency']} | {r['requests']} | {r['requests_per_second']:.1f} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['mean_batch']:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    result = {
        "bundle": f"ImageNet MobileNetV2 (untrained GeM head) at {args.image_size} px, flat index of "
                  f"{args.collection} Fashion-MNIST test images", "k": args.k, "rows": rows, "table": table,
        "total_requests": sum(r["requests"] for r in rows), "total_errors": sum(r["errors"] for r in rows),
        "wall_seconds": time.perf_counter() - started, "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "busiest_processes_at_start": busy},
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
    }
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
    if result["total_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
