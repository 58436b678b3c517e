"""Re-ranking benchmark (issue 17): what each query-time option adds to retrieval and what it costs per query.

For a trained checkpoint (or a run folder) on a dataset's test protocol (default: emoji all-vs-all, zero-shot
classes):

1. **Quality** — ``eval.py`` with ``rerank.methods=[aqe,dba,dba+aqe,kreciprocal,ceiling]`` for each ``--n`` (plus
   ``pairwise`` with ``--reranker``, a ``train.py stage=reranker`` run of the same checkpoint): P@1 and MAP@R of
   every option on the same embeddings (one forward pass), next to plain k-NN, and the ``ceiling``: the first
   hits (as many as the re-ranker re-orders, 20 without one) put in the right order by their labels — what any
   re-ranker of them could reach.
2. **Latency** — the checkpoint exported as a bundle, a flat index of the test images (``emoji:test``), and
   ``Searcher.search_paths`` timed on ``--queries`` single-image queries per option (embedding, search and
   re-ranking together: what a user waits for), in interleaved rounds; median ms per query and the ratio to
   plain search. DBA changes the stored vectors at build time and costs nothing per query.

    python benchmarks/rerank.py --ckpt outputs/benchmarks/generalisation/dinov2_vits14/train-full+lld-8 \\
        --out benchmarks/results/rerank_emoji.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["aqe", "dba", "dba+aqe", "kreciprocal", "ceiling"]  # ceiling: the first hits in the right order (a bound)
SEARCH_METHODS = ["none", "aqe", "kreciprocal"]


def quality(ckpt: str, data: list[str], n: int, out: Path, precision: str | None,
            reranker: str | None = None) -> dict[str, dict]:
    """eval.py's rows for every method at neighbourhood size ``n`` (and the learned ``reranker``'s, when given):
    {row name: metrics}."""
    methods = [*METHODS, *(["pairwise", "dba+pairwise"] if reranker else [])]
    command = [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={ckpt}", *data,
               f"rerank.methods=[{','.join(methods)}]", f"rerank.n={n}", f"hydra.run.dir={out}",
               *([f"rerank.model={reranker}"] if reranker else []),
               "trainer.enable_progress_bar=false", *([f"trainer.precision={precision}"] if precision else [])]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"eval.py failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "eval.json").read_text())["results"]


def latency(ckpt: str, collection: str, queries: int, n: int, rounds: int, work: Path,
            reranker: str | None = None) -> dict[str, float]:
    """Median ms per single-image query for each Searcher re-ranking option over the rounds after the first
    (``pairwise`` with a ``reranker``: its candidates' tokens are cached after their first use, so those rounds
    time the steady state of a service; ``pairwise (cold)`` is the first round, every candidate new)."""
    from cbir.export.bundle import export_bundle, load_bundle
    from cbir.index.pipeline import build_bundle_index
    from cbir.index.store import load_index
    from cbir.models.checkpoint import load_checkpoint_model
    from cbir.search import Searcher, parse_array_source

    embedder, model_config = load_checkpoint_model(ckpt)
    bundle_dir = work / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        export_bundle(embedder, bundle_dir, model_config=model_config, runtimes=[], reranker=reranker)
        build_bundle_index(load_bundle(bundle_dir), collection, bundle_dir / "index", kind="flat", progress=False)
    bundle, index = load_bundle(bundle_dir), load_index(bundle_dir / "index")
    paths = sorted(index.paths())[::max(1, len(index) // queries)][:queries]
    methods = [*SEARCH_METHODS, *(["pairwise"] if reranker else [])]
    searchers = {m: Searcher(bundle, index, rerank=m, rerank_n=n, precision="fp32") for m in methods}
    times: dict[str, list[list[float]]] = {m: [] for m in methods}

    def query(searcher: Searcher, source: str) -> None:
        """One single-image query as a user sends it: a file read from disk, or a dataset row (Fashion-MNIST)."""
        if parse_array_source(source) is None:
            searcher.search_paths([source], k=10)
        else:
            searcher.search_images([searcher.load_source(source)], k=10, exclude=[source])

    for method in methods:  # warm-up
        for path in paths[:2]:
            query(searchers[method], path)
    for _ in range(rounds):  # interleaved: each round times every option on the same queries
        for method in methods:
            times[method].append([])
            for path in paths:
                start = time.perf_counter()
                query(searchers[method], path)
                times[method][-1].append(1000 * (time.perf_counter() - start))
    # the first round meets every pairwise candidate for the first time (read + embed); later rounds are the
    # steady state of a service whose candidates recur
    medians = {m: statistics.median([t for r in v[1:] or v for t in r]) for m, v in times.items()}
    if "pairwise" in times:
        medians["pairwise (cold)"] = statistics.median(times["pairwise"][0])
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a training checkpoint or run folder")
    parser.add_argument("--data", nargs="*", default=["data=emoji"], help="eval.py data overrides")
    parser.add_argument("--collection", default="emoji:test", help="what the latency index holds")
    parser.add_argument("--n", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default=None, help="trainer.precision for eval.py, e.g. bf16-mixed")
    parser.add_argument("--reranker", default=None, help="a pairwise re-ranker of --ckpt (train.py stage=reranker run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rerank_emoji.json")
    args = parser.parse_args()
    from cbir.evaluation.report import write_json

    work = Path(tempfile.mkdtemp(prefix="cbir-rerank-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # eval runs and a bundle: ~100 MB
    rows: dict[str, dict] = {}
    for n in args.n:
        for name, metrics in quality(args.ckpt, args.data, n, work / f"eval-{n}", args.precision,
                                     args.reranker).items():
            rows.setdefault(name, {k: metrics[k] for k in ("precision_at_1", "map_at_r")})
    ms = latency(args.ckpt, args.collection, args.queries, args.n[0], args.rounds, work, args.reranker)
    print("| option | P@1 | MAP@R |\n|---|---|---|")
    for name, metrics in rows.items():
        print(f"| {name.split(' + ')[-1] if ' + ' in name else 'plain k-NN'} | {100 * metrics['precision_at_1']:.2f} "
              f"| {100 * metrics['map_at_r']:.2f} |")
    print(f"\n| Searcher option (n={args.n[0]}) | ms / query | × plain |\n|---|---|---|")
    for method, value in ms.items():
        print(f"| {method} | {value:.1f} | {value / ms['none']:.2f} |")
    write_json(args.out, {"benchmark": "rerank", "ckpt": str(args.ckpt), "reranker": args.reranker,
                          "data": args.data, "rows": rows,
                          "latency_ms": ms, "latency_n": args.n[0], "queries": args.queries, "rounds": args.rounds,
                          "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
