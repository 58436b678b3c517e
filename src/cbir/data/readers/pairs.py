"""Pair data for the two-branch Siamese mode: users whose labels say "these two images show the same
thing (or not)" rather than giving classes. A CSV of ``path_a,path_b,same[,split]`` becomes a
:class:`PairCatalog`; :class:`cbir.data.datamodule.PairDataModule` batches its image pairs.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.data.readers.csv import read_rows, resolve
from cbir.errors import DataError

PAIR_COLUMNS = "path_a,path_b,same[,split]"
HELD_OUT = "val"  # split name of the pairs held out when the CSV has no split column


@dataclass(frozen=True)
class PairRecord:
    path_a: str
    path_b: str
    same: int  # 1: the two images match, 0: they do not
    split: str


@dataclass
class PairCatalog:
    name: str
    pairs: list[PairRecord]

    def select(self, split: str | None, exclude: str | None = None) -> np.ndarray:
        """Indices of the pairs in ``split`` (``None``: every split but ``exclude``)."""
        chosen = [i for i, p in enumerate(self.pairs)
                  if (p.split == split if split is not None else p.split != exclude)]
        if not chosen:
            splits = ", ".join(sorted({p.split for p in self.pairs}))
            wanted = f"split '{split}'" if split is not None else f"a split other than '{exclude}'"
            raise DataError(f"{self.name}: no pairs in {wanted} (splits: {splits})")
        return np.asarray(chosen, dtype=np.int64)

    def summary(self) -> str:
        counts = Counter((p.split, p.same) for p in self.pairs)
        parts = [f"{split}: {counts[(split, 1)]} same / {counts[(split, 0)]} different pairs"
                 for split in sorted({p.split for p in self.pairs})]
        return f"{self.name}: {len(self.pairs)} pairs ({'; '.join(parts)})"


def read_pairs(path: str | os.PathLike, root: str | os.PathLike | None = None, held_out_fraction: float = 0.2,
               seed: int = 0) -> PairCatalog:
    """Rows ``path_a,path_b,same[,split]`` (a header row is optional; ``same`` is 0 or 1). Relative paths
    resolve against ``root`` or the CSV's folder. Without a split column, a random ``held_out_fraction``
    of the pairs (at least one) becomes split ``val``, the rest ``train``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: pair CSV {path} does not exist (rows: {PAIR_COLUMNS})")
    base = Path(root) if root else path.parent
    rows = read_rows(path, "path_a", PAIR_COLUMNS)
    has_split = len(rows[0][1]) == 4
    pairs = []
    for line_no, row in rows:
        if len(row) != (4 if has_split else 3):
            raise DataError(f"{path}: line {line_no} has {len(row)} columns; expected "
                            f"{'path_a,path_b,same,split like the first row' if has_split else PAIR_COLUMNS}")
        if row[2] not in ("0", "1"):
            raise DataError(f"{path}: line {line_no}: same must be 0 or 1, got {row[2]!r}")
        images = []
        for image in row[:2]:
            full = resolve(image, base)
            if not os.path.isfile(full):
                raise DataError(f"{path}: line {line_no}: image {full} does not exist "
                                f"(relative paths resolve against {'data.root' if root else 'the CSV folder'})")
            images.append(full)
        if has_split and not row[3]:
            raise DataError(f"{path}: line {line_no}: empty split")
        pairs.append(PairRecord(images[0], images[1], int(row[2]), row[3] if has_split else "train"))
    if not has_split:
        pairs = _hold_out(pairs, held_out_fraction, seed)
    return PairCatalog(path.stem, pairs)


def _hold_out(pairs: list[PairRecord], fraction: float, seed: int) -> list[PairRecord]:
    if not 0 < fraction < 1:
        raise DataError(f"data.held_out_fraction must be in (0, 1), got {fraction} (or give a split column)")
    count = max(1, round(fraction * len(pairs)))
    held = set(np.random.default_rng(seed).permutation(len(pairs))[:count].tolist())
    return [PairRecord(p.path_a, p.path_b, p.same, HELD_OUT if i in held else p.split) for i, p in enumerate(pairs)]
