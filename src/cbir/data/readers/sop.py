"""Stanford Online Products (22k products, eBay photos)."""

from __future__ import annotations

import os
from pathlib import Path

from cbir.data.catalog import Catalog, Record
from cbir.data.readers.annotations import read_table

SOP_LAYOUT = ("Stanford Online Products layout: root/Ebay_train.txt and root/Ebay_test.txt "
              "(header: image_id class_id super_class_id path), paths relative to root")


def read_sop(root: str | os.PathLike) -> Catalog:
    """Stanford Online Products: splits from ``Ebay_train.txt`` / ``Ebay_test.txt`` (disjoint products);
    a class is one product (``class_id``), and the product category (``super_class_id``) is kept as
    ``Record.super_label``."""
    root = Path(root)
    rows = {split: read_table(root / f"Ebay_{split}.txt", (int, int, int, str), SOP_LAYOUT, skip=1)
            for split in ("train", "test")}
    class_ids = sorted({class_id for table in rows.values() for _, class_id, _, _ in table})
    label_of = {class_id: i for i, class_id in enumerate(class_ids)}
    records = [Record(str(root / path), label_of[class_id], split, super_label=super_id)
               for split, table in rows.items() for _, class_id, super_id, path in table]
    return Catalog("sop", records, [str(c) for c in class_ids])
