"""Dataset readers: each format becomes one :class:`Catalog` of :class:`Record` s (no pixels read).

A record names where its pixels are (a file path, or a row of an in-memory array for datasets that ship
as arrays, like Fashion-MNIST), its class label, its split, and optionally its retrieval role. Pixels are
loaded later, by :class:`cbir.data.datamodule.RecordDataset`.

Evaluation sets are chosen with *selectors*: ``"test"`` (every record of split ``test``) or
``"test:query"`` (records of split ``test`` with role ``query``).
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbir.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True, slots=True)
class ArrayRef:
    """Row ``index`` of the catalog's in-memory array ``array``."""

    array: str
    index: int


@dataclass(frozen=True, slots=True)
class Record:
    source: str | ArrayRef  # image file path, or a reference into Catalog.arrays
    label: int  # index into Catalog.class_names
    split: str  # "train", "val", "test", "query", "gallery", ...
    role: str | None = None  # "query", "gallery" or None (both)


@dataclass
class Catalog:
    """All records of one dataset, plus the arrays that array-backed records point into."""

    name: str
    records: list[Record]
    class_names: list[str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def select(self, selector: str) -> np.ndarray:
        """Indices of the records matching ``"split"`` or ``"split:role"``."""
        split, _, role = selector.partition(":")
        chosen = [i for i, r in enumerate(self.records)
                  if r.split == split and (not role or r.role in (role, None))]
        if not chosen:
            available = sorted({r.split for r in self.records})
            raise DataError(f"{self.name}: no records match '{selector}' (splits: {', '.join(available)})")
        return np.asarray(chosen, dtype=np.int64)

    def labels(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        records = self.records if indices is None else [self.records[i] for i in indices]
        return np.fromiter((r.label for r in records), dtype=np.int64, count=len(records))

    def summary(self) -> str:
        parts = []
        for split in sorted({r.split for r in self.records}):
            labels = {r.label for r in self.records if r.split == split}
            count = sum(r.split == split for r in self.records)
            parts.append(f"{split}: {count} images / {len(labels)} classes")
        return f"{self.name} — " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------------
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_fashion_mnist(root: str | os.PathLike | None = None, download: bool = True) -> Catalog:
    """Fashion-MNIST as arrays: splits ``train`` (60k) and ``test`` (10k), 28x28 grey.

    Looks in ``root`` (if given), the Debian package's ``/usr/share/datasets/fashion-mnist``, and
    ``data/fashion-mnist`` (torchvision's download layout included); downloads with torchvision only
    when none has the files and ``download`` is true.
    """
    candidates = [Path(root)] if root else []
    candidates += [FASHION_MNIST_DEBIAN_DIR, Path("data/fashion-mnist")]
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
    if not host_reachable("fashion-mnist.s3-website.eu-central-1.amazonaws.com", port=80):
        return None
    from torchvision.datasets import FashionMNIST

    log.info("downloading Fashion-MNIST into %s", target)
    for train in (True, False):
        FashionMNIST(str(target), train=train, download=True)
    return target


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` (a quick offline check, no hang)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------
# Class-per-folder tree and CSV
# ---------------------------------------------------------------------------------------------------
def read_folder(root: str | os.PathLike, test_fraction: float = 0.5) -> Catalog:
    """One sub-folder per class. If ``root`` has ``train/`` and ``test/`` sub-trees they are the splits;
    otherwise classes are sorted by name and the last ``test_fraction`` of them form the zero-shot
    ``test`` split (``test_fraction=0`` puts everything in ``train``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist (expected one sub-folder per class)")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in split_dirs and len(split_dirs) > 1:
        class_names = sorted({d.name for s in split_dirs.values() for d in s.iterdir() if d.is_dir()})
        label_of = {name: i for i, name in enumerate(class_names)}
        records = [Record(str(p), label_of[p.parent.name], split)
                   for split, folder in split_dirs.items() for p in _images_in_class_dirs(folder)]
    else:
        class_names = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not class_names:
            raise DataError(f"data.root: {root} has no class sub-folders (expected root/<class>/<image>)")
        if not 0.0 <= test_fraction < 1.0:
            raise DataError(f"data.test_fraction must be in [0, 1), got {test_fraction}")
        first_test = len(class_names) - int(round(len(class_names) * test_fraction))
        label_of = {name: i for i, name in enumerate(class_names)}
        records = [Record(str(p), label_of[p.parent.name], "train" if label_of[p.parent.name] < first_test
                          else "test") for p in _images_in_class_dirs(root)]
    if not records:
        raise DataError(f"data.root: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return Catalog(root.name or "folder", records, class_names)


def _images_in_class_dirs(folder: Path) -> Iterable[Path]:
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                yield path


def read_csv(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Catalog:
    """Rows ``path,label[,split[,role]]`` (a header row is optional). Relative paths are resolved
    against ``root`` or the CSV's folder; missing split means ``train``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: CSV file {path} does not exist (rows: path,label[,split[,role]])")
    base = Path(root) if root else path.parent
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and not row[0].startswith("#")]
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    raw: list[tuple[str, str, str, str | None]] = []
    for line_no, row in enumerate(rows, start=1):
        if not 2 <= len(row) <= 4:
            raise DataError(f"{path}: row {line_no} has {len(row)} columns; expected path,label[,split[,role]]")
        row = [c.strip() for c in row] + [""] * (4 - len(row))
        role = row[3] or None
        if role not in (None, "query", "gallery"):
            raise DataError(f"{path}: row {line_no}: role must be query or gallery, got {role!r}")
        image = row[0] if os.path.isabs(row[0]) else str(base / row[0])
        raw.append((image, row[1], row[2] or "train", role))
    if not raw:
        raise DataError(f"{path}: no rows")
    class_names = sorted({label for _, label, _, _ in raw})
    label_of = {name: i for i, name in enumerate(class_names)}
    records = [Record(image, label_of[label], split, role) for image, label, split, role in raw]
    return Catalog(path.stem, records, class_names)
