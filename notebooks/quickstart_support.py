"""Helpers for ``quickstart.ipynb`` that are not part of the tutorial itself: a small stand-in bundle and
index when ``make demo`` has not been run (and in CI), and sampling labelled images from a collection.

Kept out of the notebook so its cells show only the API a user calls."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cbir.errors import DataError

STANDIN_BACKBONE = "mobilenet_v2"
STANDIN_IMAGE_SIZE = 32
STANDIN_GALLERY_SIZE = 600  # images indexed by the stand-in (a random subset of the gallery split)
SYNTHETIC_CLASSES = [(shape, colour) for shape in ("circle", "square", "triangle", "cross")
                     for colour in ("red", "blue")]


@dataclass
class StandIn:
    """Where the stand-in put its bundle and index, and what to query it with."""

    bundle: Path
    index: Path
    queries: str      # a collection spec (folder or ``<data>:<split>``) with labelled query images
    data: str         # "fashion_mnist" or "synthetic"
    pretrained: str   # "imagenet", or "none" when the ImageNet weights are not in torch's cache


def build_standin(out_dir: str | Path, data: str = "auto", gallery_size: int = STANDIN_GALLERY_SIZE,
                  seed: int = 0) -> StandIn:
    """Export an untrained MobileNetV2 (ImageNet weights when cached) as a bundle and index a few hundred
    images with it, under ``out_dir`` (replaced). ``data``: ``fashion_mnist`` (the local copy; never
    downloaded), ``synthetic`` (coloured shapes drawn here), or ``auto`` (Fashion-MNIST when present)."""
    from cbir.export.bundle import export_bundle, load_bundle
    from cbir.index.collection import Collection, read_collection
    from cbir.index.pipeline import build_bundle_index
    from cbir.models.from_config import embedder_from_model_config
    from cbir.models.weights import imagenet_cache_path

    if data not in ("auto", "fashion_mnist", "synthetic"):
        raise DataError(f"CBIR_QUICKSTART_DATA={data!r}: choose auto, fashion_mnist or synthetic")
    if data == "auto":
        data = "fashion_mnist" if fashion_mnist_available() else "synthetic"
    elif data == "fashion_mnist" and not fashion_mnist_available():
        raise DataError("Fashion-MNIST is not on this machine: run `cbir data fetch fashion_mnist`, "
                        "or set CBIR_QUICKSTART_DATA=synthetic")
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)  # our own scratch folder: rebuilt each time (a few seconds)
    out.mkdir(parents=True)

    if data == "fashion_mnist":
        gallery_spec, queries = "fashion_mnist:train", "fashion_mnist:test"
    else:
        gallery_spec, queries = write_synthetic_images(out / "images", seed=seed)

    pretrained = "imagenet" if imagenet_cache_path(STANDIN_BACKBONE).is_file() else "none"
    model_config = {"backbone": STANDIN_BACKBONE, "image_size": STANDIN_IMAGE_SIZE,
                    "head": {"_target_": "cbir.models.pooling.GeMHead", "_partial_": True, "dim": 128,
                             "bn": True, "stage": None, "p": 3.0}}
    embedder = embedder_from_model_config(model_config, pretrained).eval()
    bundle_dir = export_bundle(embedder, out / "bundle", model_config=model_config, runtimes=[],
                               source=f"quickstart stand-in: {STANDIN_BACKBONE} (pretrained={pretrained}, "
                                      "not trained)")
    bundle = load_bundle(bundle_dir)

    gallery = read_collection(gallery_spec)
    if len(gallery) > gallery_size:
        rows = np.sort(np.random.default_rng(seed).choice(gallery.indices, gallery_size, replace=False))
        gallery = Collection(f"{gallery_spec} ({gallery_size}-image subset)", gallery.catalog, rows)
    build_bundle_index(bundle, gallery, out / "index", num_workers=0, progress=False)
    return StandIn(bundle_dir, out / "index", queries, data, pretrained)


def fashion_mnist_available() -> bool:
    """True when Fashion-MNIST's files are on this machine (nothing is downloaded to find out)."""
    from cbir.data.readers.fashion_mnist import read_fashion_mnist

    try:
        read_fashion_mnist(download=False)
    except DataError:
        return False
    return True


def write_synthetic_images(root: Path, per_class: int = 30, queries_per_class: int = 10, size: int = 32,
                           seed: int = 0) -> tuple[str, str]:
    """Coloured shapes on noisy backgrounds, one folder per class (``red circle``, ...), split into
    ``gallery/`` and ``queries/``; returns the two folders as collection specs."""
    rng = np.random.default_rng(seed)
    for split, count in (("gallery", per_class), ("queries", queries_per_class)):
        for shape, colour in SYNTHETIC_CLASSES:
            folder = root / split / f"{colour} {shape}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                _draw_shape(shape, colour, size, rng).save(folder / f"{n:03d}.png")
    return str(root / "gallery"), str(root / "queries")


def _draw_shape(shape: str, colour: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(170, 256, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2))
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    else:
        width = max(2, radius // 2)
        draw.line([(cx - radius, cy), (cx + radius, cy)], fill=colour, width=width)
        draw.line([(cx, cy - radius), (cx, cy + radius)], fill=colour, width=width)
    return image


def sample_collection(searcher, spec: str, count: int, seed: int = 0) -> tuple[list[np.ndarray], list[str | None],
                                                                                list[str]]:
    """``count`` images drawn at random (in random order) from collection ``spec`` (a folder, CSV or
    ``<data>:<split>``): their RGB pixels, labels and sources, read the way the Searcher reads indexed images."""
    from cbir.index.collection import read_collection

    collection = read_collection(spec)
    rows = collection.indices
    if len(rows) > count:
        rows = np.random.default_rng(seed).choice(rows, count, replace=False)  # random order: mixed classes
    sources = [collection.source(int(i)) for i in rows]
    return ([searcher.load_source(s) for s in sources], [collection.label(int(i)) for i in rows], sources)

