"""Extraction speed of an exported bundle vs the bare model it holds (the issue's overhead < 10 % target).

One bundle (ImageNet MobileNetV2 + GeM head by default, as a user would export it), one collection (the
emoji test split: 4,152 PNG files), three ways, interleaved over ``--repeats`` rounds:

- ``bare``: the torchvision-based Embedder in a plain ``torch.inference_mode()`` loop over batches that were
  decoded and normalised into memory beforehand (untimed) — the model's own speed;
- ``bundle.embed``: ``load_bundle(...).embed(images)`` on the same decoded uint8 images (preprocessing included);
- ``extract``: ``cbir.index.extract.extract_collection`` over the files — decoding in DataLoader workers,
  batching, shards written to disk: what ``cbir index build`` / ``export.py index.collection=`` run.

    python benchmarks/bundle_extract.py --out benchmarks/results/bundle_extract_cpu.json
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cbir.data.images import load_image  # noqa: E402
from cbir.evaluation.report import write_json  # noqa: E402
from cbir.export.bundle import export_bundle, load_bundle  # noqa: E402
from cbir.index.collection import read_collection  # noqa: E402
from cbir.index.extract import extract_collection  # noqa: E402
from cbir.models.embedder import build_embedder  # noqa: E402
from cbir.models.inference import embed, prepare_for_inference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", default="emoji:test")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bundle_extract_cpu.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cbir-bundle-extract-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # a bundle and extracted shards
    embedder = build_embedder(args.backbone, pretrained="imagenet", image_size=args.image_size)
    bundle = load_bundle(export_bundle(embedder, work / "bundle", runtimes=[],
                                       model_config={"backbone": args.backbone, "image_size": args.image_size,
                                                     "head": {"_target_": "cbir.models.pooling.GeMHead",
                                                              "_partial_": True}}))
    collection = read_collection(args.collection)
    images = [load_image(collection.catalog, collection.catalog.records[int(i)].source) for i in collection.indices]
    tensors = bundle.to_tensor(images)
    n = len(images)
    model = prepare_for_inference(bundle.embedder, channels_last=True)

    def bare() -> None:
        for start in range(0, n, args.batch_size):
            embed(model, tensors[start:start + args.batch_size], channels_last=True)

    def bundle_embed() -> None:
        for start in range(0, n, args.batch_size):
            bundle.embed(images[start:start + args.batch_size], channels_last=True)

    def extract(round_: int) -> None:
        extract_collection(bundle.embedder, collection, work / f"shards{round_}", batch_size=args.batch_size,
                           num_workers=args.num_workers, channels_last=True, progress=False, resume=False)

    bare()  # warm-up (oneDNN kernels, allocator)
    timings: dict[str, list[float]] = {"bare": [], "bundle.embed": [], "extract": []}
    for round_ in range(args.repeats):
        for name, run in (("bare", bare), ("bundle.embed", bundle_embed), ("extract", lambda: extract(round_))):
            started = time.perf_counter()
            run()
            timings[name].append(n / (time.perf_counter() - started))
    speeds = {name: statistics.median(values) for name, values in timings.items()}
    rows = [{"variant": name, "images_per_second": round(speed, 1),
             "overhead_vs_bare": round(1 - speed / speeds["bare"], 4), "rounds": timings[name]}
            for name, speed in speeds.items()]
    print(f"\n{args.backbone} at {args.image_size} px, {n} images of {args.collection}, batch {args.batch_size}, "
          f"{args.num_workers} workers, torch threads {torch.get_num_threads()}, median of {args.repeats}:")
    print("| variant | img/s | overhead vs bare |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['images_per_second']:.1f} | {100 * row['overhead_vs_bare']:.1f}% |")
    write_json(args.out, {"benchmark": "bundle_extract", "collection": args.collection, "backbone": args.backbone,
                          "image_size": args.image_size, "batch_size": args.batch_size,
                          "num_workers": args.num_workers, "images": n, "threads": torch.get_num_threads(),
                          "load_average": list(os.getloadavg()), "rows": rows})


if __name__ == "__main__":
    main()
