"""CSV lists of images: ``path,label[,split[,role]]`` for training (:func:`read_csv`), ``path[,label]`` for
a collection to index (:func:`read_path_list`); :func:`read_rows` is the CSV reading both (and the pair
reader) share."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from cbir.data.catalog import NO_LABEL, Catalog, Record
from cbir.errors import DataError


def read_rows(path: Path, header: str, what: str) -> list[tuple[int, list[str]]]:
    """(line number, stripped cells) of each CSV row: blank rows and ``#`` comments skipped, an optional
    header row (first cell ``header``) dropped. ``what`` names the expected columns in errors."""
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist (rows: {what})")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(handle), start=1)
                    if row and row[0].strip() and not row[0].lstrip().startswith("#")]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable UTF-8 CSV file ({exc}); expected rows {what}") from None
    if rows and rows[0][1][0].lower() == header:
        rows = rows[1:]
    if not rows:
        raise DataError(f"{path}: no rows (expected {what})")
    return rows


def resolve(image: str, base: Path) -> str:
    """A CSV's image path: absolute as given, relative to ``base`` otherwise."""
    return image if os.path.isabs(image) else str(base / image)


def read_csv(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Catalog:
    """Rows ``path,label[,split[,role]]`` (a header row is optional). Relative paths are resolved
    against ``root`` or the CSV's folder; missing split means ``train``."""
    path = Path(path)
    base = Path(root) if root else path.parent
    raw: list[tuple[str, str, str, str | None]] = []
    for line_no, row in read_rows(path, "path", "path,label[,split[,role]]"):
        if not 2 <= len(row) <= 4:
            raise DataError(f"{path}: line {line_no} has {len(row)} columns; expected path,label[,split[,role]]")
        row = row + [""] * (4 - len(row))
        role = row[3] or None
        if role not in (None, "query", "gallery"):
            raise DataError(f"{path}: line {line_no}: role must be query or gallery, got {role!r}")
        raw.append((resolve(row[0], base), row[1], row[2] or "train", role))
    class_names = sorted({label for _, label, _, _ in raw})
    label_of = {name: i for i, name in enumerate(class_names)}
    records = [Record(image, label_of[label], split, role) for image, label, split, role in raw]
    return Catalog(path.stem, records, class_names)


def read_path_list(path: str | os.PathLike) -> Catalog:
    """A collection to index: rows ``path[,label]`` (optional header ``path[,label]``); relative paths are
    taken from the CSV's folder. Rows with a label in every row go through :func:`read_csv` (which also
    takes split/role); unlabelled rows get :data:`NO_LABEL`."""
    path = Path(path)
    rows = read_rows(path, "path", "path[,label]")
    if all(len(row) >= 2 and row[1] for _, row in rows):
        return read_csv(path)
    if any(len(row) > 1 and row[1] for _, row in rows):
        raise DataError(f"collection {path}: some rows have a label and some do not; label all or none")
    records = [Record(resolve(row[0], path.parent), NO_LABEL, "collection") for _, row in rows]
    return Catalog(path.stem, records, [])
