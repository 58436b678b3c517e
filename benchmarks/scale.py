"""Scale benchmark: extraction over 1 vs 2 processes, and an on-disk IVF index over millions of vectors.

**Extraction** (``--parts extract``): the first ``--images`` images of ``emoji:test`` (64 px PNGs),
ImageNet MobileNetV2 + GeM head at 64 px, batch 64, channels-last, through
:func:`cbir.index.extract.extract_collection` (decoding, batching, shards on disk), interleaved over
``--repeats`` rounds. This machine has 2 cores, so the comparison is at equal CPU:

- ``1 process``: 2 torch threads, 2 DataLoader workers;
- ``2 processes``: two spawned gloo ranks (``processes=2``), 1 torch thread each, each rank decoding its
  own images (no DataLoader worker: a worker per rank measured slower, 5 busy processes on 2 cores).

The 2-process wall time includes spawning the ranks (a fresh interpreter each, importing torch, receiving
the model); ``startup`` is that fixed cost alone, timed on a 2-image collection, and "excluding start-up"
subtracts it. On N GPUs the ranks are the same code with one GPU each.

**On-disk IVF** (``--parts ondisk``): ``--vectors`` clustered, real-like ``--dim``-d vectors (the generator
of ``benchmarks/index.py``, dim lowered to keep the build tractable on 2 cores) written shard by shard
(``--shard-vectors`` rows per ``.npy``; the benchmark never holds all vectors), then
:func:`cbir.index.ondisk.build_ondisk_index` (train on a sample, add block by block, merge into
``lists.ivfdata``, tune nprobe to recall@10 ≥ 0.95) — build time, peak RSS growth of the build, file
size. A **separate search process** opens the index (lists memory-mapped read-only) and reports its
resident memory from ``/proc/self/status`` — ``RssAnon`` (memory the process owns) and ``RssFile`` (pages
of the mapped lists file currently mapped in; page cache, reclaimable) — after loading, after 10 queries
(with the bytes of the lists those queries probe), and after 1000 queries at each ``--nprobe``, with QPS
(1000-query batches, best of 2) and recall@10 against exact search computed by streaming over the shards
(FAISS ``knn_ground_truth``). The 1000 queries come from the same mixture with another seed.

    python benchmarks/scale.py --out benchmarks/results/scale_cpu.json
    python benchmarks/scale.py --parts ondisk --vectors 200000      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

K = 10


def mapped_file_rss_mb(suffix: str) -> float:
    """Resident pages of this process's mappings of files whose path ends with ``suffix`` (smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping header line
                inside = line.rstrip().endswith(suffix)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return round(total / 1024, 1)


def memory_status() -> dict:
    """RssAnon / RssFile / VmRSS of this process in MB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


# ---------------------------------------------------------------------------------------------------
# extraction, 1 vs 2 processes
# ---------------------------------------------------------------------------------------------------
def bench_extraction(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from cbir.index.collection import read_collection
    from cbir.index.extract import extract_collection
    from cbir.models.embedder import build_embedder

    torch.manual_seed(0)
    model = build_embedder("mobilenet_v2", pretrained="imagenet", image_size=64)
    collection = read_collection("emoji:test")
    collection.indices = collection.indices[:args.images]
    n = len(collection)
    tiny = read_collection("emoji:test")
    tiny.indices = tiny.indices[:2]
    common = dict(batch_size=64, channels_last=True, progress=False, resume=False, shard_size=256)

    def one_process(folder: Path, data=collection) -> None:
        torch.set_num_threads(2)
        extract_collection(model, data, folder, num_workers=2, processes=1, **common)

    def two_processes(folder: Path, data=collection) -> None:
        extract_collection(model, data, folder, num_workers=0, processes=2, **common)

    one_process(work / "warm", tiny)  # oneDNN kernels, allocator
    variants = {"1 process x 2 threads": one_process, "2 processes x 1 thread": two_processes,
                "startup (2 processes, 2 images)": lambda folder: two_processes(folder, tiny)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats):
        for number, (name, run) in enumerate(variants.items()):
            folder = work / f"extract-{round_}-{number}"
            start = time.perf_counter()
            run(folder)
            seconds[name].append(time.perf_counter() - start)
            shutil.rmtree(folder, ignore_errors=True)
    best = {name: min(values) for name, values in seconds.items()}
    startup = best["startup (2 processes, 2 images)"]
    rows = [
        {"variant": "1 process x 2 threads", "seconds": round(best["1 process x 2 threads"], 2),
         "images_per_second": round(n / best["1 process x 2 threads"], 1)},
        {"variant": "2 processes x 1 thread", "seconds": round(best["2 processes x 1 thread"], 2),
         "images_per_second": round(n / best["2 processes x 1 thread"], 1),
         "images_per_second_excluding_startup": round(n / max(best["2 processes x 1 thread"] - startup, 1e-9), 1)},
        {"variant": "startup (2 processes, 2 images)", "seconds": round(startup, 2)},
    ]
    return {"collection": "emoji:test", "images": n, "backbone": "mobilenet_v2 (ImageNet) + GeM", "image_size": 64,
            "batch_size": 64, "shard_size": 256, "rounds_seconds": seconds, "rows": rows}


# ---------------------------------------------------------------------------------------------------
# on-disk IVF over millions of vectors
# ---------------------------------------------------------------------------------------------------
def write_vector_shards(args: argparse.Namespace, folder: Path) -> list[Path]:
    """``--vectors`` rows in ``.npy`` shards, each drawn from the same mixture with its own seed."""
    from index import clustered_embeddings  # benchmarks/index.py

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for number, start in enumerate(range(0, args.vectors, args.shard_vectors)):
        count = min(args.shard_vectors, args.vectors - start)
        files.append(folder / f"shard_{number:05d}.npy")
        if not files[-1].is_file():
            np.save(files[-1], clustered_embeddings(count, dim=args.dim, seed=0, query_seed=1000 + number))
    return files


class PeakRss:
    """Peak VmRSS growth of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> PeakRss:
        self.start = memory_status()["VmRSS"]
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, memory_status()["VmRSS"])

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth_mb = round(self.peak - self.start, 1)


def bench_ondisk(args: argparse.Namespace, work: Path) -> dict:
    import faiss
    from index import clustered_embeddings

    from cbir.index.builder import IndexOptions
    from cbir.index.ondisk import VectorShards, build_ondisk_index

    faiss.omp_set_num_threads(args.threads)
    start = time.perf_counter()
    files = write_vector_shards(args, args.cache / f"vectors-{args.vectors}-{args.dim}")
    generate_seconds = time.perf_counter() - start
    shards = VectorShards.with_consecutive_ids(files, np.arange(args.vectors, dtype=np.int64))
    queries = clustered_embeddings(1000, dim=args.dim, seed=0, query_seed=12345)
    start = time.perf_counter()
    _, exact = shards.exact_search(queries, K)
    exact_seconds = time.perf_counter() - start
    print(f"[ondisk] {args.vectors} x {args.dim} in {len(files)} shards ({generate_seconds:.0f} s); exact "
          f"ground truth by streaming {exact_seconds:.1f} s", file=sys.stderr, flush=True)

    folder = work / "ondisk-index"
    options = IndexOptions(kind="ondisk", target_recall=0.95, k=K, query_sample=1000,
                           ondisk_block_vectors=args.block_vectors)
    start = time.perf_counter()
    with PeakRss() as peak:
        index, info = build_ondisk_index(shards, folder, options, progress=False)
    total = time.perf_counter() - start
    faiss.write_index(index, str(folder / "index.faiss"))
    del index
    np.save(work / "queries.npy", queries)
    np.save(work / "exact.npy", exact)
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--search-child", str(folder), "--threads", str(args.threads),
                            "--nprobe", *map(str, sorted({*args.nprobe, info["search_params"]["nprobe"]}))],
                           capture_output=True, text=True, cwd=work)
    if child.returncode:
        raise RuntimeError(f"search process failed: {child.stderr[-2000:]}")
    search = json.loads(child.stdout.strip().splitlines()[-1])
    vectors_mb = args.vectors * args.dim * 4 / 2**20
    return {
        "vectors": args.vectors, "dim": args.dim, "shards": len(files), "shard_vectors": args.shard_vectors,
        "vectors_mb": round(vectors_mb, 1), "generate_seconds": round(generate_seconds, 1),
        "exact_ground_truth_seconds": round(exact_seconds, 1),
        "factory": info["factory"], "nlist": info["nlist"], "train_size": info["train_size"],
        "blocks": info["blocks"], "block_vectors": args.block_vectors,
        "train_seconds": info["train_seconds"], "add_seconds": info["add_seconds"],
        "merge_seconds": info["merge_seconds"], "tune_seconds": info["tune_seconds"],
        "build_seconds_total": round(total, 1), "build_peak_rss_growth_mb": peak.growth_mb,
        "tuned": {"search_params": info["search_params"], "recall_at_10_on_collection_sample": info["recall_at_10"]},
        "lists_file_mb": round(info["lists_bytes"] / 2**20, 1),
        "index_file_mb": round((folder / "index.faiss").stat().st_size / 2**20, 2),
        "search_process": search,
    }


def search_child(folder: Path, nprobes: list[int], threads: int) -> None:
    """Run in a fresh process: open the on-disk index and report memory, QPS and recall as one JSON line."""
    import faiss

    from cbir.index.builder import recall_at_k
    from cbir.index.ondisk import ondisk_lists, read_ondisk_index

    faiss.omp_set_num_threads(threads)
    queries, exact = np.load(folder.parent / "queries.npy"), np.load(folder.parent / "exact.npy")
    def status() -> dict:
        return {**memory_status(), "lists_file_resident": mapped_file_rss_mb("lists.ivfdata")}

    report = {"after_imports": status()}
    index = read_ondisk_index(folder / "index.faiss")
    report["after_load"] = status()
    ivf, lists = faiss.extract_index_ivf(index), ondisk_lists(index)
    ivf.nprobe = nprobes[0]
    _, probed = ivf.quantizer.search(queries[:10], nprobes[0])
    probed_bytes = sum(lists.list_size(int(i)) * (lists.code_size + 8) for i in np.unique(probed))
    index.search(queries[:10], K)
    report["after_10_queries"] = {**status(), "nprobe": nprobes[0],
                                  "probed_lists_mb": round(probed_bytes / 2**20, 2)}
    rows = []
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            _, found = index.search(queries, K)
            runs.append(len(queries) / (time.perf_counter() - start))
        rows.append({"nprobe": nprobe, "qps": round(max(runs), 1), "qps_first_pass": round(runs[0], 1),
                     "recall_at_10": round(recall_at_k(found, exact, K), 4), "memory": status()})
    report["nprobe"] = rows
    print(json.dumps(report))


def tables(result: dict) -> str:
    lines = []
    if "extraction" in result:
        e = result["extraction"]
        lines += [f"\nExtraction, {e['images']} images of {e['collection']}, {e['backbone']} at {e['image_size']} px, "
                  f"batch {e['batch_size']}, best of {len(next(iter(e['rounds_seconds'].values())))} rounds:",
                  "| variant | seconds | img/s | img/s excluding start-up |", "|---|---|---|---|"]
        for row in e["rows"]:
            lines.append(f"| {row['variant']} | {row['seconds']} | {row.get('images_per_second', '')} "
                         f"| {row.get('images_per_second_excluding_startup', '')} |")
    if "ondisk" in result:
        o = result["ondisk"]
        s = o["search_process"]
        lines += [f"\nOn-disk IVF `{o['factory']}` over {o['vectors']:,} x {o['dim']}-d vectors "
                  f"({o['vectors_mb']:.0f} MB as float32) in {o['shards']} shards:",
                  "| build: train / add / merge / tune s | build peak RSS +MB | lists file MB | index.faiss MB |",
                  "|---|---|---|---|",
                  f"| {o['train_seconds']} / {o['add_seconds']} / {o['merge_seconds']} / {o['tune_seconds']} "
                  f"| {o['build_peak_rss_growth_mb']} | {o['lists_file_mb']} | {o['index_file_mb']} |",
                  "\nSearch process (separate), resident memory in MB (RssAnon = its own memory, RssFile = mapped "
                  "pages of the lists file):",
                  "| moment | RssAnon | RssFile | of which lists.ivfdata | VmRSS | growth since imports (anon / file) |",
                  "|---|---|---|---|---|---|"]
        base = s["after_imports"]

        def line(label: str, m: dict) -> str:
            return (f"| {label} | {m['RssAnon']} | {m['RssFile']} | {m['lists_file_resident']} | {m['VmRSS']} "
                    f"| +{m['RssAnon'] - base['RssAnon']:.1f} / +{m['RssFile'] - base['RssFile']:.1f} |")

        for key in ("after_imports", "after_load", "after_10_queries"):
            m = s[key]
            extra = f" (nprobe {m['nprobe']}, probed lists {m['probed_lists_mb']} MB)" if key == "after_10_queries" else ""
            lines.append(line(f"{key.replace('_', ' ')}{extra}", m))
        for row in s["nprobe"]:
            lines.append(line(f"after 1000 queries at nprobe {row['nprobe']}", row["memory"]))
        lines += ["\n| nprobe | QPS (1000-query batch) | first pass QPS | recall@10 vs exact |", "|---|---|---|---|"]
        for row in s["nprobe"]:
            lines.append(f"| {row['nprobe']} | {row['qps']:.0f} | {row['qps_first_pass']:.0f} | {row['recall_at_10']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["extract", "ondisk"], choices=["extract", "ondisk"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vectors", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shard-vectors", type=int, default=250_000)
    parser.add_argument("--block-vectors", type=int, default=262_144)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-scale-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale_cpu.json")
    parser.add_argument("--search-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.search_child:
        search_child(args.search_child, args.nprobe, args.threads)
        return

    from cbir.evaluation.report import write_json

    args.cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cbir-scale-", dir=args.cache))
    result = {"benchmark": "scale", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_at_start": list(os.getloadavg())}
    if args.out.is_file():  # a part not rerun keeps its earlier result, marked as such
        earlier = json.loads(args.out.read_text())
        for part, key in (("extract", "extraction"), ("ondisk", "ondisk")):
            if part not in args.parts and key in earlier:
                result[key] = {**earlier[key], "from_earlier_run": {
                    "started": earlier.get("started"), "load_average_at_start": earlier.get("load_average_at_start"),
                    "load_average_at_end": earlier.get("load_average_at_end")}}
    try:
        if "extract" in args.parts:
            result["extraction"] = bench_extraction(args, work)
            result["load_average_after_extraction"] = list(os.getloadavg())
            write_json(args.out, result)
        if "ondisk" in args.parts:
            import faiss

            result["faiss"] = faiss.__version__
            result["ondisk"] = bench_ondisk(args, work)
        result["load_average_at_end"] = list(os.getloadavg())
        result["peak_rss_mb_of_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        write_json(args.out, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(tables(result))


if __name__ == "__main__":
    main()
