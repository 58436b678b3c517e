"""Validation without test peeking: part of the *training* split becomes split ``val``, so monitoring,
the best checkpoint, early stopping and schedules never see the classes (or images) a model is finally
scored on. The test split is touched once, at the end.

- zero-shot data (emoji, CUB, Cars, SOP, a folder or CSV without a val split): whole training classes
  (``val_classes``: a fraction, a count, or a list of class names), so validation asks the same question
  as the test: unseen classes;
- closed-set data (Fashion-MNIST: test queries against the train gallery): a stratified slice of the
  training images (``val_images``: a fraction or a count), queried against the rest of train. A numeric
  ``val_classes`` on data whose test split shares classes with train holds out images the same way.

A catalog that already has a ``val`` split (a folder with ``val/``, a CSV with a val column) is left as
it is. The choice is random but fixed by ``seed``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from cbir.data.catalog import Catalog
from cbir.errors import ConfigError

log = logging.getLogger(__name__)

VAL = "val"


def hold_out_validation(catalog: Catalog, *, val_classes: float | int | Sequence[str] | None = None,
                        val_images: float | int | None = None, train_split: str = "train",
                        seed: int = 0) -> Catalog:
    """``catalog`` with part of ``train_split`` moved to split ``val`` (see the module docstring)."""
    if val_classes is None and val_images is None:
        return catalog
    if val_classes is not None and val_images is not None:
        raise ConfigError("data.val_classes and data.val_images: hold out classes or images, not both")
    if any(r.split == VAL for r in catalog.records):
        log.info("%s: has a '%s' split already; data.val_classes/val_images not applied", catalog.name, VAL)
        return catalog
    train = np.flatnonzero([r.split == train_split for r in catalog.records])
    labels = catalog.labels(train)
    rng = np.random.default_rng(seed)
    if val_classes is not None and not isinstance(val_classes, (list, tuple)) and _closed_set(catalog, labels,
                                                                                               train_split):
        log.info("%s: the test split shares classes with %s (closed-set): holding out images, not classes",
                 catalog.name, train_split)
        val_classes, val_images = None, val_classes
    if val_classes is not None:
        classes = sorted(set(labels.tolist()))
        chosen = _chosen_classes(catalog, classes, val_classes, rng)
        moved = train[np.isin(labels, list(chosen))]
        what = f"{len(chosen)} of {len(classes)} training classes"
    else:
        moved = _stratified_images(train, labels, val_images, rng)
        what = f"{len(moved)} of {len(train)} training images"
    if len(moved) == 0 or len(moved) == len(train):
        raise ConfigError(f"{catalog.name}: holding out {what} for validation leaves "
                          f"{'nothing to validate on' if len(moved) == 0 else 'nothing to train on'}")
    records = list(catalog.records)
    for index in moved:
        records[index] = dataclasses.replace(records[index], split=VAL)
    log.info("%s: %s held out as split '%s' for validation (the test split stays unseen)", catalog.name, what, VAL)
    return Catalog(catalog.name, records, catalog.class_names, catalog.arrays)


def _closed_set(catalog: Catalog, train_labels: np.ndarray, train_split: str) -> bool:
    """Whether the other splits hold classes that are also trained on (then validation holds out images)."""
    others = {r.label for r in catalog.records if r.split not in (train_split, VAL)}
    return bool(others & set(train_labels.tolist()))


def _chosen_classes(catalog: Catalog, classes: list[int], spec, rng: np.random.Generator) -> set[int]:
    if isinstance(spec, (list, tuple)):
        names = [str(name) for name in spec]
        index_of = {name: i for i, name in enumerate(catalog.class_names)}
        unknown = [name for name in names if name not in index_of or index_of[name] not in classes]
        if unknown:
            raise ConfigError(f"data.val_classes: {unknown[0]!r} is not a training class of {catalog.name}")
        return {index_of[name] for name in names}
    count = _count(spec, len(classes), "data.val_classes")
    return set(rng.choice(classes, count, replace=False).tolist())


def _stratified_images(train: np.ndarray, labels: np.ndarray, spec, rng: np.random.Generator) -> np.ndarray:
    count = _count(spec, len(train), "data.val_images")
    fraction = count / len(train)
    moved = []
    for label in np.unique(labels):
        members = train[labels == label]
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        moved.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(moved)) if moved else np.zeros(0, np.int64)


def _count(spec, total: int, key: str) -> int:
    """A fraction in (0, 1) of ``total``, or a whole count, as a number of items (at least 1)."""
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={spec!r}: give a fraction in (0, 1), a count, or (classes) a list of names") from None
    if 0 < value < 1:
        return max(1, int(round(value * total)))
    if value >= 1 and value == int(value) and value < total:
        return int(value)
    raise ConfigError(f"{key}={spec!r}: must be a fraction in (0, 1) or a whole count below {total}")
