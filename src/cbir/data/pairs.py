"""Pair data for the two-branch Siamese mode: users whose labels say "these two images show the same
thing (or not)" rather than giving classes. A CSV of ``path_a,path_b,same[,split]`` becomes a
:class:`PairCatalog`; :class:`PairDataModule` batches image pairs for :class:`cbir.training.module.PairModule`.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from cbir.data.datamodule import load_image
from cbir.data.transforms import eval_transform, seed_transform_in_worker, train_transform
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
    with open(path, newline="") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if row and not row[0].startswith("#")]
    if rows and rows[0][1][0].strip().lower() == "path_a":
        rows = rows[1:]
    if not rows:
        raise DataError(f"{path}: no pairs (rows: {PAIR_COLUMNS})")
    has_split = len(rows[0][1]) == 4
    pairs = []
    for line_no, row in rows:
        if len(row) != (4 if has_split else 3):
            raise DataError(f"{path}: line {line_no} has {len(row)} columns; expected "
                            f"{'path_a,path_b,same,split like the first row' if has_split else PAIR_COLUMNS}")
        row = [c.strip() for c in row]
        if row[2] not in ("0", "1"):
            raise DataError(f"{path}: line {line_no}: same must be 0 or 1, got {row[2]!r}")
        images = []
        for image in row[:2]:
            full = image if os.path.isabs(image) else str(base / image)
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


class PairDataset(Dataset):
    """Items ``{"image_a", "image_b", "same", "index"}``; an unreadable image raises, naming it."""

    def __init__(self, catalog: PairCatalog, indices: Sequence[int] | np.ndarray, transform: Callable) -> None:
        self.catalog = catalog
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = int(self.indices[position])
        pair = self.catalog.pairs[index]
        return {
            "image_a": self.transform(image=load_image(None, pair.path_a))["image"],
            "image_b": self.transform(image=load_image(None, pair.path_b))["image"],
            "same": pair.same,
            "index": index,
        }


class PairDataModule(pl.LightningDataModule):
    """Shuffled training pairs; validation and test on the held-out pairs (``eval_split``, or every
    pair outside ``train_split``)."""

    def __init__(self, catalog: PairCatalog, *, image_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: Sequence = (), batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int | None = None, train_split: str = "train", eval_split: str | None = None,
                 seed: int | None = None) -> None:
        super().__init__()
        self.catalog = catalog
        self.train_tf = train_transform(augment, image_size, mean, std, seed=seed)
        self.eval_tf = eval_transform(image_size, mean, std)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.train_indices = catalog.select(train_split)
        self.eval_indices = catalog.select(eval_split, exclude=train_split)

    def _loader(self, indices: np.ndarray, transform: Callable, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(PairDataset(self.catalog, indices, transform), batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          worker_init_fn=seed_transform_in_worker)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_indices, self.train_tf, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_indices, self.eval_tf, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
