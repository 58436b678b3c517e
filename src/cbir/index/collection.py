"""What to index: a collection spec (folder, CSV, or a dataset config's split) as a :class:`Catalog`.

Specs, in the order they are tried:

- an existing folder: every image under it, recursively; the label is the image's parent folder relative
  to the root (``cats/tabby/1.jpg`` → ``cats/tabby``), none for images directly in the root;
- an existing ``.csv`` file: rows ``path[,label]`` (more columns: :func:`cbir.data.formats.read_csv`);
- ``<data config>[:<selector>]``: a config of ``conf/data/`` (``emoji:test``, ``fashion_mnist:train``,
  ``emoji:test@google``), its reader's records matching the selector (all records without one).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.data.formats import IMAGE_EXTENSIONS, ArrayRef, Catalog, Record, read_csv
from cbir.errors import DataError

NO_LABEL = -1  # Record.label of an image whose collection gives it no class


@dataclass
class Collection:
    """The records to index: ``catalog.records[i]`` for ``i`` in ``indices``."""

    spec: str
    catalog: Catalog
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def source(self, index: int) -> str:
        return record_source(self.catalog, self.catalog.records[index])

    def label(self, index: int) -> str | None:
        return record_label(self.catalog, self.catalog.records[index])


def record_source(catalog: Catalog, record: Record) -> str:
    """A record's image as one string: its path, or ``<dataset>:<array>/<row>`` for array-backed data."""
    if isinstance(record.source, ArrayRef):
        return f"{catalog.name}:{record.source.array}/{record.source.index}"
    return str(record.source)


def record_label(catalog: Catalog, record: Record) -> str | None:
    return None if record.label == NO_LABEL else catalog.class_names[record.label]


def read_collection(spec: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> Collection:
    """The records a collection spec names (see the module docstring); an empty one is a DataError."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        catalog = read_image_tree(path)
        indices = np.arange(len(catalog.records))
    elif path.is_file() and path.suffix.lower() == ".csv":
        catalog = read_path_list(path)
        indices = np.arange(len(catalog.records))
    else:
        name, _, selector = text.partition(":")
        catalog = read_data_config(name, text, config_dir)
        indices = catalog.select(selector) if selector else np.arange(len(catalog.records))
    if len(indices) == 0:
        raise DataError(f"collection {text}: no images to index (add images, or check the spec)")
    return Collection(text, catalog, np.asarray(indices, dtype=np.int64))


def read_image_tree(root: Path) -> Catalog:
    """Every image under ``root`` (recursive, sorted), labelled by its parent folder relative to ``root``."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"collection {root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under it")
    folders = [p.parent.relative_to(root).as_posix() for p in paths]
    class_names = sorted({f for f in folders if f != "."})
    label_of = {name: i for i, name in enumerate(class_names)}
    records = [Record(str(p), label_of.get(f, NO_LABEL), "collection") for p, f in zip(paths, folders)]
    return Catalog(root.resolve().name or "collection", records, class_names)


def read_path_list(path: Path) -> Catalog:
    """A CSV of ``path[,label]`` rows (optional header ``path[,label]``); relative paths are taken from the
    CSV's folder. Rows with a label in every row go through :func:`read_csv` (which also takes split/role)."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and row[0].strip() and not row[0].startswith("#")]
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    if not rows:
        raise DataError(f"collection {path}: no rows (expected path[,label] per line)")
    if all(len(row) >= 2 and row[1].strip() for row in rows):
        return read_csv(path)
    if any(len(row) > 1 and row[1].strip() for row in rows):
        raise DataError(f"collection {path}: some rows have a label and some do not; label all or none")
    records = [Record(row[0].strip() if os.path.isabs(row[0].strip()) else str(path.parent / row[0].strip()),
                      NO_LABEL, "collection") for row in rows]
    return Catalog(path.stem, records, [])


def read_data_config(name: str, spec: str, config_dir: str | os.PathLike | None = None) -> Catalog:
    """The catalog of ``conf/data/<name>.yaml``'s reader, built by :func:`cbir.factory.build_catalog`."""
    from omegaconf import OmegaConf

    from cbir.entry import config_dir as default_config_dir

    folder = Path(config_dir) if config_dir else default_config_dir()
    config = folder / "data" / f"{name}.yaml"
    if not name or not config.is_file():
        known = sorted(p.stem for p in (folder / "data").glob("*.yaml"))
        raise DataError(f"collection {spec}: not a folder, a .csv file or a data config "
                        f"(<name>[:split], name one of: {', '.join(known)})")
    from cbir.factory import build_catalog

    cfg = OmegaConf.create({"data": OmegaConf.load(config)})
    return build_catalog(cfg.data)
