"""Validation never sees the test classes: held-out training classes (zero-shot) or images (closed-set),
chosen once per seed, and selectors that join splits or keep base views only."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.data.catalog import Catalog, Record
from cbir.data.splits import hold_out_validation
from cbir.errors import ConfigError, DataError


def zero_shot(classes: int = 20, per_class: int = 3) -> Catalog:
    records = [Record(f"{c}/{i}.png", c, "train" if c < classes // 2 else "test")
               for c in range(classes) for i in range(per_class)]
    return Catalog("zs", records, [f"class{c:02d}" for c in range(classes)])


def closed_set(classes: int = 4, train: int = 50, test: int = 5) -> Catalog:
    records = [Record(f"{s}/{c}/{i}.png", c, s) for s, n in (("train", train), ("test", test))
               for c in range(classes) for i in range(n)]
    return Catalog("cs", records, [str(c) for c in range(classes)])


def split_labels(catalog: Catalog, split: str) -> set[int]:
    return set(catalog.labels(catalog.select(split)).tolist())


def test_zero_shot_holds_out_whole_training_classes():
    catalog = zero_shot()
    held = hold_out_validation(catalog, val_classes=0.2, seed=3)
    val, train, test = split_labels(held, "val"), split_labels(held, "train"), split_labels(held, "test")
    assert len(val) == 2 and not val & train and not val & test  # 20% of the 10 training classes
    assert val < set(range(10)) and test == split_labels(catalog, "test")  # test untouched
    assert len(held.records) == len(catalog.records)
    again = hold_out_validation(catalog, val_classes=0.2, seed=3)
    assert split_labels(again, "val") == val  # the seed fixes the choice
    assert any(split_labels(hold_out_validation(catalog, val_classes=0.2, seed=s), "val") != val for s in range(5))
    named = hold_out_validation(catalog, val_classes=["class01", "class07"])
    assert split_labels(named, "val") == {1, 7}
    assert len(split_labels(hold_out_validation(catalog, val_classes=3), "val")) == 3


def test_closed_set_holds_out_images_of_every_class():
    catalog = closed_set()
    for held in (hold_out_validation(catalog, val_images=0.1), hold_out_validation(catalog, val_classes=0.1)):
        val = held.select("val")
        assert len(val) == 20 and split_labels(held, "val") == {0, 1, 2, 3}  # 5 of each class's 50
        assert len(held.select("train")) == 180
        assert held.select("train+val").tolist() == catalog.select("train").tolist()  # the whole gallery
        assert split_labels(held, "test") == split_labels(catalog, "test")


def test_existing_val_split_and_nothing_asked_are_left_alone():
    catalog = zero_shot()
    assert hold_out_validation(catalog) is catalog
    with_val = Catalog("v", catalog.records + [Record("v.png", 0, "val")], catalog.class_names)
    assert hold_out_validation(with_val, val_classes=0.5) is with_val


@pytest.mark.parametrize("kwargs,message", [
    (dict(val_classes=0.2, val_images=0.1), "not both"),
    (dict(val_classes=1.5), "fraction"),
    (dict(val_classes=10), "below 10"),
    (dict(val_classes="many"), "fraction"),
    (dict(val_classes=["nope"]), "not a training class"),
    (dict(val_classes=["class15"]), "not a training class"),  # a test class can never validate
])
def test_bad_requests_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        hold_out_validation(zero_shot(), **kwargs)


def test_base_selector_and_joins():
    records = [Record("g.png", 0, "test", domain="google"), Record("t.png", 0, "test", domain="twitter"),
               Record("g1.png", 0, "test", domain="google", variant="1F3FB"), Record("x.png", 1, "train")]
    catalog = Catalog("emoji", records, ["a", "b"])
    assert catalog.select("test/base").tolist() == [0, 1]
    assert catalog.select("test@google/base").tolist() == [0]
    assert catalog.select("test").tolist() == [0, 1, 2]
    assert catalog.select("train+test/base").tolist() == [0, 1, 3]
    with pytest.raises(DataError, match="only '/base'"):
        catalog.select("test/tones")


def test_training_config_validates_on_training_classes(tiny_folder, tmp_path):
    from helpers.configs import compose_config, tiny_train_overrides

    from cbir.training import factory

    cfg = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path, hold_out_validation=True))
    catalog = factory.build_catalog(cfg.data)
    val, test = catalog.select(cfg.data.val.queries), catalog.select(cfg.data.test.queries)
    assert cfg.data.val.queries == "val" and len(val) and not set(val) & set(test)
    assert not split_labels(catalog, "val") & split_labels(catalog, "test")
    assert not split_labels(catalog, "val") & split_labels(catalog, "train")
    assert np.isin(catalog.labels(val), list(range(len(catalog.class_names) // 2))).all()  # first half of classes
