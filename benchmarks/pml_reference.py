"""Our ``train.py`` vs pytorch-metric-learning's own reference training loop, side by side in one run.

Both train the same network on the same data with the same recipe, and both are evaluated by the same
code, so the only difference is the training loop:

- network: our ``Embedder`` (ImageNet MobileNetV2 → GeM head → linear → BN → L2 norm) from the same
  config and seed; PML gets it as its ``trunk`` (``embedder`` = identity);
- loss + miner: ``TripletMarginLoss(margin=0.1)`` + semi-hard ``TripletMarginMiner`` (``conf/loss/triplet``);
- optimiser / schedule: ``conf/optimizer`` + ``conf/scheduler`` (AdamW, cosine stepped per epoch);
- data: emoji train split at 64 px, the same augmentation and decoded-image cache, 2 loader workers;
- sampling: PML's ``samplers.MPerClassSampler`` (m=4, batch 128) for theirs, ours for ours, with the same
  number of iterations per epoch (our sampler's epoch plan);
- PML side: ``trainers.MetricLossOnly`` with these pieces; its checkpoint is saved in our format;
- evaluation: ``eval.py`` on the emoji test split (all-vs-all) for both final weights (no checkpoint
  selection), plus PML's ``AccuracyCalculator`` (via ``testers.GlobalEmbeddingSpaceTester``) as a cross-check;
- speed: training images/second per epoch (epoch start → last step end), mean over epochs.

    python benchmarks/pml_reference.py --epochs 3
    python benchmarks/pml_reference.py --epochs 1 --plain     # also ours without the speed defaults
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

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from cbir.configs import config_dir
from cbir.data.datasets import collate_records
from cbir.data.sampler import MPerClassBatchSampler
from cbir.evaluation.report import write_json
from cbir.models.checkpoint import load_embedder_checkpoint
from cbir.training import factory
from cbir.training.factory import model_config

ROOT = Path(__file__).resolve().parents[1]
METRICS = (("map_at_r", "MAP@R"), ("precision_at_1", "P@1"), ("recall_at_8", "R@8"))


def recipe(epochs: int, seed: int) -> list[str]:
    return ["data=emoji", "model=mobilenet_v2", "model.pretrained=imagenet", "head=gem", "loss=triplet",
            "optimizer=adamw", "scheduler=cosine", f"seed={seed}", f"trainer.max_epochs={epochs}"]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def evaluate_checkpoint(ckpt: Path, out: Path) -> dict:
    """Our ``eval.py`` on the emoji test split (all-vs-all), fp32, as users run it: the metrics of the one
    row of its ``eval.json`` (``{"protocol", "results": {model: metrics}}``)."""
    command = [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={ckpt}", "data=emoji",
               "trainer.precision=32-true", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"eval.py failed on {ckpt}:\n{proc.stderr[-3000:]}")
    return next(iter(json.loads((out / "eval.json").read_text())["results"].values()))


def pml_accuracy(embedder: nn.Module, dataset) -> dict:
    """PML's own tester + AccuracyCalculator on the test split, all-vs-all (self excluded)."""
    from pytorch_metric_learning import testers
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(include=("mean_average_precision_at_r", "precision_at_1"), k="max_bin_count")
    tester = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=calculator, data_device=torch.device("cpu"), batch_size=256,
        dataloader_num_workers=2, data_and_label_getter=lambda b: (b["image"], b["label"]))
    accuracies = tester.test({"test": dataset}, 1, embedder, nn.Identity(), splits_to_eval=[("test", ["test"])])
    values = accuracies["test"]
    return {"map_at_r": float(values["mean_average_precision_at_r_level0"]),
            "precision_at_1": float(values["precision_at_1_level0"])}


def run_theirs(epochs: int, seed: int, out: Path, limit: int | None = None, tester: bool = False,
               overrides: tuple[str, ...] = ("train.tune=full",)) -> dict:
    """pytorch_metric_learning.trainers.MetricLossOnly on our Embedder, data and recipe; every trunk stage
    trains (``train.tune=full``), as a PML user's trunk does."""
    from pytorch_metric_learning import samplers, trainers

    cfg = compose_train(recipe(epochs, seed) + [f"paths.output_dir={out}", *overrides])
    pl.seed_everything(seed, workers=True)
    embedder = factory.build_embedder_from_config(cfg)
    catalog = factory.build_catalog(cfg.data)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    datamodule.setup("fit")  # the decoded-image cache, shared with ours
    indices = catalog.select(cfg.data.train_split)
    labels = catalog.labels(indices)
    dataset = datamodule._dataset(indices, datamodule.train_tf)
    batch = int(cfg.data.batch_size)
    iterations = len(MPerClassBatchSampler(labels, batch_size=batch, m=int(cfg.data.m_per_class), seed=seed))
    iterations = min(iterations, limit or iterations)
    sampler = samplers.MPerClassSampler(labels, m=int(cfg.data.m_per_class), batch_size=batch,
                                        length_before_new_iter=iterations * batch)
    # the very loss, miner, optimiser and scheduler objects our train.py builds from the same config
    module = factory.build_module(cfg, embedder)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]

    marks: dict[str, list[float]] = {"epoch_start": [time.perf_counter()], "step_end": []}
    epoch_seconds: list[float] = []

    def end_of_iteration(trainer) -> None:
        marks["step_end"].append(time.perf_counter())

    def end_of_epoch(trainer) -> bool:
        epoch_seconds.append(marks["step_end"][-1] - marks["epoch_start"][-1])
        marks["epoch_start"].append(time.perf_counter())
        return True

    trainer = trainers.MetricLossOnly(
        models={"trunk": embedder, "embedder": nn.Identity()},
        optimizers={"trunk_optimizer": optimizer},
        batch_size=batch,
        loss_funcs={"metric_loss": module.loss_fn},
        mining_funcs={"tuple_miner": module.miner},
        dataset=dataset,
        data_device=torch.device("cpu"),
        sampler=sampler,
        collate_fn=collate_records,
        data_and_label_getter=lambda b: (b["image"], b["label"]),
        lr_schedulers={"trunk_scheduler_by_epoch": scheduler},
        dataloader_num_workers=int(cfg.data.num_workers),
        end_of_iteration_hook=end_of_iteration,
        end_of_epoch_hook=end_of_epoch,
    )
    started = time.perf_counter()
    trainer.train(num_epochs=epochs)
    wall = time.perf_counter() - started
    ckpt = out / "pml_last.ckpt"
    torch.save({"hyper_parameters": {"model_config": model_config(cfg)},
                "state_dict": {f"embedder.{k}": v for k, v in embedder.state_dict().items()}}, ckpt)
    speeds = [iterations * batch / s for s in epoch_seconds]
    test_set = datamodule._dataset(catalog.select("test"), datamodule.eval_tf)
    return {"ckpt": ckpt, "train_images_per_second": statistics.mean(speeds), "per_epoch": speeds,
            "iterations_per_epoch": iterations, "train_seconds": wall,
            "pml_tester": pml_accuracy(embedder.eval(), test_set) if tester else None}


def run_ours(epochs: int, seed: int, out: Path, extra: list[str], tester: bool = False) -> dict:
    """``python train.py`` with the same recipe; the last checkpoint is evaluated (no selection)."""
    command = [sys.executable, str(ROOT / "train.py"), *recipe(epochs, seed),
               "trainer.limit_val_batches=0", "test_after_fit=false", "callbacks.lr_monitor=null",
               "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv",
               f"hydra.run.dir={out}", *extra]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{proc.stderr[-3000:]}")
    with open(out / "csv" / "metrics.csv", newline="") as f:
        speeds = [float(r["train/images_per_second"]) for r in csv.DictReader(f) if r.get("train/images_per_second")]
    ckpt = out / "checkpoints" / "last.ckpt"
    result = {"ckpt": ckpt, "train_images_per_second": statistics.mean(speeds), "per_epoch": speeds,
              "process_seconds": wall, "pml_tester": None}
    if not tester:
        return result
    cfg = compose_train(recipe(epochs, seed) + [f"paths.output_dir={out}"])
    catalog = factory.build_catalog(cfg.data)
    embedder = load_embedder_checkpoint(ckpt).eval()
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    test_set = datamodule._dataset(catalog.select("test"), datamodule.eval_tf)
    return result | {"pml_tester": pml_accuracy(embedder, test_set)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (smoke runs)")
    parser.add_argument("--pml-tester", action="store_true",
                        help="also score both with PML's GlobalEmbeddingSpaceTester + AccuracyCalculator")
    parser.add_argument("--theirs-last", action="store_true", help="run PML's loop after ours instead of first")
    parser.add_argument("--no-eval", action="store_true", help="speed only: skip the evaluation of both")
    parser.add_argument("--plain", action="store_true",
                        help="also run ours in fp32 without channels-last (our loop alone, no speed options)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pml_reference_emoji.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        limit = [f"trainer.limit_train_batches={args.limit_batches}"] if args.limit_batches else []
        runs = [("pytorch-metric-learning MetricLossOnly",
                 lambda o: run_theirs(args.epochs, args.seed, o, args.limit_batches, args.pml_tester)),
                ("ours: train.py (defaults)", lambda o: run_ours(args.epochs, args.seed, o, limit, args.pml_tester))]
        if args.plain:
            runs.append(("ours: train.py, fp32, no channels-last",
                         lambda o: run_ours(args.epochs, args.seed, o, [*limit, "trainer.precision=32-true",
                                                                        "callbacks.channels_last=null"], args.pml_tester)))
        if args.theirs_last:  # the other order, to see how much the load drifted between runs
            runs = runs[1:] + runs[:1]
        for i, (name, run) in enumerate(runs):
            out = tmp / f"run{i}"
            out.mkdir()
            result = run(out)
            ckpt = result.pop("ckpt")
            result["metrics"] = None if args.no_eval else evaluate_checkpoint(ckpt, out / "eval")
            rows[name] = result
            quality = f"MAP@R {100 * result['metrics']['map_at_r']:.2f}, " if result["metrics"] else ""
            print(f"{name}: {quality}{result['train_images_per_second']:.0f} img/s", flush=True)
    theirs = rows["pytorch-metric-learning MetricLossOnly"]
    lines = ["| training loop | MAP@R | P@1 | R@8 | MAP@R (PML's AccuracyCalculator) | train img/s | img/s vs PML |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        m = row["metrics"] or {}
        ratio = row["train_images_per_second"] / theirs["train_images_per_second"]
        pml_map = f"{100 * row['pml_tester']['map_at_r']:.2f}" if row.get("pml_tester") else "–"
        lines.append(f"| {name} | " + " | ".join(f"{100 * m[k]:.2f}" if k in m else "–" for k, _ in METRICS)
                     + f" | {pml_map} | {row['train_images_per_second']:.0f} | {ratio:.2f}× |")
    table = "\n".join(lines)
    header = (f"Emoji zero-shot test split (all-vs-all), ImageNet MobileNetV2 + GeM, triplet 0.1 + semi-hard, "
              f"AdamW + cosine, batch 128, M=4, 64 px, {args.epochs} epochs, seed {args.seed}; "
              f"{os.cpu_count()} CPUs, load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"\n{header}\n{table}")
    ours = rows["ours: train.py (defaults)"]
    payload = {"header": header, "table": table, "runs": rows, "args": {k: str(v) for k, v in vars(args).items()},
               "ratio_ours_over_theirs": {
                   "map_at_r": ours["metrics"]["map_at_r"] / theirs["metrics"]["map_at_r"] if ours["metrics"] else None,
                   "train_images_per_second": ours["train_images_per_second"] / theirs["train_images_per_second"]}}
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
