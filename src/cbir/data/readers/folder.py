"""Image folders: a class-per-folder training tree (:func:`read_folder`) and any tree of images to index
(:func:`read_image_tree`, labelled by parent folder)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cbir.data.catalog import NO_LABEL, Catalog, Record
from cbir.data.images import IMAGE_EXTENSIONS, list_images
from cbir.errors import DataError


def read_folder(root: str | os.PathLike, test_fraction: float = 0.5,
                test_classes_file: str | os.PathLike | None = None) -> Catalog:
    """One sub-folder per class. If ``root`` has ``train/`` and ``test/`` sub-trees they are the splits.
    Otherwise the split is by class (zero-shot): the classes named in ``test_classes_file`` (one per
    line) are ``test``, or, without a list, the last ``test_fraction`` of the classes sorted by name
    (``test_fraction=0`` puts everything in ``train``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist (expected one sub-folder per class)")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in split_dirs and len(split_dirs) > 1:
        class_names = sorted({d.name for s in split_dirs.values() for d in s.iterdir() if d.is_dir()})
        label_of = {name: i for i, name in enumerate(class_names)}
        records = [Record(str(p), label_of[p.parent.name], split)
                   for split, folder in split_dirs.items() for p in _images_in_class_dirs(folder)]
    else:
        class_names = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not class_names:
            raise DataError(f"data.root: {root} has no class sub-folders (expected root/<class>/<image>)")
        test_classes = _test_classes(class_names, test_fraction, test_classes_file)
        label_of = {name: i for i, name in enumerate(class_names)}
        records = [Record(str(p), label_of[p.parent.name], "test" if p.parent.name in test_classes else "train")
                   for p in _images_in_class_dirs(root)]
    if not records:
        raise DataError(f"data.root: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return Catalog(root.name or "folder", records, class_names)


def _test_classes(class_names: list[str], test_fraction: float,
                  test_classes_file: str | os.PathLike | None) -> set[str]:
    if test_classes_file is not None:
        path = Path(test_classes_file)
        if not path.is_file():
            raise DataError(f"data.test_classes_file: {path} does not exist (one class folder name per line)")
        listed = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        unknown = sorted(listed - set(class_names))
        if unknown:
            raise DataError(f"{path}: {len(unknown)} listed classes have no folder (first: {unknown[0]!r})")
        return listed
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in [0, 1), got {test_fraction}")
    num_test = int(round(len(class_names) * test_fraction))
    return set(class_names[len(class_names) - num_test:])


def _images_in_class_dirs(folder: Path) -> Iterable[Path]:
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
        yield from list_images(class_dir)


def read_image_tree(root: str | os.PathLike) -> Catalog:
    """Every image under ``root`` (recursive, sorted), labelled by its parent folder relative to ``root``
    (``cats/tabby/1.jpg`` → ``cats/tabby``); images directly in ``root`` get no label."""
    root = Path(root)
    paths = list_images(root)
    if not paths:
        raise DataError(f"collection {root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under it")
    folders = [p.parent.relative_to(root).as_posix() for p in paths]
    class_names = sorted({f for f in folders if f != "."})
    label_of = {name: i for i, name in enumerate(class_names)}
    records = [Record(str(p), label_of.get(f, NO_LABEL), "collection") for p, f in zip(paths, folders)]
    return Catalog(root.resolve().name or "collection", records, class_names)
