"""Memory and speed of the id store (id → path, label): the SQLite store against the JSON-lines store read into
a dict that it replaced. Each variant runs in a fresh process: load N rows, then look up 10,000 searches'
worth of hits (10 ids each); reports the process's RssAnon growth (its own memory, not file pages), the load
time and the lookup time per search.

    python benchmarks/idstore_memory.py --rows 1000000 --out benchmarks/results/idstore_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from cbir.evaluation.report import write_json

ROOT = Path(__file__).resolve().parents[1]

MEASURE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    def anon():
        return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024
    kind, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(0)
    queries = [rng.integers(0, n, 10).tolist() for _ in range(10_000)]
    before = anon()
    start = time.perf_counter()
    if kind == "sqlite":
        from cbir.index.idstore import IdStore
        store = IdStore.load(path)
        lookup = store.lookup
    else:  # the store before: every row in a dict
        rows = {}
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                rows[int(row["id"])] = row
        lookup = lambda ids: [rows.get(i) for i in ids]
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    for ids in queries:
        assert lookup(ids)[0]["id"] == ids[0]
    per_search = (time.perf_counter() - start) / len(queries)
    print(json.dumps({"store": kind, "rss_anon_growth_mb": round((anon() - before) / 2**20, 1),
                      "load_s": round(loaded, 3), "lookup_us_per_search": round(per_search * 1e6, 1)}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "idstore_memory.json")
    args = parser.parse_args()
    from cbir.index.idstore import IdStore

    paths = [f"/data/photos/2024/{i // 1000:04d}/IMG_{i:08d}.jpg" for i in range(args.rows)]
    labels = [f"class_{i % 1000}" for i in range(args.rows)]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        store = IdStore()
        store.add(paths, labels)
        store.save(work / "ids.sqlite")
        with open(work / "ids.jsonl", "w") as f:
            for i, (path, label) in enumerate(zip(paths, labels)):
                f.write(json.dumps({"id": i, "path": path, "label": label, "meta": {}}) + "\n")
        sizes = {"sqlite": (work / "ids.sqlite").stat().st_size, "jsonl": (work / "ids.jsonl").stat().st_size}
        for kind in ("jsonl", "sqlite"):
            done = subprocess.run([sys.executable, "-c", MEASURE, kind, str(work / f"ids.{kind}"), str(args.rows)],
                                  capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["file_mb"] = round(sizes[kind] / 2**20, 1)
            rows.append(row)
            print(row, flush=True)
    write_json(args.out, {"benchmark": "idstore_memory", "rows": args.rows, "results": rows})
    print(f"| store ({args.rows:,} rows) | file MB | load s | RssAnon growth MB | lookup µs / search (10 ids) |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = "JSON lines → dict (before)" if r["store"] == "jsonl" else "SQLite, read-only (now)"
        print(f"| {name} | {r['file_mb']} | {r['load_s']} | {r['rss_anon_growth_mb']} | {r['lookup_us_per_search']} |")


if __name__ == "__main__":
    main()
