"""A tiny bundle + flat index over class-folder PNGs, shared by the service, browser and fuzz tests."""

from __future__ import annotations

from pathlib import Path

from cbir.search import Searcher
from helpers.configs import compose_config
from helpers.data import write_class_images


def build_tiny_search(root: Path) -> tuple[Searcher, Path]:
    """(Searcher, collection folder): untrained resnet18 at 32 px, 16-d, 6 classes x 4 PNGs."""
    from cbir.export.bundle import export_bundle, load_bundle
    from cbir.index import build_collection_index, load_index
    from cbir.training.factory import build_embedder_from_config, model_config

    collection = root / "collection"
    write_class_images(collection, num_classes=6, per_class=4, size=24)
    cfg = compose_config("train", ["model=resnet18", "model.pretrained=none", "model.image_size=32",
                                   "head=gem", "head.dim=16"])
    embedder = build_embedder_from_config(cfg)
    bundle_dir = export_bundle(embedder, root / "bundle", model_config=model_config(cfg), runtimes=[],
                               query_preprocess={"steps": []})
    bundle = load_bundle(bundle_dir)
    build_collection_index(bundle.embedder, collection, bundle_dir / "index", kind="flat", num_workers=0,
                           progress=False)
    # fp32: these tests compare scores to 4 decimals between batched and single queries
    searcher = Searcher(bundle, load_index(bundle_dir / "index"), precision="fp32")  # the bundle is loaded once
    return searcher, collection
