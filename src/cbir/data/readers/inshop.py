"""DeepFashion In-Shop Clothes Retrieval (query / gallery splits)."""

from __future__ import annotations

import os
from pathlib import Path

from cbir.data.catalog import Catalog, Record
from cbir.data.readers.annotations import read_table
from cbir.errors import DataError

INSHOP_LAYOUT = ("In-Shop layout: root/list_eval_partition.txt (count line, header line: image_name item_id "
                 "evaluation_status, rows with status train/query/gallery), root/img/")


def read_inshop(root: str | os.PathLike) -> Catalog:
    """DeepFashion In-Shop Clothes Retrieval: splits ``train``, ``query`` and ``gallery`` from
    ``list_eval_partition.txt``; a class is one item (``item_id``), shared by its queries and gallery."""
    root = Path(root)
    path = root / "list_eval_partition.txt"
    rows = read_table(path, (str, str, str), INSHOP_LAYOUT, skip=2)
    for image, _, status in rows:
        if status not in ("train", "query", "gallery"):
            raise DataError(f"{path}: {image} has status {status!r}; expected train, query or gallery")
    items = sorted({item for _, item, _ in rows})
    label_of = {item: i for i, item in enumerate(items)}
    records = [Record(str(root / image), label_of[item], status) for image, item, status in rows]
    return Catalog("inshop", records, items)
