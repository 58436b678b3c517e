"""Tiny copies of the retrieval benchmarks in their official layouts: annotation files as shipped,
small JPEGs (one colour per class) where the annotations point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

IMAGE_SIZE = (40, 30)  # width, height


def write_jpeg(path: Path, colour: np.ndarray, seed: int) -> None:
    """A class-coloured image with a little noise, so images of one class differ."""
    width, height = IMAGE_SIZE
    noise = np.random.default_rng(seed).integers(-20, 20, size=(height, width, 3))
    pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def class_colours(num_classes: int) -> np.ndarray:
    return np.random.default_rng(7).integers(40, 216, size=(num_classes, 3))


def write_cub200(root: Path, num_classes: int = 6, per_class: int = 4) -> Path:
    """CUB_200_2011/: images.txt, image_class_labels.txt, classes.txt, bounding_boxes.txt, images/."""
    colours = class_colours(num_classes)
    images, labels, boxes = [], [], []
    classes = [f"{c:03d}.Bird_{c}" for c in range(1, num_classes + 1)]
    for c, name in enumerate(classes, start=1):
        for i in range(per_class):
            image_id = len(images) + 1
            path = f"{name}/Bird_{c}_{i:04d}_{image_id}.jpg"
            write_jpeg(root / "images" / path, colours[c - 1], image_id)
            images.append(f"{image_id} {path}")
            labels.append(f"{image_id} {c}")
            boxes.append(f"{image_id} 5.0 4.0 20.0 15.0")
    _write_lines(root / "images.txt", images)
    _write_lines(root / "image_class_labels.txt", labels)
    _write_lines(root / "classes.txt", [f"{c} {name}" for c, name in enumerate(classes, start=1)])
    _write_lines(root / "bounding_boxes.txt", boxes)
    return root


def write_cars196(root: Path, num_classes: int = 6, per_class: int = 4) -> Path:
    """cars_annos.mat (struct array ``annotations`` + cell ``class_names``, as MATLAB saved it) and
    car_ims/NNNNNN.jpg."""
    colours = class_colours(num_classes)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, num_classes * per_class), dtype=[(f, object) for f in fields])
    for k in range(num_classes * per_class):
        c, path = k // per_class + 1, f"car_ims/{k + 1:06d}.jpg"
        write_jpeg(root / path, colours[c - 1], k)
        annotations[0, k] = (path, np.uint16(3), np.uint16(5), np.uint16(32), np.uint16(24), np.uint8(c),
                             np.uint8(k % 2))
    class_names = np.array([f"Make Model {c} 2012" for c in range(1, num_classes + 1)], dtype=object)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names[None, :]})
    return root


def write_sop(root: Path, products_per_split: int = 3, per_product: int = 3) -> Path:
    """Stanford_Online_Products/: Ebay_train.txt, Ebay_test.txt and <category>_final/ images; products
    alternate between two categories (super-classes)."""
    colours = class_colours(2 * products_per_split)
    image_id = 0
    for split, first_product in (("train", 1), ("test", products_per_split + 1)):
        rows = ["image_id class_id super_class_id path"]
        for product in range(first_product, first_product + products_per_split):
            super_id = 1 + product % 2
            for i in range(per_product):
                image_id += 1
                path = f"{('bicycle', 'cabinet')[super_id - 1]}_final/{product}_{i}.JPG"
                write_jpeg(root / path, colours[product - 1], image_id)
                rows.append(f"{image_id} {product} {super_id} {path}")
        _write_lines(root / f"Ebay_{split}.txt", rows)
    return root


def write_inshop(root: Path, train_items: int = 3, test_items: int = 3, per_item: int = 4) -> Path:
    """list_eval_partition.txt (count line, header, padded columns) and img/ images; the test items'
    images are split half query, half gallery."""
    colours = class_colours(train_items + test_items)
    rows = []
    for item in range(1, train_items + test_items + 1):
        item_id = f"id_{item:08d}"
        for i in range(per_item):
            path = f"img/WOMEN/Dresses/{item_id}/{i:02d}_1_front.jpg"
            write_jpeg(root / path, colours[item - 1], len(rows))
            status = "train" if item <= train_items else ("query", "gallery")[i % 2]
            rows.append(f"{path:<60}{item_id} {status}")
    _write_lines(root / "list_eval_partition.txt",
                 [str(len(rows)), "image_name item_id evaluation_status"] + rows)
    return root


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
