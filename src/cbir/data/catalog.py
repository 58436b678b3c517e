"""What every dataset reader returns: a :class:`Catalog` of :class:`Record` s (no pixels read).

A record names where its pixels are (a file path, or a row of an in-memory array for datasets that ship
as arrays, like Fashion-MNIST), its class label, its split, and optionally its retrieval role. Pixels are
loaded later (:mod:`cbir.data.images`, :class:`cbir.data.datasets.RecordDataset`).

Evaluation sets are chosen with *selectors*: ``"test"`` (every record of split ``test``),
``"test:query"`` (records of split ``test`` with role ``query``), ``"test@google"`` (of domain google).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbir.errors import DataError

NO_LABEL = -1  # Record.label of an image whose collection gives it no class


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
    variant: str | None = None  # a variant view of its class (emoji skin tone); None for the base view


@dataclass
class Catalog:
    """All records of one dataset, plus the arrays that array-backed records point into."""

    name: str
    records: list[Record]
    class_names: list[str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def select(self, selector: str) -> np.ndarray:
        """Indices of the records matching ``"split[:role][@domain][/base]"``, e.g. ``test``, ``test:query``,
        ``test@google``, ``test/base`` (base views only, no variants); ``+`` joins selectors
        (``train+val``)."""
        chosen = sorted({int(i) for part in selector.split("+") for i in self._select_one(part.strip())})
        return np.asarray(chosen, dtype=np.int64)

    def _select_one(self, selector: str) -> list[int]:
        rest, _, base = selector.partition("/")
        if base not in ("", "base"):
            raise DataError(f"{self.name}: selector '{selector}': only '/base' may follow the split")
        rest, _, domain = rest.partition("@")
        split, _, role = rest.partition(":")
        chosen = [i for i, r in enumerate(self.records)
                  if r.split == split and (not role or r.role in (role, None)) and (not domain or r.domain == domain)
                  and (not base or r.variant is None)]
        if not chosen:
            available = sorted({r.split for r in self.records})
            domains = sorted({r.domain for r in self.records if r.domain})
            raise DataError(f"{self.name}: no records match '{selector}' (splits: {', '.join(available)}"
                            + (f"; domains: {', '.join(domains)})" if domains else ")"))
        return chosen

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


def record_source(catalog: Catalog, record: Record) -> str:
    """A record's image as one string: its path, or ``<dataset>:<array>/<row>`` for array-backed data."""
    if isinstance(record.source, ArrayRef):
        return f"{catalog.name}:{record.source.array}/{record.source.index}"
    return str(record.source)


def parse_array_source(source: str) -> tuple[str, str, int] | None:
    """``fashion_mnist:train_images/12`` → ("fashion_mnist", "train_images", 12), the inverse of
    :func:`record_source` for array-backed records; None for a file path."""
    name, sep, rest = source.partition(":")
    if not sep or "/" not in rest or not name.isidentifier() or Path(source).exists():
        return None
    array, _, row = rest.rpartition("/")
    return (name, array, int(row)) if row.isdigit() and array else None


def record_label(catalog: Catalog, record: Record) -> str | None:
    """A record's class name; None for an unlabelled image."""
    return None if record.label == NO_LABEL else catalog.class_names[record.label]
