"""Dataset readers on tiny fixtures in the official layouts, and image loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.data import write_class_images
from PIL import Image

from cbir.data.catalog import ArrayRef
from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY, EvalSpec, RecordDataset
from cbir.data.images import load_image
from cbir.data.readers.csv import read_csv
from cbir.data.readers.fashion_mnist import read_fashion_mnist
from cbir.data.readers.folder import read_folder
from cbir.data.transforms import eval_transform
from cbir.errors import BadImageError, DataError


def test_fashion_mnist_reader(tiny_fashion_mnist):
    catalog = read_fashion_mnist(tiny_fashion_mnist, download=False)
    assert len(catalog.select("train")) == 40 and len(catalog.select("test")) == 20
    assert catalog.arrays["train"].shape == (40, 28, 28)
    first_test = catalog.records[catalog.select("test")[0]]
    assert first_test.source == ArrayRef("test", 0) and first_test.label == 0
    pixels = load_image(catalog, catalog.records[5].source)
    assert pixels.shape == (28, 28, 3) and (pixels[..., 0] == pixels[..., 2]).all()  # grey replicated
    assert catalog.class_names[9] == "Ankle boot"


def test_fashion_mnist_missing_gives_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr("cbir.data.readers.fashion_mnist.FASHION_MNIST_DEBIAN_DIR", tmp_path / "nope")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        read_fashion_mnist(tmp_path / "empty", download=False)


def test_folder_reader_zero_shot_split(tiny_folder):
    catalog = read_folder(tiny_folder, test_fraction=0.5)
    assert catalog.class_names == [f"class_{c:02d}" for c in range(6)]
    train_labels = set(catalog.labels(catalog.select("train")))
    test_labels = set(catalog.labels(catalog.select("test")))
    assert train_labels == {0, 1, 2} and test_labels == {3, 4, 5}
    assert len(catalog.records) == 24


def test_folder_reader_split_by_class_list(tiny_folder, tmp_path):
    (tmp_path / "test_classes.txt").write_text("class_00\nclass_04\n")
    catalog = read_folder(tiny_folder, test_classes_file=tmp_path / "test_classes.txt")
    assert set(catalog.labels(catalog.select("test"))) == {0, 4}
    (tmp_path / "bad.txt").write_text("class_00\nnot_a_class\n")
    with pytest.raises(DataError, match="not_a_class"):
        read_folder(tiny_folder, test_classes_file=tmp_path / "bad.txt")


def test_folder_reader_with_split_subfolders(tmp_path):
    write_class_images(tmp_path / "train", num_classes=3, per_class=2)
    write_class_images(tmp_path / "test", num_classes=2, per_class=2, seed=1)
    catalog = read_folder(tmp_path)
    assert len(catalog.select("train")) == 6 and len(catalog.select("test")) == 4


def test_folder_reader_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_folder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_folder(tmp_path)


def test_csv_reader_with_roles(tmp_path, tiny_folder):
    images = sorted(tiny_folder.rglob("*.png"))
    rows = ["path,label,split,role"]
    rows += [f"{p},{p.parent.name},train," for p in images[:8]]
    rows += [f"{p},{p.parent.name},test,query" for p in images[8:12]]
    rows += [f"{p},{p.parent.name},test,gallery" for p in images[12:]]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    catalog = read_csv(tmp_path / "list.csv")
    assert len(catalog.select("test:query")) == 4 and len(catalog.select("test:gallery")) == 12
    spec = EvalSpec("test:query", "test:gallery")
    dataset = spec.dataset(catalog, eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    roles = dataset.roles
    assert (roles == ROLE_QUERY).sum() == 4 and (roles == ROLE_GALLERY).sum() == 12


def test_csv_reader_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("a.png\n")
    with pytest.raises(DataError, match="line 1 has 1 columns"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "role.csv").write_text("a.png,x,test,both\n")
    with pytest.raises(DataError, match="role must be"):
        read_csv(tmp_path / "role.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_csv(tmp_path / "missing.csv")


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    catalog = read_folder(_one_class_folder(tmp_path, bad), test_fraction=0.0)
    dataset = RecordDataset(catalog, [0], eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(BadImageError, match="broken.png"):
        dataset[0]


def test_transparent_png_is_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), mode="RGBA").save(path)  # fully transparent black
    catalog = read_folder(_one_class_folder(tmp_path, path), test_fraction=0.0)
    assert (load_image(catalog, catalog.records[0].source) == 255).all()


def _one_class_folder(tmp_path: Path, image: Path) -> Path:
    root = tmp_path / "one"
    (root / "c").mkdir(parents=True)
    image.rename(root / "c" / image.name)
    return root


def test_collate_drops_and_reports_bad_images(tiny_folder, tmp_path):
    from cbir.data.datasets import collate_records

    catalog = read_folder(tiny_folder)
    dataset = RecordDataset(catalog, [0, 1], eval_transform(16, (0.5,) * 3, (0.5,) * 3), on_bad_image="skip")
    good = [dataset[0], dataset[1]]
    batch = collate_records([good[0], {"bad_image": "cannot decode image x.png", "index": 7}, good[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["index"].tolist() == [0, 1]
    assert batch["bad_images"] == ["cannot decode image x.png"]
    assert collate_records([{"bad_image": "m", "index": 1}]) == {"bad_images": ["m"]}


def test_catalog_issues_are_reported(tmp_path):
    from cbir.data.catalog import Catalog, Record
    from cbir.data.datasets import report_catalog_issues

    records = [Record("a.png", 0, "test"), Record("a.png", 0, "test"), Record("b.png", 1, "test")]
    issues = report_catalog_issues(Catalog("x", records, ["c0", "c1"]), [EvalSpec("test")])
    assert any("1 image paths appear more than once" in i for i in issues)
    assert any("1 of 2 classes in 'test' have a single image" in i for i in issues)


def test_cache_holds_decoded_pixels_and_is_used(tiny_folder, monkeypatch):
    from cbir.data import datasets
    from cbir.data.datasets import fill_cache

    catalog = read_folder(tiny_folder)
    cache, bad = fill_cache(catalog, range(len(catalog.records)), max_mb=100)
    assert len(cache) == len(catalog.records) and not bad
    small, _ = fill_cache(catalog, range(len(catalog.records)), max_mb=24 * 24 * 3 * 5 / 2**20)
    assert len(small) == 5  # stops at the memory budget
    monkeypatch.setattr(datasets, "load_record", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    dataset = RecordDataset(catalog, [3], eval_transform(16, (0.5,) * 3, (0.5,) * 3), cache=cache)
    assert dataset[0]["image"].shape == (3, 16, 16)
