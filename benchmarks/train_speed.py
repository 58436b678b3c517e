"""Training speed: fp32 vs channels-last vs bf16 autocast vs both, through ``train.py`` as users run it.

For each data set and variant it runs ``python train.py`` in a subprocess for a fixed number of
training batches (no validation, no checkpoints, no test) and reads ``train/images_per_second`` from the
CSV logger: data loading, augmentation, forward, miner, loss, backward and optimiser step included.
Variants are interleaved (round-robin over ``--repeats`` rounds) so background load hits them alike;
the table shows the best round of each (the least disturbed by other jobs).

A second column, "model only", times the same steps in-process on synthetic batches already in memory
(forward + miner + loss + backward + AdamW step, warm-up excluded): when it is far above the
``train.py`` figure, the input pipeline (or the per-step framework overhead) is the limit, not the net.

    python benchmarks/train_speed.py                                  # emoji 64 px + Fashion-MNIST 32 px
    python benchmarks/train_speed.py --datasets emoji --batches 10 --repeats 1     # quick look
    python benchmarks/train_speed.py --compile                        # also torch.compile (model only)

``--peers``: ``train.py`` as shipped (``data=emoji model=mobilenet_v2 loss=triplet``, nothing else set) against
the peers' own training loops on the same network, data, batch (32 classes x 4) and augmentation, one epoch
each, interleaved rounds: pytorch-metric-learning's ``trainers.MetricLossOnly`` (same venv, same semi-hard
miner, every trunk stage trained as a PML user's is) and open-metric-learning (``benchmarks/peers/oml_train.py``
with its hard-triplet miner, in a side environment because OML pins numpy < 2; ``--oml-python``, made with
``python -m venv /tmp/omlenv && /tmp/omlenv/bin/pip install torch==2.14.1 torchvision==0.29.1
open-metric-learning==4.0.0 omegaconf``: OML imports omegaconf without declaring it). ``train.py`` rows:
as shipped (``train.tune=auto``), with every stage trained (``train.tune=full``), and with OML's miner
(``miner=batch_hard``), for the like-for-like readings.

    python benchmarks/train_speed.py --peers --repeats 5 --oml-python /tmp/omlenv/bin/python \
        --out benchmarks/results/train_speed_peers.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cbir.evaluation.report import write_json

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (channels_last, bf16)
    "fp32": (False, False),
    "channels_last": (True, False),
    "bf16": (False, True),
    "bf16+channels_last": (True, True),
}
DATASETS = {  # name -> (image size, M per class) as in conf/data/
    "emoji": (64, 4),
    "fashion_mnist": (32, 16),
}


def train_overrides(dataset: str, variant: str, batches: int, out: str, extra: list[str]) -> list[str]:
    channels_last, bf16 = VARIANTS[variant]
    return [
        f"data={dataset}", "model=mobilenet_v2", "model.pretrained=imagenet", "loss=triplet",
        "train.tune=full",  # every stage, as the "model only" column trains it
        "trainer.max_epochs=1", f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        f"trainer.precision={'bf16-mixed' if bf16 else '32-true'}", "test_after_fit=false",
        "callbacks.model_checkpoint=null", "callbacks.lr_monitor=null",
        "callbacks.channels_last=" + ("{_target_:cbir.training.speed.ChannelsLast}" if channels_last else "null"),
        "logger=csv", f"hydra.run.dir={out}", *extra,
    ]


def train_py_speed(overrides_for: Callable[[str], list[str]], what: str) -> dict:
    """One ``train.py`` subprocess with ``overrides_for(run folder)``; its logged training img/s and wall time."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(ROOT / "train.py"), *overrides_for(out)]
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"train.py failed for {what}:\n{proc.stderr[-3000:]}")
        with open(Path(out) / "csv" / "metrics.csv", newline="") as f:
            speeds = [float(r["train/images_per_second"]) for r in csv.DictReader(f) if r.get("train/images_per_second")]
    return {"images_per_second": speeds[-1], "wall_seconds": wall}


def run_train(dataset: str, variant: str, batches: int, extra: list[str]) -> dict:
    return train_py_speed(lambda out: train_overrides(dataset, variant, batches, out, extra), f"{dataset}/{variant}")


PEER_OURS = {  # row name -> train.py overrides on top of the shipped defaults
    "ours: train.py as shipped": [],
    "ours: train.py train.tune=full": ["train.tune=full"],
    "ours: train.py miner=batch_hard": ["miner=batch_hard"],
}
PML_ROW = "pytorch-metric-learning MetricLossOnly"
OML_ROW = "open-metric-learning (HardTripletsMiner)"


def run_ours_shipped(extra: list[str]) -> dict:
    """``train.py data=emoji model=mobilenet_v2 loss=triplet`` for one epoch: only what does not touch the
    training steps is switched off (validation, checkpoints, test, progress bar)."""
    return train_py_speed(lambda out: [
        "data=emoji", "model=mobilenet_v2", "loss=triplet", "trainer.max_epochs=1", "trainer.limit_val_batches=0",
        "test_after_fit=false", "callbacks.model_checkpoint=null", "trainer.enable_progress_bar=false", "logger=csv",
        f"hydra.run.dir={out}", *extra], " ".join(extra) or "the shipped defaults")


def run_pml_peer() -> dict:
    """PML's ``MetricLossOnly`` for one epoch, in its own process (``--run-pml``)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--run-pml"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the PML run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pml_epoch() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pml_reference import run_theirs

    with tempfile.TemporaryDirectory() as out:
        result = run_theirs(1, 0, Path(out))
    return {"images_per_second": result["train_images_per_second"], "batches": result["iterations_per_epoch"]}


def emoji_training_csv(path: Path) -> int:
    """The emoji training images train.py trains on (``path,label``), for the OML run; returns batches/epoch."""
    from hydra import compose, initialize_config_dir

    from cbir.configs import config_dir
    from cbir.data.sampler import MPerClassBatchSampler
    from cbir.training import factory

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=emoji", "loss=triplet"])
    catalog = factory.build_catalog(cfg.data)
    indices = catalog.select(cfg.data.train_split)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for i in indices:
            writer.writerow([str((ROOT / catalog.records[i].source).resolve()), catalog.records[i].label])
    labels = catalog.labels(indices)
    return len(MPerClassBatchSampler(labels, batch_size=int(cfg.data.batch_size), m=int(cfg.data.m_per_class)))


def run_oml_peer(python: str, train_csv: Path, batches: int) -> dict:
    from cbir.models.weights import imagenet_cache_path

    command = [python, str(ROOT / "benchmarks/peers/oml_train.py"), "--csv", str(train_csv),
               "--weights", str(imagenet_cache_path("mobilenet_v2")), "--batches", str(batches)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the OML run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peers(args: argparse.Namespace) -> int:
    """Interleaved rounds of train.py as shipped against the peers' loops; median and range per row."""
    started, load_before = time.time(), os.getloadavg()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        train_csv = Path(tmp) / "emoji_train.csv"
        batches = emoji_training_csv(train_csv)
        rows: list[tuple[str, Callable[[], dict]]] = [
            (name, lambda extra=extra: run_ours_shipped(extra)) for name, extra in PEER_OURS.items()]
        rows.append((PML_ROW, run_pml_peer))
        if args.oml_python:
            rows.append((OML_ROW, lambda: run_oml_peer(args.oml_python, train_csv, batches)))
        for round_ in range(args.repeats):
            order = rows if round_ % 2 == 0 else rows[::-1]  # alternate the order: drift hits all alike
            for name, run in order:
                result = run()
                runs.append({"round": round_, "row": name, **result})
                print(f"round {round_} {name}: {result['images_per_second']:.0f} img/s", flush=True)
    speeds = {name: [r["images_per_second"] for r in runs if r["row"] == name] for name, _ in rows}
    fastest_peer = max((statistics.median(v) for n, v in speeds.items() if not n.startswith("ours")), default=None)
    lines = ["| training loop | img/s median | min–max | × fastest peer (medians) |", "|---|---|---|---|"]
    for name, values in speeds.items():
        ratio = f"{statistics.median(values) / fastest_peer:.2f}×" if fastest_peer else "–"
        lines.append(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f}–{max(values):.0f} | {ratio} |")
    text = "\n".join(lines)
    header = (f"emoji 64 px, ImageNet MobileNetV2 + GeM 512, triplet 0.1, batch 128 (32 x 4), one epoch "
              f"({batches} batches) per run, {args.repeats} interleaved rounds; {os.cpu_count()} CPUs, load average "
              f"{load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"\n{header}\n{text}")
    write_json(args.out, {"header": header, "table": text, "images_per_second": speeds, "runs": runs,
                          "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                      "torch": torch.__version__},
                          "args": {k: str(v) for k, v in vars(args).items()}, "seconds": time.time() - started})
    return 0


def model_only_speed(size: int, m: int, channels_last: bool, bf16: bool, compile: bool = False,
                     batch: int = 128, steps: int = 6, warmup: int = 2) -> dict:
    """img/s of forward + semi-hard miner + triplet loss + backward + AdamW on an in-memory batch."""
    from pytorch_metric_learning import losses, miners

    from cbir.models.embedder import build_embedder

    torch.manual_seed(0)
    model = build_embedder("mobilenet_v2", pretrained="none", image_size=size).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch // m).repeat_interleave(m)
    loss_fn = losses.TripletMarginLoss(margin=0.1)
    miner = miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile else model
    times = []
    compile_started = time.perf_counter()
    for step in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            embeddings = forward(images).float()
        loss = loss_fn(embeddings, labels, miner(embeddings, labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
        if step == 0:
            first_step = time.perf_counter() - compile_started
    return {"images_per_second": batch / statistics.median(times[warmup:]), "first_step_seconds": first_step}


def loader_only_speed(dataset: str, batches: int = 10) -> float:
    """img/s of the training input pipeline alone in one process (no workers): sampler, cached pixels,
    augmentation, resize, normalise, collate. Compare with the model's img/s to see which one limits."""
    from hydra import compose, initialize_config_dir

    from cbir.configs import config_dir
    from cbir.training import factory

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={dataset}", "model.pretrained=none",
                                                      "data.num_workers=0", "paths.output_dir=/tmp"])
    embedder = factory.build_embedder_from_config(cfg)
    datamodule = factory.build_datamodule(cfg, factory.build_catalog(cfg.data), embedder)
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    next(loader)  # first batch: iterator set-up
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(loader)["label"])
    return images / (time.perf_counter() - started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batches", type=int, default=20, help="training batches per train.py run (default 20)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is reported")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (model only)")
    parser.add_argument("--loader", action="store_true", help="also time the input pipeline alone (one core)")
    parser.add_argument("--no-train", action="store_true", help="only the in-process model-only timings")
    parser.add_argument("--peers", action="store_true", help="train.py as shipped against PML's and OML's loops")
    parser.add_argument("--oml-python", help="--peers: the python of an environment with open-metric-learning")
    parser.add_argument("--run-pml", action="store_true", help=argparse.SUPPRESS)  # one PML epoch, JSON out
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/train_speed_cpu.json, --peers: train_speed_peers.json)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every train.py run")
    return parser.parse_args(argv)


def table(results: dict) -> str:
    lines = ["| data | variant | train.py img/s | model only img/s | vs fp32 (train.py) |", "|---|---|---|---|---|"]
    for dataset, variants in results.items():
        base = variants.get("fp32", {}).get("train")
        for name, row in variants.items():
            train = row.get("train")
            model = row.get("model_only")
            ratio = f"{train / base:.2f}×" if train and base else "–"
            lines.append(f"| {dataset} | {name} | {train:.0f} | " if train else f"| {dataset} | {name} | – | ")
            lines[-1] += (f"{model:.0f} | " if model else "– | ") + ratio + " |"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_pml:
        print(json.dumps(pml_epoch()))
        return 0
    if args.peers:
        args.out = args.out or ROOT / "benchmarks/results/train_speed_peers.json"
        return peers(args)
    args.out = args.out or ROOT / "benchmarks/results/train_speed_cpu.json"
    started = time.time()
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict]] = {d: {v: {} for v in args.variants} for d in args.datasets}
    if args.compile:
        for d in args.datasets:
            results[d]["compile+bf16+channels_last"] = {}
    runs = []
    loader_speed = {d: loader_only_speed(d) for d in args.datasets} if args.loader else {}
    for d, speed in loader_speed.items():
        print(f"{d}: input pipeline alone {speed:.0f} img/s (one process, no workers)", flush=True)
    for round_ in range(args.repeats):
        for dataset in args.datasets:
            size, m = DATASETS[dataset]
            for variant in results[dataset]:
                channels_last, bf16 = VARIANTS.get(variant, (True, True))
                compile = variant.startswith("compile")
                row = results[dataset][variant]
                if round_ == 0 or not compile:  # compiling is slow: once is enough
                    speed = model_only_speed(size, m, channels_last, bf16, compile=compile)
                    runs.append({"round": round_, "dataset": dataset, "variant": variant, "kind": "model_only", **speed})
                    row["model_only"] = max(row.get("model_only", 0.0), speed["images_per_second"])
                    if compile:
                        row["compile_first_step_seconds"] = speed["first_step_seconds"]
                if not args.no_train and not compile:
                    result = run_train(dataset, variant, args.batches, args.overrides)
                    runs.append({"round": round_, "dataset": dataset, "variant": variant, "kind": "train.py", **result})
                    row["train"] = max(row.get("train", 0.0), result["images_per_second"])
                print(f"round {round_} {dataset} {variant}: {row}", flush=True)
    text = table(results)
    header = (f"MobileNetV2 (ImageNet), triplet + semi-hard, batch 128; emoji 64 px M=4, Fashion-MNIST 32 px "
              f"M=16; {args.batches} batches per train.py run, best of {args.repeats} interleaved rounds; "
              f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"\n{header}\n{text}")
    if loader_speed:
        text += "\n\nInput pipeline alone (one process, no workers): " + ", ".join(
            f"{d} {v:.0f} img/s" for d, v in loader_speed.items())
    payload = {"header": header, "table": text, "results": results, "runs": runs, "loader_only": loader_speed,
               "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__,
                           "load_average_start": load_before, "load_average_end": os.getloadavg()},
               "args": {k: str(v) for k, v in vars(args).items()}, "seconds": time.time() - started}
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
