"""Readers of the retrieval benchmarks (CUB-200-2011, Cars196, SOP, In-Shop) on tiny copies written in
the official layouts, the bounding-box crop, and the errors for missing annotation files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.benchmark_layouts import IMAGE_SIZE, write_cars196, write_cub200, write_inshop, write_sop
from PIL import Image

from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY, EvalSpec, RecordDataset
from cbir.data.images import load_image
from cbir.data.readers.cars196 import read_cars196
from cbir.data.readers.cub200 import read_cub200
from cbir.data.readers.inshop import read_inshop
from cbir.data.readers.sop import read_sop
from cbir.errors import BadImageError, DataError


@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> Path:
    return write_cub200(tmp_path_factory.mktemp("CUB_200_2011"))


@pytest.fixture(scope="module")
def cars(tmp_path_factory) -> Path:
    return write_cars196(tmp_path_factory.mktemp("stanford_cars"))


@pytest.fixture(scope="module")
def sop(tmp_path_factory) -> Path:
    return write_sop(tmp_path_factory.mktemp("Stanford_Online_Products"))


@pytest.fixture(scope="module")
def inshop(tmp_path_factory) -> Path:
    return write_inshop(tmp_path_factory.mktemp("InShop"))


def identity(image):
    return {"image": image}


def test_cub200_reader_splits_classes_in_half(cub):
    catalog = read_cub200(cub)
    assert len(catalog.records) == 24 and catalog.class_names[0] == "001.Bird_1"
    assert set(catalog.labels(catalog.select("train"))) == {0, 1, 2}
    assert set(catalog.labels(catalog.select("test"))) == {3, 4, 5}
    first = catalog.records[0]
    assert first.source == str(cub / "images" / "001.Bird_1" / "Bird_1_0000_1.jpg")
    assert first.box is None and first.role is None
    assert load_image(catalog, first.source).shape == (IMAGE_SIZE[1], IMAGE_SIZE[0], 3)


def test_cub200_crop_boxes_crop_the_pixels(tmp_path):
    root = write_cub200(tmp_path, num_classes=2, per_class=1)
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[4:19, 5:25] = (255, 0, 0)  # the box of bounding_boxes.txt: x 5, y 4, w 20, h 15
    Image.fromarray(pixels).save(root / "images" / "001.Bird_1" / "Bird_1_0000_1.jpg", quality=100)
    catalog = read_cub200(root, crop_boxes=True)
    record = catalog.records[0]
    assert record.box == (5.0, 4.0, 20.0, 15.0)
    crop = RecordDataset(catalog, [0], identity)[0]["image"]
    whole = load_image(catalog, record.source)
    assert crop.shape == (15, 20, 3) and np.array_equal(crop, whole[4:19, 5:25])
    assert crop[..., 0].mean() > 200 > whole[..., 0].mean()  # only the red inside the box is left


def test_crop_is_clipped_to_the_image(cub):
    source = str(cub / "images" / "001.Bird_1" / "Bird_1_0000_1.jpg")
    catalog = read_cub200(cub)
    assert load_image(catalog, source, (30.4, -5.0, 100.0, 25.0)).shape == (20, 10, 3)
    with pytest.raises(BadImageError, match="lies outside image"):
        load_image(catalog, source, (50.0, 0.0, 10.0, 10.0))


def test_cars196_reader(cars):
    catalog = read_cars196(cars)
    assert len(catalog.records) == 24 and catalog.class_names[5] == "Make Model 6 2012"
    assert set(catalog.labels(catalog.select("train"))) == {0, 1, 2}
    assert set(catalog.labels(catalog.select("test"))) == {3, 4, 5}
    assert catalog.records[0].source == str(cars / "car_ims" / "000001.jpg") and catalog.records[0].box is None
    assert catalog.records[23].label == 5 and catalog.records[23].split == "test"


def test_cars196_crop_boxes(cars):
    catalog = read_cars196(cars, crop_boxes=True)
    record = catalog.records[0]
    assert record.box == (2.0, 4.0, 30.0, 20.0)  # bbox 3..32 x 5..24, 1-based and inclusive
    assert load_image(catalog, record.source, record.box).shape == (20, 30, 3)


def test_sop_reader_keeps_splits_and_super_classes(sop):
    catalog = read_sop(sop)
    assert len(catalog.select("train")) == 9 and len(catalog.select("test")) == 9
    assert catalog.class_names == ["1", "2", "3", "4", "5", "6"]
    train, test = (set(catalog.labels(catalog.select(s))) for s in ("train", "test"))
    assert train == {0, 1, 2} and test == {3, 4, 5}
    first = catalog.records[0]
    assert first.super_label == 2 and first.source == str(sop / "cabinet_final" / "1_0.JPG")
    assert {r.super_label for r in catalog.records} == {1, 2}
    assert load_image(catalog, first.source).shape == (IMAGE_SIZE[1], IMAGE_SIZE[0], 3)


def test_inshop_reader_query_vs_gallery(inshop):
    catalog = read_inshop(inshop)
    counts = {s: len(catalog.select(s)) for s in ("train", "query", "gallery")}
    assert counts == {"train": 12, "query": 6, "gallery": 6}
    assert catalog.class_names[0] == "id_00000001"
    assert set(catalog.labels(catalog.select("query"))) == set(catalog.labels(catalog.select("gallery")))
    assert set(catalog.labels(catalog.select("train"))) == {0, 1, 2}
    assert all(r.role is None for r in catalog.records)
    assert catalog.records[0].source == str(inshop / "img/WOMEN/Dresses/id_00000001/00_1_front.jpg")
    dataset = EvalSpec("query", "gallery").dataset(catalog, identity)
    assert (dataset.roles == ROLE_QUERY).sum() == 6 and (dataset.roles == ROLE_GALLERY).sum() == 6


WRITERS = {"cub200": (write_cub200, lambda root: read_cub200(root, crop_boxes=True)),
           "cars196": (write_cars196, read_cars196), "sop": (write_sop, read_sop),
           "inshop": (write_inshop, read_inshop)}
ANNOTATION_FILES = [("cub200", "images.txt"), ("cub200", "image_class_labels.txt"),
                    ("cub200", "classes.txt"), ("cub200", "bounding_boxes.txt"), ("cars196", "cars_annos.mat"),
                    ("sop", "Ebay_train.txt"), ("sop", "Ebay_test.txt"), ("inshop", "list_eval_partition.txt")]


@pytest.mark.parametrize("dataset,filename", ANNOTATION_FILES, ids=[f"{d}-{f}" for d, f in ANNOTATION_FILES])
def test_missing_annotation_file_names_it_and_the_layout(dataset, filename, tmp_path):
    write, read = WRITERS[dataset]
    write(tmp_path, 2, 1)
    (tmp_path / filename).unlink()
    with pytest.raises(DataError, match=f"{filename} does not exist \\(expected .* layout: .*\\)$") as error:
        read(tmp_path)
    assert "\n" not in str(error.value)


def test_boxes_are_only_needed_when_cropping(tmp_path):
    write_cub200(tmp_path, 2, 1)
    (tmp_path / "bounding_boxes.txt").unlink()
    assert len(read_cub200(tmp_path).records) == 2


def test_malformed_rows_name_the_file_and_line(tmp_path):
    write_sop(tmp_path, 1, 1)
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n2 x 1 a.JPG\n")
    with pytest.raises(DataError, match=r"Ebay_test.txt: line 2 is '2 x 1 a.JPG'; expected 4 fields"):
        read_sop(tmp_path)
    write_inshop(tmp_path, 1, 0, 1)
    (tmp_path / "list_eval_partition.txt").write_text("1\nimage_name item_id evaluation_status\na.jpg id_1 val\n")
    with pytest.raises(DataError, match="status 'val'; expected train, query or gallery"):
        read_inshop(tmp_path)
    write_cub200(tmp_path / "cub", 2, 1)
    (tmp_path / "cub" / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(DataError, match="disagree on image ids"):
        read_cub200(tmp_path / "cub")
    (tmp_path / "cub" / "image_class_labels.txt").write_text("1 1\n2 9\n")
    with pytest.raises(DataError, match="class 9 is not in the class list"):
        read_cub200(tmp_path / "cub")
    (tmp_path / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="cars_annos.mat: cannot read annotations"):
        read_cars196(tmp_path)
