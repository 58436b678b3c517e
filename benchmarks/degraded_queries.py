"""Degraded-query benchmark: does cleaning up a query image help retrieval when the query is damaged?

Emoji test split (zero-shot classes, 64 px). Every test image is a query in turn, searched against the
clean test images with itself left out (ids match), as in the all-vs-all protocol; only the query is
degraded (Gaussian noise, blur, JPEG q=10-20, low light; :mod:`cbir.preprocess.degrade`, seeded) and
then passed through each preprocessing option (``conf/preprocess``) before the model's resize/normalise.
Row ``clean`` = undamaged queries, which shows what each option costs when nothing needs fixing.

Models: ImageNet MobileNetV2 as it comes (64 px) and any ``--ckpt`` training checkpoints. Prints R@1 and
MAP@R tables per model, what ``auto`` chose per degradation, preprocessing time per image, and (with
``--measure-train N``) the quality measurements on N emoji *train* images from which ``auto``'s
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
from cbir.data.readers.emoji import read_emoji
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


def load_option(name: str):
    """The preprocessor of ``cbir/conf/preprocess/<name>.yaml`` (the same file Hydra composes), or a variant."""
    import yaml

    if name in VARIANTS:
        return build_preprocessor(VARIANTS[name])
    return build_preprocessor(yaml.safe_load((config_dir() / "preprocess" / f"{name}.yaml").read_text()))


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already


def _process_chunk(job: tuple[str, list[np.ndarray]]) -> tuple[list[np.ndarray], list[list[str]], float]:
    name, images = job
    preprocessor = load_option(name)
    started = time.process_time()
    results = [preprocessor.apply(image) for image in images]
    seconds = time.process_time() - started
    return [r[0] for r in results], [[a["step"] for a in r[1]] for r in results], seconds


def preprocess_all(name: str, images: list[np.ndarray], pool: Pool | None) -> tuple[list[np.ndarray], Counter, float]:
    """Processed images, how often each step ran, and CPU milliseconds per image."""
    if name == "none":
        return images, Counter(), 0.0
    chunks = [(name, images[i:i + 256]) for i in range(0, len(images), 256)]
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
    parser.add_argument("--root", type=Path, default=ROOT / "data" / "emoji")
    parser.add_argument("--ckpt", type=Path, action="append", default=[], help="training checkpoint (repeatable)")
    parser.add_argument("--no-untrained", action="store_true", help="skip the untrained ImageNet model")
    parser.add_argument("--options", nargs="+", default=OPTIONS, choices=OPTIONS)
    parser.add_argument("--degradations", nargs="+", default=None, help="names from the standard suite")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: queries from the held-out training classes of data=emoji (data.val_classes), "
                             "the training images added to their gallery as distractors — for choosing a recipe "
                             "without looking at the test classes")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test images (quick runs)")
    parser.add_argument("--queries", type=int, default=None,
                        help="degrade only a seeded random sample of N test images as queries (gallery: all)")
    parser.add_argument("--fp32", action="store_true", help="embed in fp32 (default: channels-last + bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes for the preprocessing")
    parser.add_argument("--measure-train", type=int, default=0, metavar="N",
                        help="also print quality measurements on N train images (auto's calibration)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "degraded_queries_emoji.json")
    parser.add_argument("--resume", action="store_true", help="keep finished cells of an existing --out")
    args = parser.parse_args(argv)

    suite = [CLEAN, *standard_degradations()]
    if args.degradations:
        known = {d.name: d for d in suite}
        unknown = [n for n in args.degradations if n not in known]
        if unknown:
            parser.error(f"unknown degradation(s) {unknown}; choose from {list(known)}")
        suite = [known[n] for n in args.degradations]
    catalog = emoji_catalog(args.root, args.split)
    indices = catalog.select(args.split)[: args.limit]
    pool = len(indices)  # queries come from these; the gallery may hold more
    if args.split == "val":  # 143 held-out classes make a small, easy gallery: the training images join it as
        indices = np.concatenate([indices, catalog.select("train")])  # distractors, about the test gallery's size
    images = [load_record(catalog, int(i)) for i in tqdm(indices, desc=f"loading {args.split} images")]
    labels = torch.as_tensor(catalog.labels(indices))
    ids = torch.arange(len(images))
    queries = np.arange(pool)
    if args.queries and args.queries < pool:
        queries = np.sort(np.random.default_rng(args.seed).choice(pool, args.queries, replace=False))
    query_images = [images[q] for q in queries]
    query_labels, query_ids = labels[queries], ids[queries]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    fast = not args.fp32
    models = load_models(args.ckpt, untrained=not args.no_untrained, fast=fast)

    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "num_queries": len(queries),
               "num_gallery": len(images), "embedding": "fp32" if args.fp32 else "channels-last + bf16 autocast",
               "num_classes": int(len(set(labels.tolist()))), "degradations": [d.describe() for d in suite],
               "options": {o: load_option(o).describe() for o in args.options}, "results": {}, "auto_steps": {},
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
            degraded = [degradation(image, seed=args.seed * 1_000_003 + int(k)) for k, image in zip(queries, query_images)]
            for option in tqdm(todo, desc=degradation.name):
                processed, steps, ms = preprocess_all(option, degraded, pool)
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
        lines = ["Quality measurements on emoji train images (percentiles 0/1/5/50/95/99/100):", "",
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
    gallery = f"{args.split}{' + train' if args.split == 'val' else ''}"
    print(f"\nEmoji {args.split} split, {len(queries)} queries (each degraded, searched against the {len(images)} clean "
          f"{gallery} images, itself excluded), {payload['embedding']}, seed {args.seed}:\n\n{report}")
    return 0


def emoji_catalog(root: Path, split: str):
    """The emoji catalog; for ``split="val"`` with the validation classes held out of the training split exactly
    as ``data=emoji`` training holds them out (its ``val_classes`` and ``val_seed``)."""
    if split == "test":
        return read_emoji(root, fetch=False)
    from cbir.configs import load_option
    from cbir.data.readers import catalog_from_config

    config = load_option("data", "emoji")
    config.root = str(root)
    config.reader.fetch = False
    return catalog_from_config(config)


class _no_pool:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
