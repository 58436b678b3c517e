"""Tiny image datasets written to disk: class-per-folder PNGs and Fashion-MNIST's IDX files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image


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


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` as a gzipped IDX file of unsigned bytes (Fashion-MNIST's format)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
