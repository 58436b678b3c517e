"""Heads benchmark: GeM vs multi-stage fusion vs DOLG-style orthogonal fusion on the emoji zero-shot split.

Same backbone (ImageNet MobileNetV2), loss (triplet, semi-hard miner), data (emoji at 64 px, batch 128,
M=4), epochs and seeds for every head; each run goes through the same ``train()`` as ``train.py`` and
is evaluated all-vs-all on the unseen test classes. The untrained row is each run's model before
training (ImageNet trunk + the head's random initialisation). Prints mean ± standard deviation over
seeds as a Markdown table and writes every run to JSON.

    python benchmarks/heads.py --epochs 4 --seeds 0 1 2 --out benchmarks/results/heads_emoji.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from cbir.commands.train import train
from cbir.configs import config_dir
from cbir.evaluation.report import write_json

METRICS = ("map_at_r", "precision_at_1", "recall_at_8")


def run_one(head: str, seed: int, epochs: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            "data=emoji", "model=mobilenet_v2", "loss=triplet", f"head={head}", f"seed={seed}",
            "train.tune=full",  # every stage trains, as when the README's table was measured
            f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={epochs}",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv",
            "evaluate_untrained=true", f"paths.output_dir={out}", *extra,
        ]
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        started = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - started
        results = json.loads((Path(out) / "results.json").read_text())["results"]
        untrained, trained = (next(v for k, v in results.items() if k.startswith(p)) for p in ("untrained", "trained"))
        with open(Path(out) / "csv" / "metrics.csv", newline="") as f:
            speeds = [float(row["train/images_per_second"]) for row in csv.DictReader(f)
                      if row.get("train/images_per_second")]
    return {"head": head, "seed": seed, "epochs": epochs, "wall_seconds": wall, "untrained": untrained,
            "trained": trained, "train_images_per_second": statistics.mean(speeds) if speeds else None}


def summarise(runs: list[dict]) -> str:
    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):5.2f} ± {100 * spread:4.2f}"

    lines = ["| head | MAP@R | P@1 (= R@1) | R@8 | train img/s |", "|---|---|---|---|---|"]
    untrained = [r["untrained"] for r in runs if r["head"] == "gem"] or [r["untrained"] for r in runs]
    lines.append("| untrained (ImageNet MobileNetV2 + random GeM head) | "
                 + " | ".join(cell([u[m] for u in untrained]) for m in METRICS) + " | – |")
    for head in dict.fromkeys(r["head"] for r in runs):
        rows = [r for r in runs if r["head"] == head]
        speed = statistics.mean(r["train_images_per_second"] for r in rows if r["train_images_per_second"])
        lines.append(f"| {head} | " + " | ".join(cell([r["trained"][m] for r in rows]) for m in METRICS)
                     + f" | {speed:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=["gem", "fusion", "dolg"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/heads_emoji.json"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)

    runs = []
    for seed in args.seeds:
        for head in args.heads:
            run = run_one(head, seed, args.epochs, args.overrides)
            runs.append(run)
            print(f"head={head} seed={seed}: MAP@R {100 * run['trained']['map_at_r']:.2f} "
                  f"(untrained {100 * run['untrained']['map_at_r']:.2f}), {run['wall_seconds']:.0f}s", flush=True)
            write_json(args.out, {"runs": runs, "args": {k: str(v) for k, v in vars(args).items()}})
    table = summarise(runs)
    print("\nEmoji zero-shot (test classes, all-vs-all), " f"{args.epochs} epochs, seeds {args.seeds}:\n{table}")
    write_json(args.out, {"runs": runs, "table": table, "args": {k: str(v) for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
