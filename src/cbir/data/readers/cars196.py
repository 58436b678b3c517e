"""Stanford Cars (Cars196), zero-shot split by class."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cbir.data.catalog import Catalog, Record
from cbir.data.readers.annotations import zero_shot_split
from cbir.errors import DataError

CARS196_LAYOUT = ("Stanford Cars layout: root/cars_annos.mat (annotations: relative_im_path, bbox_x1, "
                  "bbox_y1, bbox_x2, bbox_y2, class, test; class_names), root/car_ims/")


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
    label_of, split_of = zero_shot_split(path, classes, class_ids, CARS196_LAYOUT)
    records = []
    for k, (image, class_id) in enumerate(zip(columns["relative_im_path"], class_ids)):
        x1, y1, x2, y2 = (float(columns[key][k]) for key in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        box = (x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1) if crop_boxes else None  # 1-based, inclusive
        records.append(Record(str(root / str(image)), label_of[class_id], split_of[class_id], box=box))
    return Catalog("cars196", records, [classes[c] for c in sorted(classes)])
