"""Losses benchmark: metric-learning losses on an equal budget vs the two built-in baselines.

Emoji zero-shot (train on the first half of the classes, test all-vs-all on the unseen second half):
ImageNet MobileNetV2 + a head (``--heads``, default ``fusion``, the heads benchmark's best), the same
epochs, batch (128), image size (64 px), M (4) and seed for every loss; each loss keeps its own miner
and defaults from ``conf/loss/``. Every run is ``python train.py`` / ``python eval.py`` in a subprocess,
exactly what users run: the trained row is the final weights (validation only after the last epoch, so
no checkpoint is picked on the test classes), plus the cross-vendor P@1 (base emoji, one vendor's
drawings query the other's) of the same checkpoint. Baselines: ImageNet MobileNetV2 untrained (random
GeM head, ``eval.py`` without a checkpoint) and the hand-crafted descriptor (``model=handcrafted``).

Fashion-MNIST (``--fmnist LOSS:HEAD``): that recipe for one epoch at 32 px (as ``experiment=demo``),
test queries vs train gallery, vs both baselines.

Results are written after every run (``--out``); a rerun skips the runs already there (``--fresh`` to
redo), so an interrupted benchmark resumes.

    python benchmarks/losses.py --epochs 6
    python benchmarks/losses.py --epochs 1 --losses triplet --heads gem --no-baselines   # smoke run
    python benchmarks/losses.py --epochs 6 --heads fusion gem --fmnist triplet:fusion
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cbir.configs import config_dir
from cbir.evaluation.report import write_json

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ["contrastive", "triplet", "multi_similarity", "proxy_anchor", "arcface"]
CROSS_VENDOR = ["protocol=cross_vendor", "data.reader.skin_tones=false"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def python(script: str, overrides: list[str], out: Path) -> float:
    """Run ``script`` with Hydra overrides into ``out``; its wall time. Failures raise with stderr's tail."""
    command = [sys.executable, str(ROOT / script), *overrides, f"hydra.run.dir={out}"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def evaluate(overrides: list[str], out: Path) -> dict:
    """``eval.py``'s metrics: the one row of its ``eval.json`` (``{"protocol", "results": {model: metrics}}``)."""
    python("eval.py", [*overrides, *QUIET], out)
    return next(iter(json.loads((out / "eval.json").read_text())["results"].values()))


def train(overrides: list[str], out: Path) -> dict:
    """``train.py`` then its final-weights test metrics and mean training img/s over epochs."""
    wall = python("train.py", [*overrides, *QUIET, "logger=csv", "callbacks.lr_monitor=null",
                               "trainer.limit_val_batches=0", "test_after_fit=true"], out)
    results = json.loads((out / "results.json").read_text())["results"]
    trained = next(v for k, v in results.items() if k.startswith("trained"))
    with open(out / "csv" / "metrics.csv", newline="") as f:
        speeds = [float(r["train/images_per_second"]) for r in csv.DictReader(f) if r.get("train/images_per_second")]
    return {"test": trained, "train_images_per_second": statistics.mean(speeds) if speeds else None,
            "wall_seconds": wall, "ckpt": str(out / "checkpoints" / "last.ckpt")}


def emoji_run(loss: str, head: str, epochs: int, seed: int, extra: list[str], tmp: Path) -> dict:
    out = tmp / f"emoji-{loss}-{head}"
    result = train(["data=emoji", "model=mobilenet_v2", "model.pretrained=imagenet", "train.tune=full", f"head={head}",
                    f"loss={loss}", f"seed={seed}", f"trainer.max_epochs={epochs}", *extra], out)
    result["cross_vendor"] = evaluate([f"ckpt_path={result['ckpt']}", "data=emoji", *CROSS_VENDOR], out / "cv")
    return result


def baseline_run(name: str, data: str, tmp: Path) -> dict:
    model = ["model=mobilenet_v2", "model.pretrained=imagenet"] if name == "untrained" else ["model=handcrafted"]
    out = tmp / f"{data}-{name}"
    result = {"test": evaluate([f"data={data}", *model], out / "test")}
    if data == "emoji":
        result["cross_vendor"] = evaluate(["data=emoji", *model, *CROSS_VENDOR], out / "cv")
    return result


def fmnist_run(loss: str, head: str, seed: int, extra: list[str], tmp: Path) -> dict:
    out = tmp / f"fmnist-{loss}-{head}"
    return train(["experiment=demo", "evaluate_untrained=false", "train.tune=full", f"head={head}", f"loss={loss}", f"seed={seed}",
                  *extra], out)


def handcrafted_available() -> bool:
    return (config_dir() / "model" / "handcrafted.yaml").is_file()


def pct(metrics: dict | None, key: str) -> str:
    return f"{100 * metrics[key]:.2f}" if metrics and key in metrics else "–"


def emoji_table(runs: dict) -> str:
    lines = ["| model | MAP@R | R@1 | R@8 | cross-vendor P@1 | train img/s |", "|---|---|---|---|---|---|"]
    for key, run in runs.items():
        if not key.startswith("emoji/"):
            continue
        if run.get("missing"):
            lines.append(f"| {run['label']} | missing: {run['missing']} | | | | |")
            continue
        speed = f"{run['train_images_per_second']:.0f}" if run.get("train_images_per_second") else "–"
        lines.append(f"| {run['label']} | {pct(run['test'], 'map_at_r')} | {pct(run['test'], 'recall_at_1')} | "
                     f"{pct(run['test'], 'recall_at_8')} | {pct(run.get('cross_vendor'), 'precision_at_1')} | {speed} |")
    return "\n".join(lines)


def fmnist_table(runs: dict) -> str:
    lines = ["| model | P@1 | MAP@R | train img/s |", "|---|---|---|---|"]
    for key, run in runs.items():
        if not key.startswith("fmnist/"):
            continue
        if run.get("missing"):
            lines.append(f"| {run['label']} | missing: {run['missing']} | | |")
            continue
        speed = f"{run['train_images_per_second']:.0f}" if run.get("train_images_per_second") else "–"
        lines.append(f"| {run['label']} | {pct(run['test'], 'precision_at_1')} | {pct(run['test'], 'map_at_r')} | {speed} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=LOSSES)
    parser.add_argument("--heads", nargs="+", default=["fusion"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--fmnist", nargs="*", default=[], metavar="LOSS:HEAD",
                        help="Fashion-MNIST recipes to train (1 epoch, 32 px) next to both baselines")
    parser.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--fresh", action="store_true", help="redo runs already in --out")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/losses_emoji.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training run")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[str, str, callable]]:
    """(key, label, run(tmp) → dict) for every row, baselines first (they are quick)."""
    jobs = []
    if not args.no_baselines:
        jobs.append(("emoji/untrained", "ImageNet MobileNetV2, untrained (random GeM head)",
                     lambda tmp: baseline_run("untrained", "emoji", tmp)))
        jobs.append(("emoji/handcrafted", "hand-crafted HSV hist + LBP + HOG (`model=handcrafted`)",
                     lambda tmp: baseline_run("handcrafted", "emoji", tmp)))
    for head in args.heads:
        for loss in args.losses:
            jobs.append((f"emoji/{loss}/{head}", f"`loss={loss}` `head={head}`",
                         lambda tmp, loss=loss, head=head: emoji_run(loss, head, args.epochs, args.seed,
                                                                     args.overrides, tmp)))
    if args.fmnist:
        if not args.no_baselines:
            jobs.append(("fmnist/untrained", "ImageNet MobileNetV2, untrained (random GeM head)",
                         lambda tmp: baseline_run("untrained", "fashion_mnist", tmp)))
            jobs.append(("fmnist/handcrafted", "hand-crafted (`model=handcrafted`)",
                         lambda tmp: baseline_run("handcrafted", "fashion_mnist", tmp)))
        for recipe in args.fmnist:
            loss, _, head = recipe.partition(":")
            jobs.append((f"fmnist/{loss}/{head or 'gem'}", f"`experiment=demo loss={loss} head={head or 'gem'}` (1 epoch)",
                         lambda tmp, loss=loss, head=head or "gem": fmnist_run(loss, head, args.seed, args.overrides, tmp)))
    return jobs


def missing_reason(key: str) -> str | None:
    if key.endswith("/handcrafted") and not handcrafted_available():
        return "conf/model/handcrafted.yaml not there yet"
    loss = key.split("/")[1] if key.count("/") == 2 else None
    if loss and not (config_dir() / "loss" / f"{loss}.yaml").is_file():
        return f"conf/loss/{loss}.yaml not there yet"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table_only:  # rebuild the table from --out (e.g. after changing its layout)
        saved = json.loads(args.out.read_text())
        runs = saved["runs"]
        print(saved.get("caption", "") + "\n")
        print(emoji_table(runs) + ("\n\n" + fmnist_table(runs) if any(k.startswith("fmnist/") for k in runs) else ""))
        return 0
    previous = {} if args.fresh or not args.out.is_file() else json.loads(args.out.read_text()).get("runs", {})
    runs: dict[str, dict] = {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for key, label, job in plan(args):
            if key in previous and not previous[key].get("missing") and not previous[key].get("error"):
                runs[key] = previous[key]
                continue
            reason = missing_reason(key)
            if reason:
                runs[key] = {"label": label, "missing": reason}
            else:
                started = time.perf_counter()
                try:
                    runs[key] = {"label": label, **job(Path(tmp))}
                except RuntimeError as exc:
                    runs[key] = {"label": label, "missing": "failed (see JSON)", "error": str(exc)}
                runs[key]["seconds"] = time.perf_counter() - started
            print(f"{key}: " + json.dumps({k: v for k, v in runs[key].items() if k in ("missing", "seconds")}
                                          | {"map_at_r": (runs[key].get("test") or {}).get("map_at_r")}), flush=True)
            write_json(args.out, {"runs": runs, "args": {k: str(v) for k, v in vars(args).items()}})
    caption = (f"Emoji zero-shot test split (956 unseen classes, 4,152 images, all-vs-all; cross-vendor: base emoji, "
               f"Google ↔ Twitter), ImageNet MobileNetV2, {args.epochs} epochs per loss, batch 128 (M=4), 64 px, "
               f"seed {args.seed}, final weights; {os.cpu_count()} shared CPUs, load average "
               f"{load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end"
               + (f"; overrides: {' '.join(args.overrides)}" if args.overrides else ""))
    text = f"{caption}\n\n{emoji_table(runs)}"
    if args.fmnist:
        text += ("\n\nFashion-MNIST, 10k test queries vs 60k train gallery, 32 px, 1 epoch:\n\n" + fmnist_table(runs))
    print("\n" + text)
    write_json(args.out, {"caption": caption, "table": text, "runs": runs,
                          "args": {k: str(v) for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
