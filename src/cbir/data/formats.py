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
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbir.errors import DataError
from cbir.net import host_reachable

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
    box: tuple[float, float, float, float] | None = None  # (x, y, w, h) in pixels: load only this crop
    super_label: int | None = None  # the dataset's own coarse class id (SOP super_class_id), if any
    domain: str | None = None  # where the image comes from when a protocol crosses sources (emoji vendor)


@dataclass
class Catalog:
    """All records of one dataset, plus the arrays that array-backed records point into."""

    name: str
    records: list[Record]
    class_names: list[str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def select(self, selector: str) -> np.ndarray:
        """Indices of the records matching ``"split[:role][@domain]"``, e.g. ``test``, ``test:query``,
        ``test@google``."""
        rest, _, domain = selector.partition("@")
        split, _, role = rest.partition(":")
        chosen = [i for i, r in enumerate(self.records)
                  if r.split == split and (not role or r.role in (role, None)) and (not domain or r.domain == domain)]
        if not chosen:
            available = sorted({r.split for r in self.records})
            domains = sorted({r.domain for r in self.records if r.domain})
            raise DataError(f"{self.name}: no records match '{selector}' (splits: {', '.join(available)}"
                            + (f"; domains: {', '.join(domains)})" if domains else ")"))
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
    from urllib.parse import urlparse

    from torchvision.datasets import FashionMNIST

    mirror = urlparse(FashionMNIST.mirrors[0])
    if not host_reachable(mirror.hostname or "", port=mirror.port or (443 if mirror.scheme == "https" else 80)):
        return None

    log.info("downloading Fashion-MNIST into %s", target)
    for train in (True, False):
        FashionMNIST(str(target), train=train, download=True)
    return target


# ---------------------------------------------------------------------------------------------------
# Class-per-folder tree and CSV
# ---------------------------------------------------------------------------------------------------
def read_folder(root: str | os.PathLike, test_fraction: float = 0.5,
                test_classes_file: str | os.PathLike | None = None) -> Catalog:
    """One sub-folder per class. If ``root`` has ``train/`` and ``test/`` sub-trees they are the splits.
    Otherwise the split is by class (zero-shot): the classes named in ``test_classes_file`` (one per
    line) are ``test``, or, without a list, the last ``test_fraction`` of the classes sorted by name
    (``test_fraction=0`` puts everything in ``train``)."""
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
        test_classes = _test_classes(class_names, test_fraction, test_classes_file)
        label_of = {name: i for i, name in enumerate(class_names)}
        records = [Record(str(p), label_of[p.parent.name], "test" if p.parent.name in test_classes else "train")
                   for p in _images_in_class_dirs(root)]
    if not records:
        raise DataError(f"data.root: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return Catalog(root.name or "folder", records, class_names)


def _test_classes(class_names: list[str], test_fraction: float,
                  test_classes_file: str | os.PathLike | None) -> set[str]:
    if test_classes_file is not None:
        path = Path(test_classes_file)
        if not path.is_file():
            raise DataError(f"data.test_classes_file: {path} does not exist (one class folder name per line)")
        listed = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        unknown = sorted(listed - set(class_names))
        if unknown:
            raise DataError(f"{path}: {len(unknown)} listed classes have no folder (first: {unknown[0]!r})")
        return listed
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in [0, 1), got {test_fraction}")
    num_test = int(round(len(class_names) * test_fraction))
    return set(class_names[len(class_names) - num_test:])


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


# ---------------------------------------------------------------------------------------------------
# Retrieval benchmarks: CUB-200-2011, Cars196, Stanford Online Products, In-Shop Clothes
# ---------------------------------------------------------------------------------------------------
CUB200_LAYOUT = ("CUB-200-2011 layout: root/images.txt (id path), image_class_labels.txt (id class), "
                 "classes.txt (class name), bounding_boxes.txt (id x y w h), images/<path>")
CARS196_LAYOUT = ("Stanford Cars layout: root/cars_annos.mat (annotations: relative_im_path, bbox_x1, "
                  "bbox_y1, bbox_x2, bbox_y2, class, test; class_names), root/car_ims/")
SOP_LAYOUT = ("Stanford Online Products layout: root/Ebay_train.txt and root/Ebay_test.txt "
              "(header: image_id class_id super_class_id path), paths relative to root")
INSHOP_LAYOUT = ("In-Shop layout: root/list_eval_partition.txt (count line, header line: image_name item_id "
                 "evaluation_status, rows with status train/query/gallery), root/img/")


def read_cub200(root: str | os.PathLike, crop_boxes: bool = False) -> Catalog:
    """CUB-200-2011 with the zero-shot protocol: the first half of the classes (1-100) train, the rest
    (101-200) test. ``crop_boxes`` loads only each bird's box from ``bounding_boxes.txt``."""
    root = Path(root)
    paths = dict(_read_table(root / "images.txt", (int, str), CUB200_LAYOUT))
    classes = dict(_read_table(root / "classes.txt", (int, str), CUB200_LAYOUT))
    class_of = dict(_read_table(root / "image_class_labels.txt", (int, int), CUB200_LAYOUT))
    _require_same_ids(root / "image_class_labels.txt", paths, class_of)
    boxes = {}
    if crop_boxes:
        rows = _read_table(root / "bounding_boxes.txt", (int, float, float, float, float), CUB200_LAYOUT)
        boxes = {row[0]: row[1:] for row in rows}
        _require_same_ids(root / "bounding_boxes.txt", paths, boxes)
    label_of, split_of = _zero_shot_split(root / "classes.txt", classes, class_of.values(), CUB200_LAYOUT)
    records = [Record(str(root / "images" / path), label_of[class_of[i]], split_of[class_of[i]],
                      box=boxes.get(i)) for i, path in sorted(paths.items())]
    return Catalog("cub200", records, [classes[c] for c in sorted(classes)])


def read_cars196(root: str | os.PathLike, crop_boxes: bool = False) -> Catalog:
    """Stanford Cars (Cars196) with the zero-shot protocol: the first half of the classes (1-98) train,
    the rest (99-196) test; the file's own ``test`` flag (a classification split) is ignored.
    ``crop_boxes`` loads only each car's box."""
    root = Path(root)
    path = root / "cars_annos.mat"
    if not path.is_file():
        raise DataError(f"{path} does not exist (expected {CARS196_LAYOUT})")
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path, squeeze_me=True)
        annotations, names = np.atleast_1d(mat["annotations"]), np.atleast_1d(mat["class_names"])
        columns = {key: annotations[key] for key in ("relative_im_path", "class", "bbox_x1", "bbox_y1",
                                                     "bbox_x2", "bbox_y2")}
    except (OSError, ValueError, KeyError, IndexError, TypeError, MatReadError, NotImplementedError) as exc:
        raise DataError(f"{path}: cannot read annotations ({exc}); expected {CARS196_LAYOUT}") from None
    classes = {i: str(name) for i, name in enumerate(names, start=1)}
    class_ids = [int(c) for c in columns["class"]]
    label_of, split_of = _zero_shot_split(path, classes, class_ids, CARS196_LAYOUT)
    records = []
    for k, (image, class_id) in enumerate(zip(columns["relative_im_path"], class_ids)):
        x1, y1, x2, y2 = (float(columns[key][k]) for key in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        box = (x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1) if crop_boxes else None  # 1-based, inclusive
        records.append(Record(str(root / str(image)), label_of[class_id], split_of[class_id], box=box))
    return Catalog("cars196", records, [classes[c] for c in sorted(classes)])


def read_sop(root: str | os.PathLike) -> Catalog:
    """Stanford Online Products: splits from ``Ebay_train.txt`` / ``Ebay_test.txt`` (disjoint products);
    a class is one product (``class_id``), and the product category (``super_class_id``) is kept as
    ``Record.super_label``."""
    root = Path(root)
    rows = {split: _read_table(root / f"Ebay_{split}.txt", (int, int, int, str), SOP_LAYOUT, skip=1)
            for split in ("train", "test")}
    class_ids = sorted({class_id for table in rows.values() for _, class_id, _, _ in table})
    label_of = {class_id: i for i, class_id in enumerate(class_ids)}
    records = [Record(str(root / path), label_of[class_id], split, super_label=super_id)
               for split, table in rows.items() for _, class_id, super_id, path in table]
    return Catalog("sop", records, [str(c) for c in class_ids])


def read_inshop(root: str | os.PathLike) -> Catalog:
    """DeepFashion In-Shop Clothes Retrieval: splits ``train``, ``query`` and ``gallery`` from
    ``list_eval_partition.txt``; a class is one item (``item_id``), shared by its queries and gallery."""
    root = Path(root)
    path = root / "list_eval_partition.txt"
    rows = _read_table(path, (str, str, str), INSHOP_LAYOUT, skip=2)
    for image, _, status in rows:
        if status not in ("train", "query", "gallery"):
            raise DataError(f"{path}: {image} has status {status!r}; expected train, query or gallery")
    items = sorted({item for _, item, _ in rows})
    label_of = {item: i for i, item in enumerate(items)}
    records = [Record(str(root / image), label_of[item], status) for image, item, status in rows]
    return Catalog("inshop", records, items)


def _read_table(path: Path, types: Sequence[type], layout: str, skip: int = 0) -> list[tuple]:
    """Whitespace-separated rows of an annotation file (after ``skip`` header lines), each field
    converted by ``types``; a missing file or malformed row is a :class:`DataError` naming the layout."""
    if not path.is_file():
        raise DataError(f"{path} does not exist (expected {layout})")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines()[skip:], start=skip + 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != len(types):
                raise ValueError
            rows.append(tuple(convert(value) for convert, value in zip(types, fields)))
        except ValueError:
            raise DataError(f"{path}: line {line_no} is {line.strip()!r}; expected {len(types)} fields "
                            f"({layout})") from None
    if not rows:
        raise DataError(f"{path}: no rows (expected {layout})")
    return rows


def _require_same_ids(path: Path, images: dict, annotations: dict) -> None:
    """Every CUB image needs its annotation (and vice versa): a partial copy of the files is a user error."""
    if images.keys() != annotations.keys():
        example = min(images.keys() ^ annotations.keys())
        raise DataError(f"{path} and images.txt disagree on image ids (e.g. {example}); "
                        f"expected {CUB200_LAYOUT}")


def _zero_shot_split(path: Path, classes: dict[int, str], used: Iterable[int],
                     layout: str) -> tuple[dict[int, int], dict[int, str]]:
    """Label (position among the sorted class ids) and split of each class id: the first half of the
    sorted ids is ``train``, the second ``test`` — the benchmarks' zero-shot protocol (unseen classes)."""
    unknown = set(used) - classes.keys()
    if unknown:
        raise DataError(f"{path}: class {min(unknown)} is not in the class list (expected {layout})")
    ids = sorted(classes)
    label_of = {class_id: i for i, class_id in enumerate(ids)}
    split_of = {class_id: "train" if i < len(ids) // 2 else "test" for i, class_id in enumerate(ids)}
    return label_of, split_of
