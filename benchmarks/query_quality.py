"""Query-time quality (issue 17), one dataset per run: robustness to damaged queries and what each re-ranking
option adds.

1. **Robustness** — :mod:`degraded_queries` (``--data``'s test protocol — emoji: all-vs-all in the test split,
   Fashion-MNIST: test vs the train gallery, icons: all-vs-all in the unseen names —, seeded query sample, each
   query degraded and searched against the clean gallery) for two checkpoints of one recipe: ``--default`` (default
   augmentation) and ``--robust`` (``augment=robust``), each with ``preprocess=none`` and ``auto``: R@1 per
   degradation for {none, auto clean-up, robust training, both}, and the better robust cell as a share of the
   robust model's clean R@1 (the issue's goal: >= 90 % on every row).
2. **Re-ranking** — :mod:`rerank` for ``--rerank-model`` (default: ``--default``): P@1 / MAP@R of plain k-NN
   and every option on the same embeddings (``pairwise`` with ``--reranker``, a ``train.py stage=reranker`` run
   of that checkpoint), the ceiling of re-ordering the first hits, and the Searcher's median ms per single-image
   query for each query-time option.

    python benchmarks/query_quality.py --default outputs/rr/emb --robust outputs/rr/emb-robust \\
        --reranker outputs/rr/reranker --queries 400
    python benchmarks/query_quality.py --split val ...   # the robustness table on validation, to choose a recipe
    python benchmarks/query_quality.py --skip-rerank --out results/query_quality_emoji_dinov2.json ...  # table 1 only
    python benchmarks/query_quality.py --data fashion_mnist --default <demo run> --robust <demo run, augment=robust>
    python benchmarks/query_quality.py --data icons --skip-rerank ...   # emoji models, zero-shot on icon themes

Writes ``benchmarks/results/query_quality_<data>.json`` (the robustness part's own JSON file beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import degraded_queries  # noqa: E402 - a sibling benchmark script
import rerank  # noqa: E402

RESULTS = HERE / "results"


def robustness_table(payload: dict) -> tuple[str, dict]:
    """The {none, auto, robust, both} R@1 table from a degraded_queries JSON with models ``default`` and
    ``robust``; also the rows as data."""
    results = payload["results"]
    names = [d["name"] for d in payload["degradations"]]

    def r1(model: str, degradation: str, option: str) -> float:
        return 100 * results[f"{model}|{degradation}|{option}"]["metrics"]["recall_at_1"]

    clean = r1("robust", "clean", "none")
    lines = ["| query | none | auto clean-up | robust training | both | robust, best / clean |",
             "|---|---|---|---|---|---|"]
    rows = {}
    for name in names:
        cells = [r1("default", name, "none"), r1("default", name, "auto"), r1("robust", name, "none"),
                 r1("robust", name, "auto")]
        share = 100 * max(cells[2:]) / clean if clean else float("nan")
        rows[name] = {"none": cells[0], "auto": cells[1], "robust": cells[2], "both": cells[3], "share": share}
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {share:.0f} % |")
    return "\n".join(lines), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="emoji", help="a data config (conf/data), e.g. fashion_mnist, icons")
    parser.add_argument("--default", required=True, type=Path, help="checkpoint or run, default augmentation")
    parser.add_argument("--robust", required=True, type=Path, help="the same recipe trained with augment=robust")
    parser.add_argument("--rerank-model", type=Path, default=None,
                        help="the model whose re-ranking options are measured (default: --default)")
    parser.add_argument("--reranker", default=None,
                        help="pairwise re-ranker of the re-ranking model (train.py stage=reranker)")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument("--latency-collection", default=None,
                        help="what the latency index holds (default: <data>:test; Fashion-MNIST: fashion_mnist:train)")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (the first is the cold one)")
    parser.add_argument("--n", type=int, default=5, help="neighbours for aqe / dba / k-reciprocal")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: the robustness table on the held-out training classes only (choosing a recipe)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/query_quality_<data>[_val].json")
    parser.add_argument("--skip-robustness", action="store_true", help="reuse the robustness part's JSON")
    parser.add_argument("--skip-rerank", action="store_true",
                        help="the robustness table only (e.g. a pair of models without a trained re-ranker)")
    args = parser.parse_args()
    from cbir.evaluation.report import write_json
    from cbir.models.checkpoint import resolve_checkpoint

    default, robust = resolve_checkpoint(args.default), resolve_checkpoint(args.robust)
    if args.out is None:
        args.out = RESULTS / f"query_quality_{args.data}{'_val' if args.split == 'val' else ''}.json"
    degraded_json = args.out.with_name(args.out.stem + "_degraded.json")
    if not (args.skip_robustness and degraded_json.is_file()):
        degraded_queries.main(["--data", args.data, "--queries", str(args.queries), "--options", "none", "auto",
                               "--no-untrained", "--split", args.split, "--ckpt", str(default), "--ckpt", str(robust),
                               "--out", str(degraded_json)])
    payload = json.loads(degraded_json.read_text())
    names = {f"trained {default}": "default", f"trained {robust}": "robust"}  # degraded_queries' model names
    for key in list(payload["results"]):
        model, degradation, option = key.rsplit("|", 2)
        if model in names:
            payload["results"][f"{names[model]}|{degradation}|{option}"] = payload["results"][key]
    robust_text, robust_rows = robustness_table(payload)
    heading = (f"{args.data}, {payload['num_queries']} degraded queries vs the {payload['num_gallery']} clean "
               f"images of its {args.split} protocol — R@1 %")
    if args.split == "val" or args.skip_rerank:  # on val, re-ranking options are chosen with eval.py protocol=val
        write_json(args.out, {"benchmark": "query_quality", "dataset": args.data, "split": args.split,
                              "default": str(default), "robust": str(robust), "queries": payload["num_queries"],
                              "robustness": robust_rows, "command": " ".join(sys.argv)})
        print(f"\n{heading}:\n\n{robust_text}")
        return

    reranked = resolve_checkpoint(args.rerank_model) if args.rerank_model else default
    with tempfile.TemporaryDirectory(prefix="cbir-query-quality-") as tmp:  # eval runs and a bundle: ~100 MB
        work = Path(tmp)
        measured = rerank.quality(str(reranked), [f"data={args.data}"], args.n, work / "eval", None, args.reranker)
        rows = {name: {k: metrics[k] for k in ("precision_at_1", "map_at_r")} for name, metrics in measured.items()}
        ms = rerank.latency(str(reranked), args.latency_collection or f"{args.data}:test", args.latency_queries,
                            args.n, args.rounds, work, args.reranker)
    plain = next(v for k, v in rows.items() if " + " not in k)
    lines = ["| option | P@1 | MAP@R | ΔMAP@R | Searcher ms / query | × plain |", "|---|---|---|---|---|---|"]
    for name, metrics in rows.items():
        option = name.split(" + ")[-1] if " + " in name else "plain k-NN"
        method = option.split(" ")[0] if option != "plain k-NN" else "none"
        method = {"dba+pairwise": "pairwise", "dba+aqe": "aqe"}.get(method, method)  # DBA itself: build time
        latency = f"{ms[method]:.1f} | {ms[method] / ms['none']:.2f}" if method in ms else "– (build time) | –"
        if method == "ceiling":
            latency = "– (reads the labels: an upper bound, not an option) | –"
        if method == "pairwise" and "pairwise (cold)" in ms:
            latency += f" (cold: {ms['pairwise (cold)']:.1f} ms, {ms['pairwise (cold)'] / ms['none']:.2f}×)"
        lines.append(f"| {option} | {100 * metrics['precision_at_1']:.2f} | {100 * metrics['map_at_r']:.2f} | "
                     f"{100 * (metrics['map_at_r'] - plain['map_at_r']):+.2f} | {latency} |")
    rerank_text = "\n".join(lines)
    write_json(args.out, {"benchmark": "query_quality", "dataset": args.data, "split": args.split,
                          "default": str(default), "robust": str(robust), "rerank_model": str(reranked),
                          "reranker": args.reranker, "queries": payload["num_queries"],
                          "robustness": robust_rows, "rerank": rows, "latency_ms": ms,
                          "command": " ".join(sys.argv)})
    print(f"\n{heading}:\n\n{robust_text}\n\n"
          f"{args.data} (test protocol), re-ranking of {reranked}:\n\n{rerank_text}")


if __name__ == "__main__":
    main()
