"""CUB-200-2011 (200 bird species), zero-shot split by class."""

from __future__ import annotations

import os
from pathlib import Path

from cbir.data.catalog import Catalog, Record
from cbir.data.readers.annotations import read_table, require_same_ids, zero_shot_split

CUB200_LAYOUT = ("CUB-200-2011 layout: root/images.txt (id path), image_class_labels.txt (id class), "
                 "classes.txt (class name), bounding_boxes.txt (id x y w h), images/<path>")


def read_cub200(root: str | os.PathLike, crop_boxes: bool = False) -> Catalog:
    """CUB-200-2011 with the zero-shot protocol: the first half of the classes (1-100) train, the rest
    (101-200) test. ``crop_boxes`` loads only each bird's box from ``bounding_boxes.txt``."""
    root = Path(root)
    paths = dict(read_table(root / "images.txt", (int, str), CUB200_LAYOUT))
    classes = dict(read_table(root / "classes.txt", (int, str), CUB200_LAYOUT))
    class_of = dict(read_table(root / "image_class_labels.txt", (int, int), CUB200_LAYOUT))
    require_same_ids(root / "image_class_labels.txt", paths, class_of, CUB200_LAYOUT)
    boxes = {}
    if crop_boxes:
        rows = read_table(root / "bounding_boxes.txt", (int, float, float, float, float), CUB200_LAYOUT)
        boxes = {row[0]: row[1:] for row in rows}
        require_same_ids(root / "bounding_boxes.txt", paths, boxes, CUB200_LAYOUT)
    label_of, split_of = zero_shot_split(root / "classes.txt", classes, class_of.values(), CUB200_LAYOUT)
    records = [Record(str(root / "images" / path), label_of[class_of[i]], split_of[class_of[i]],
                      box=boxes.get(i)) for i, path in sorted(paths.items())]
    return Catalog("cub200", records, [classes[c] for c in sorted(classes)])
