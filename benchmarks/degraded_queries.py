"""Degraded-query benchmark: does cleaning up a query image help retrieval when the query is damaged?

Any data config's evaluation protocol (``--data``, default ``emoji``: its test split, zero-shot classes, all-vs-all
at 64 px; ``fashion_mnist``: the test images against the 60k train gallery; ``icons``: all-vs-all in the unseen
icon names). Each query (all of them, or a seeded ``--queries`` sample) is searched against the clean gallery,
itself left out in an all-vs-all protocol; only the query is degraded (Gaussian noise, blur, JPEG q=10-20, low
light; :mod:`cbir.preprocess.degrade`, seeded) and then passed through each preprocessing option
(``conf/preprocess``; ``auto`` with its thresholds fitted to 500 training images of the data, as an exported
bundle's are, unless ``--auto-thresholds shipped``) before the model's resize/normalise.
Row ``clean`` = undamaged queries, which shows what each option costs when nothing needs fixing.

Models: ImageNet MobileNetV2 as it comes (64 px) and any ``--ckpt`` training checkpoints. Prints R@1 and
MAP@R tables per model, what ``auto`` chose per degradation, preprocessing time per image, and (with
``--measure-train N``) the quality measurements on N *train* images from which ``auto``'s
thresholds were chosen. Writes JSON (atomically, after every degradation; ``--resume`` skips finished cells).

    python benchmarks/degraded_queries.py --queries 400 --measure-train 500 \
        --ckpt outputs/emoji_triplet_10ep/checkpoints/best-epoch008.ckpt

(about 40 minutes on the shared 2-core machine; all 4152 queries take about ten times longer).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cbir.configs import config_dir
from cbir.data.images import load_record
from cbir.data.transforms import eval_transform
from cbir.evaluation.metrics import retrieval_metrics
from cbir.evaluation.report import write_json
from cbir.models.checkpoint import load_embedder_checkpoint
from cbir.models.embedder import Embedder, build_embedder
from cbir.models.inference import embed, prepare_for_inference
from cbir.preprocess import build_preprocessor, measure
from cbir.preprocess.degrade import Degradation, standard_degradations

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ["none", "nlm", "bilateral", "median", "clahe", "gamma", "unsharp", "denoise_enhance", "auto"]
# options that are not a conf/preprocess file, e.g. {"auto_nlm": {"steps": [{"name": "auto", "denoiser": "nlm"}]}}:
# variants to measure when choosing a default
VARIANTS: dict[str, dict] = {}
CLEAN = Degradation("clean", lambda image, seed=0: image)


def load_option(name: str, auto: dict | None = None):
    """The preprocessor of ``cbir/conf/preprocess/<name>.yaml`` (the same file Hydra composes), or a variant;
    ``auto``: the thresholds its ``auto`` steps leave unset (fitted to the data, as an exported bundle's are)."""
    import yaml

    if name in VARIANTS:
        return build_preprocessor(VARIANTS[name], auto=auto)
    spec = yaml.safe_load((config_dir() / "preprocess" / f"{name}.yaml").read_text())
    return build_preprocessor(spec, auto=auto)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already


def _process_chunk(job: tuple[str, list[np.ndarray], dict | None]
                   ) -> tuple[list[np.ndarray], list[list[str]], float]:
    name, images, auto = job
    preprocessor = load_option(name, auto)
    started = time.process_time()
    results = [preprocessor.apply(image) for image in images]
    seconds = time.process_time() - started
    return [r[0] for r in results], [[a["step"] for a in r[1]] for r in results], seconds


def preprocess_all(name: str, images: list[np.ndarray], pool: Pool | None,
                   auto: dict | None = None) -> tuple[list[np.ndarray], Counter, float]:
    """Processed images, how often each step ran, and CPU milliseconds per image."""
    if name == "none":
        return images, Counter(), 0.0
    chunks = [(name, images[i:i + 256], auto) for i in range(0, len(images), 256)]
    outputs = pool.imap(_process_chunk, chunks) if pool else map(_process_chunk, chunks)
    processed, steps, seconds = [], Counter(), 0.0
    for chunk_images, chunk_steps, chunk_seconds in outputs:
        processed += chunk_images
        steps.update(s for applied in chunk_steps for s in applied)
        seconds += chunk_seconds
    return processed, steps, 1000.0 * seconds / len(images)


def embed_images(model: Embedder, images: list[np.ndarray], fast: bool, batch_size: int = 256) -> torch.Tensor:
    """Embeddings through the inference path (channels-last + bf16 autocast when ``fast``)."""
    transform = eval_transform(model.input_size, model.mean, model.std)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image=image)["image"] for image in images[start:start + batch_size]])
        out.append(embed(model, batch, channels_last=fast, bf16=fast))
    return torch.cat(out)


def load_models(ckpts: list[Path], untrained: bool, fast: bool) -> dict[str, Embedder]:
    models = {}
    if untrained:
        models["untrained mobilenet_v2 (imagenet, 64 px)"] = build_embedder("mobilenet_v2", pretrained="imagenet",
                                                                           image_size=64)
    for ckpt in ckpts:
        models[f"trained {ckpt}"] = load_embedder_checkpoint(ckpt)
    return {name: prepare_for_inference(model, channels_last=fast) for name, model in models.items()}


def measure_train(catalog, count: int, degradations: list[Degradation], seed: int) -> dict:
    """Percentiles (0, 1, 5, 50, 95, 99, 100) of each quality measurement on ``count`` train images."""
    rng = np.random.default_rng(seed)
    indices = rng.choice(catalog.select("train"), size=min(count, len(catalog.select("train"))), replace=False)
    images = [load_record(catalog, int(i)) for i in indices]
    table = {}
    for degradation in degradations:
        values = [measure(degradation(image, seed=seed * 1_000_003 + k)).as_dict() for k, image in enumerate(images)]
        table[degradation.name] = {key: [round(float(np.percentile([v[key] for v in values], q)), 2)
                                         for q in (0, 1, 5, 50, 95, 99, 100)] for key in values[0]}
    return table


def markdown_tables(results: dict, models: list[str], degradations: list[str], options: list[str]) -> str:
    blocks = []
    for model in models:
        for metric, label in (("recall_at_1", "R@1"), ("map_at_r", "MAP@R")):
            lines = [f"{label} (%), {model}: rows = query degradation, columns = preprocessing of the query",
                     "", "| query | " + " | ".join(options) + " |", "|---|" + "---|" * len(options)]
            for degradation in degradations:
                cells = []
                for option in options:
                    cell = results.get(f"{model}|{degradation}|{option}")
                    cells.append(f"{100 * cell['metrics'][metric]:.2f}" if cell else "–")
                lines.append(f"| {degradation} | " + " | ".join(cells) + " |")
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def auto_table(steps: dict, degradations: list[str], count: int) -> str:
    lines = ["What `auto` applied (% of queries):", "", "| query | steps |", "|---|---|"]
    for degradation in degradations:
        chosen = steps.get(degradation, {})
        text = ", ".join(f"{s} {_percent(n, count)}" for s, n in sorted(chosen.items())) or "nothing"
        lines.append(f"| {degradation} | {text} |")
    return "\n".join(lines)


def _percent(n: int, count: int) -> str:
    return f"{100 * n / count:.0f}%" if 100 * n >= count else f"{n} of {count}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="emoji", help="a data config (conf/data): its test or val protocol")
    parser.add_argument("--root", type=Path, default=None, help="the data's folder (default: the config's)")
    parser.add_argument("--ckpt", type=Path, action="append", default=[], help="training checkpoint (repeatable)")
    parser.add_argument("--no-untrained", action="store_true", help="skip the untrained ImageNet model")
    parser.add_argument("--options", nargs="+", default=OPTIONS, choices=OPTIONS)
    parser.add_argument("--degradations", nargs="+", default=None, help="names from the standard suite")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: the data's validation protocol (emoji: the held-out training classes, with the "
                             "training images added to their gallery as distractors) — for choosing a recipe "
                             "without looking at the test classes")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N queries (quick runs)")
    parser.add_argument("--queries", type=int, default=None,
                        help="degrade only a seeded random sample of N queries (gallery: all)")
    parser.add_argument("--fp32", action="store_true", help="embed in fp32 (default: channels-last + bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes for the preprocessing")
    parser.add_argument("--measure-train", type=int, default=0, metavar="N",
                        help="also print quality measurements on N train images (auto's calibration)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "degraded_queries_emoji.json")
    parser.add_argument("--resume", action="store_true", help="keep finished cells of an existing --out")
    parser.add_argument("--auto-thresholds", choices=("fitted", "shipped"), default="fitted",
                        help="fitted: `auto`'s thresholds fitted to 500 training images of --data, as an exported "
                             "bundle's are (cbir.preprocess.calibrate); shipped: the emoji-derived defaults")
    args = parser.parse_args(argv)

    suite = [CLEAN, *standard_degradations()]
    if args.degradations:
        known = {d.name: d for d in suite}
        unknown = [n for n in args.degradations if n not in known]
        if unknown:
            parser.error(f"unknown degradation(s) {unknown}; choose from {list(known)}")
        suite = [known[n] for n in args.degradations]
    catalog, spec = data_catalog(args.data, args.root), data_spec(args.data, args.split)
    query_pool, gallery = evaluation_sets(catalog, spec)
    if args.limit:  # a quick run: the first N queries (all-vs-all: also the gallery, with any distractors)
        if spec.all_vs_all:
            gallery = np.concatenate([query_pool[:args.limit], np.setdiff1d(gallery, query_pool)])
        query_pool = query_pool[:args.limit]
    images = [load_record(catalog, int(i)) for i in tqdm(gallery, desc=f"loading the {args.split} gallery")]
    labels = torch.as_tensor(catalog.labels(gallery))
    ids = torch.as_tensor(gallery)  # catalog indices: a query that is also in the gallery is left out of its hits
    positions = np.arange(len(query_pool))  # a query's position seeds its degradation
    if args.queries and args.queries < len(positions):
        positions = np.sort(np.random.default_rng(args.seed).choice(len(positions), args.queries, replace=False))
    queries = query_pool[positions]
    query_images = [load_record(catalog, int(i)) for i in queries]
    query_labels, query_ids = torch.as_tensor(catalog.labels(queries)), torch.as_tensor(queries)
    auto = None
    if args.auto_thresholds == "fitted" and "auto" in args.options:
        from cbir.commands.export import auto_calibration
        from cbir.index.collection import Collection

        auto = auto_calibration(Collection(f"{args.data}:train", catalog, catalog.select("train")))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    fast = not args.fp32
    models = load_models(args.ckpt, untrained=not args.no_untrained, fast=fast)

    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "num_queries": len(queries),
               "num_gallery": len(images), "embedding": "fp32" if args.fp32 else "channels-last + bf16 autocast",
               "num_classes": int(len(set(labels.tolist()))), "degradations": [d.describe() for d in suite],
               "options": {o: load_option(o, (auto or {}).get("params")).describe() for o in args.options},
               "auto_calibration": auto, "results": {}, "auto_steps": {},
               "preprocess_ms_per_image": {}}
    if args.resume and args.out.is_file():
        previous = json.loads(args.out.read_text())
        for key in ("results", "auto_steps", "preprocess_ms_per_image"):
            payload[key].update(previous.get(key, {}))
    if args.measure_train:
        payload["train_measurements"] = measure_train(catalog, args.measure_train, [CLEAN, *standard_degradations()],
                                                      args.seed)

    started = time.perf_counter()
    galleries = {name: embed_images(model, images, fast) for name, model in tqdm(models.items(), desc="galleries")}
    spawn = multiprocessing.get_context("spawn")  # no fork after torch/OpenCV started their thread pools
    with spawn.Pool(args.workers, _init_worker) if args.workers > 1 else _no_pool() as pool:
        for degradation in suite:
            todo = [o for o in args.options if any(f"{m}|{degradation.name}|{o}" not in payload["results"] for m in models)]
            if not todo:
                continue
            degraded = [degradation(image, seed=args.seed * 1_000_003 + int(k))
                        for k, image in zip(positions, query_images)]
            for option in tqdm(todo, desc=degradation.name):
                processed, steps, ms = preprocess_all(option, degraded, pool, (auto or {}).get("params"))
                payload["preprocess_ms_per_image"].setdefault(option, {})[degradation.name] = round(ms, 3)
                if option == "auto":
                    payload["auto_steps"][degradation.name] = dict(steps)
                for model_name, model in models.items():
                    metrics = retrieval_metrics(embed_images(model, processed, fast), query_labels, galleries[model_name],
                                                labels, query_ids=query_ids, gallery_ids=ids)
                    payload["results"][f"{model_name}|{degradation.name}|{option}"] = {
                        "model": model_name, "degradation": degradation.name, "preprocess": option, "metrics": metrics}
            write_json(args.out, payload)

    names = [d.name for d in suite]
    tables = markdown_tables(payload["results"], list(models), names, args.options)
    timing = ["CPU ms per query image (mean over all queries of a degradation; clean / worst):", "",
              "| option | clean | slowest degradation |", "|---|---|---|"]
    for option, per in payload["preprocess_ms_per_image"].items():
        timing.append(f"| {option} | {per.get('clean', float('nan')):.3f} | {max(per.values()):.3f} |")
    report = "\n\n".join([tables, auto_table(payload["auto_steps"], names, len(queries)), "\n".join(timing)])
    if "train_measurements" in payload:
        lines = [f"Quality measurements on {args.data} train images (percentiles 0/1/5/50/95/99/100):", "",
                 "| degradation | noise sigma | brightness | contrast | sharpness | JPEG grid | blockiness |",
                 "|---|---|---|---|---|---|---|"]
        for name, per in payload["train_measurements"].items():
            lines.append(f"| {name} | " + " | ".join(" / ".join(f"{v:g}" for v in per[k]) for k in
                                                     ("noise_sigma", "brightness", "contrast", "sharpness",
                                                      "jpeg_grid", "blockiness")) + " |")
        report += "\n\n" + "\n".join(lines)
    payload["report"] = report
    payload["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, payload)
    print(f"\n{args.data}, {args.split} protocol, {len(queries)} queries (each degraded, searched against the "
          f"{len(images)} clean gallery images, itself excluded), {payload['embedding']}, seed {args.seed}:"
          f"\n\n{report}")
    return 0


def data_catalog(name: str, root: Path | None = None):
    """The catalog of data config ``name`` (``conf/data``), nothing fetched or downloaded, with its validation
    split held out exactly as training holds it out (``val_classes`` / ``val_images``, ``val_seed``)."""
    from cbir.configs import load_option
    from cbir.data.readers import catalog_from_config

    config = load_option("data", name)
    if root is not None:
        config.root = str(root)
    for offline in ("fetch", "download"):  # a benchmark reads what is on disk; `cbir data fetch` gets the rest
        if offline in config.reader:
            config.reader[offline] = False
    return catalog_from_config(config)


def data_spec(name: str, split: str):
    """The :class:`~cbir.data.datasets.EvalSpec` of data config ``name``'s ``test`` or ``val`` protocol."""
    from cbir.configs import load_option
    from cbir.training.factory import eval_spec

    spec = eval_spec(load_option("data", name).get(split))
    if spec is None:
        raise SystemExit(f"data={name} has no {split} protocol")
    return spec


def evaluation_sets(catalog, spec) -> tuple[np.ndarray, np.ndarray]:
    """(query pool, gallery) catalog indices of ``spec``. All-vs-all: the gallery is the query pool itself, and
    on the held-out training classes (``val``) the remaining training images join it as distractors — a few
    held-out classes make a small, easy gallery, and with them the search is about as hard as the test one."""
    queries = catalog.select(spec.queries)
    if not spec.all_vs_all:
        return queries, catalog.select(spec.gallery)
    if spec.queries == "val":
        return queries, np.concatenate([queries, catalog.select("train")])
    return queries, queries


class _no_pool:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
