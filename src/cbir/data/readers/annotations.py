"""What the benchmark readers (CUB-200-2011, Cars196, SOP, In-Shop) share: whitespace tables of
annotations and the zero-shot class split."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from cbir.errors import DataError


def read_table(path: Path, types: Sequence[type], layout: str, skip: int = 0) -> list[tuple]:
    """Whitespace-separated rows of an annotation file (after ``skip`` header lines), each field
    converted by ``types``; a missing file or malformed row is a :class:`DataError` naming the layout."""
    if not path.is_file():
        raise DataError(f"{path} does not exist (expected {layout})")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines()[skip:], start=skip + 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != len(types):
                raise ValueError
            rows.append(tuple(convert(value) for convert, value in zip(types, fields)))
        except ValueError:
            raise DataError(f"{path}: line {line_no} is {line.strip()!r}; expected {len(types)} fields "
                            f"({layout})") from None
    if not rows:
        raise DataError(f"{path}: no rows (expected {layout})")
    return rows


def require_same_ids(path: Path, images: dict, annotations: dict, layout: str) -> None:
    """Every CUB image needs its annotation (and vice versa): a partial copy of the files is a user error."""
    if images.keys() != annotations.keys():
        example = min(images.keys() ^ annotations.keys())
        raise DataError(f"{path} and images.txt disagree on image ids (e.g. {example}); "
                        f"expected {layout}")


def zero_shot_split(path: Path, classes: dict[int, str], used: Iterable[int],
                     layout: str) -> tuple[dict[int, int], dict[int, str]]:
    """Label (position among the sorted class ids) and split of each class id: the first half of the
    sorted ids is ``train``, the second ``test`` — the benchmarks' zero-shot protocol (unseen classes)."""
    unknown = set(used) - classes.keys()
    if unknown:
        raise DataError(f"{path}: class {min(unknown)} is not in the class list (expected {layout})")
    ids = sorted(classes)
    label_of = {class_id: i for i, class_id in enumerate(ids)}
    split_of = {class_id: "train" if i < len(ids) // 2 else "test" for i, class_id in enumerate(ids)}
    return label_of, split_of
