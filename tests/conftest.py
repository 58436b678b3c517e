"""Shared fixtures: tiny on-disk datasets in the official layouts, and config composition."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from cbir.configs import config_dir

ROOT = Path(__file__).resolve().parents[1]


def write_class_images(folder: Path, num_classes: int = 6, per_class: int = 4, size: int = 24,
                       seed: int = 0) -> list[Path]:
    """Class-per-folder PNGs: each class a distinct colour pattern plus noise (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(num_classes):
        base = rng.integers(0, 256, size=(1, 1, 3))
        stripe = rng.integers(2, 6)
        for i in range(per_class):
            pixels = np.broadcast_to(base, (size, size, 3)).copy().astype(np.int16)
            pixels[::stripe] = 255 - pixels[::stripe]
            pixels += rng.integers(-30, 30, size=pixels.shape)
            path = folder / f"class_{c:02d}" / f"img_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_folder")
    write_class_images(root)
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_fashion_mnist(tmp_path_factory) -> Path:
    """The four Fashion-MNIST files in the official IDX format, with 40 train / 20 test images."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 20, size=(n, 28, 28))).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def tiny_train_overrides(data_root: Path, output_dir: Path, hold_out_validation: bool = False) -> list[str]:
    """A training config small enough for a unit test: 32 px folder data, no weights, no logger. The tiny
    folder has 3 training classes, too few to also hold one out (a batch of 6 at m=2 needs 3 classes):
    unless ``hold_out_validation``, these mechanics tests validate on the test classes."""
    return [
        "data=folder", f"data.root={data_root}", "data.image_size=32", "data.batch_size=6",
        "data.m_per_class=2", "data.eval_batch_size=16", "data.num_workers=0", "model.pretrained=none",
        "head.dim=16", "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", f"paths.output_dir={output_dir}",
        *([] if hold_out_validation else ["data.val_classes=null", "data.val.queries=test"]),
    ]


def clustered(n: int, dim: int = 32, centres: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``centres`` random centres: data an IVF index can partition."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim))
    x = means[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """Tiny indexes: OpenMP threads only spin-wait on a shared machine (6x slower wall time measured).
    Index test modules use it with ``pytestmark = pytest.mark.usefixtures("one_faiss_thread")``."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
