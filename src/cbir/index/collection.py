"""What to index: a collection spec (folder, CSV, or a dataset config's split) as the records of a
:class:`~cbir.data.catalog.Catalog`.

Specs, in the order they are tried:

- an existing folder: every image under it, recursively; the label is the image's parent folder relative
  to the root (``cats/tabby/1.jpg`` → ``cats/tabby``), none for images directly in the root; paths are
  stored absolute (a folder or CSV given relative to the current folder is resolved first);
- an existing ``.csv`` file: rows ``path[,label]`` (more columns: :func:`cbir.data.readers.csv.read_csv`);
- ``<data config>[:<selector>]``: a shipped data config (``emoji:test``, ``fashion_mnist:train``,
  ``emoji:test@google``), its reader's records matching the selector (all records without one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.data.catalog import Catalog, record_label, record_source
from cbir.data.readers import read_data_config
from cbir.data.readers.csv import read_path_list
from cbir.data.readers.folder import read_image_tree
from cbir.errors import DataError


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

    def subset(self, indices: np.ndarray) -> Collection:
        return Collection(self.spec, self.catalog, np.asarray(indices, dtype=np.int64))


def read_collection(spec: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> Collection:
    """The records a collection spec names (see the module docstring; ``config_dir``: where data configs
    are looked up, default the shipped ones); an empty one is a DataError."""
    text = str(spec)
    path = Path(text)
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".csv"):
        # stored paths must not depend on the folder the command ran in: a later `add` from elsewhere
        # would index the same images again, and the service could not find them
        path = path.resolve()
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
