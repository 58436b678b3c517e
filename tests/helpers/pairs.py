"""Pair lists for the Siamese pair mode (data=pairs): a CSV of same/different image pairs."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np


def write_pair_csv(folder: Path, path: Path, split: bool = False, seed: int = 0) -> Path:
    """Every same-class pair of ``folder``'s class images as ``same=1`` and as many random different-class
    pairs as ``same=0``, paths relative to the CSV; with ``split``, classes 0-3 train and 4-5 test."""
    images = sorted(folder.rglob("*.png"))
    by_class = {}
    for image in images:
        by_class.setdefault(image.parent.name, []).append(image)
    rows = [(a, b, 1) for group in by_class.values() for a, b in itertools.combinations(group, 2)]
    rng = np.random.default_rng(seed)
    while len(rows) < 2 * sum(1 for r in rows if r[2]):
        a, b = rng.choice(len(images), 2, replace=False)
        if images[a].parent != images[b].parent:
            rows.append((images[a], images[b], 0))
    lines = ["path_a,path_b,same" + (",split" if split else "")]
    for a, b, same in rows:
        line = f"{os.path.relpath(a, path.parent)},{os.path.relpath(b, path.parent)},{same}"
        if split:
            line += "," + ("train" if a.parent.name < "class_04" and b.parent.name < "class_04" else "test")
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path
