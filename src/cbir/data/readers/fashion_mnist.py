"""Fashion-MNIST (70k 28x28 grey, 10 classes) as in-memory arrays, from the Debian package, a folder of
IDX files, or torchvision's download."""

from __future__ import annotations

import gzip
import logging
import os
import struct
from pathlib import Path

import numpy as np

from cbir.data.catalog import ArrayRef, Catalog, Record
from cbir.errors import DataError
from cbir.net import host_reachable

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_fashion_mnist(root: str | os.PathLike | None = None, download: bool = True) -> Catalog:
    """Fashion-MNIST as arrays: splits ``train`` (60k) and ``test`` (10k), 28x28 grey.

    Looks in ``root`` when it is given (and only there: a folder the user named is never swapped for a
    copy found elsewhere), else in the Debian package's ``/usr/share/datasets/fashion-mnist`` and
    ``data/fashion-mnist`` (torchvision's download layout included); downloads with torchvision only
    when none has the files and ``download`` is true.
    """
    candidates = [Path(root)] if root else [FASHION_MNIST_DEBIAN_DIR, Path("data/fashion-mnist")]
    folder = next((c for c in candidates if _find_idx_folder(c) is not None), None)
    if folder is None and download:
        folder = _download_fashion_mnist(Path(root) if root else Path("data/fashion-mnist"))
    if folder is None:
        raise DataError(
            "Fashion-MNIST not found (looked in " + ", ".join(str(c) for c in candidates) + "). "
            "Install the Debian package (sudo apt-get install dataset-fashion-mnist), run "
            "`cbir data fetch fashion_mnist` on a connected machine, or set data.root to a folder "
            "with the four *-idx?-ubyte[.gz] files."
        )
    idx_dir = _find_idx_folder(folder)
    assert idx_dir is not None
    records: list[Record] = []
    arrays: dict[str, np.ndarray] = {}
    for split, (images_name, labels_name) in _FASHION_MNIST_FILES.items():
        images = read_idx(_idx_file(idx_dir, images_name))
        labels = read_idx(_idx_file(idx_dir, labels_name))
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST in {idx_dir}: {images_name} and {labels_name} do not match")
        arrays[split] = images
        records.extend(Record(ArrayRef(split, i), int(y), split) for i, y in enumerate(labels))
    return Catalog("fashion_mnist", records, list(FASHION_MNIST_CLASSES), arrays)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _find_idx_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder / "FashionMNIST" / "raw"):
        if all(_idx_file(candidate, n) for pair in _FASHION_MNIST_FILES.values() for n in pair):
            return candidate
    return None


def read_idx(path: Path | None) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not."""
    if path is None:
        raise DataError("IDX file missing")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape).copy()
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX data ({exc})") from None


def _download_fashion_mnist(target: Path) -> Path | None:
    from urllib.parse import urlparse

    from torchvision.datasets import FashionMNIST

    mirror = urlparse(FashionMNIST.mirrors[0])
    if not host_reachable(mirror.hostname or "", port=mirror.port or (443 if mirror.scheme == "https" else 80)):
        return None

    log.info("downloading Fashion-MNIST into %s", target)
    for train in (True, False):
        FashionMNIST(str(target), train=train, download=True)
    return target
