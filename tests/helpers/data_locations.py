"""Tiny data for every ``data=`` config option, written in that option's own layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers import benchmark_layouts
from helpers.data import write_idx
from helpers.emoji_data import write_unpacked
from helpers.pairs import write_pair_csv


def data_location(option: str, folder: Path, tmp_path: Path) -> list[str]:
    """Overrides that point ``data={option}`` at tiny data in its own layout: ``folder`` (class-per-folder
    PNGs) for the folder, csv and pairs options, files written under ``tmp_path`` for the others."""
    if option == "folder":
        return [f"data.root={folder}"]
    if option == "csv":
        rows = [f"{p},{p.parent.name},{'train' if p.parent.name < 'class_03' else 'test'}"
                for p in sorted(folder.rglob("*.png"))]
        (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
        return [f"data.path={tmp_path / 'list.csv'}"]
    if option == "fashion_mnist":
        rng = np.random.default_rng(0)
        for prefix, n in (("train", 40), ("t10k", 20)):
            write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
            write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
        return [f"data.root={tmp_path}", "data.m_per_class=2", "data.batch_size=8"]
    if option in ("cub200", "cars196", "sop", "inshop"):
        return [f"data.root={getattr(benchmark_layouts, f'write_{option}')(tmp_path / option)}"]
    if option == "emoji":
        root = write_unpacked(tmp_path / "emoji")
        # the fixture has 2 training classes, one of them held out for validation: one class per batch
        return [f"data.root={root}", "data.reader.fetch=false", "data.m_per_class=2", "data.batch_size=2"]
    if option == "icons":
        return [f"data.root={write_icon_themes(tmp_path / 'icons')}", "data.reader.fetch=false",
                "data.reader.themes=[a,b,c]", "data.m_per_class=2", "data.batch_size=4"]
    if option == "pairs":
        return [f"data.path={write_pair_csv(folder, tmp_path / 'pairs.csv')}", "data.batch_size=4"]
    raise AssertionError(f"add a fixture for data={option}")


def write_icon_themes(root: Path, names: int = 8, themes: tuple[str, ...] = ("a", "b", "c")) -> Path:
    """``data/icons`` as ``cbir data fetch icons`` leaves it: ``<theme>/<name>.png`` and a ``.complete`` mark."""
    from PIL import Image

    rng = np.random.default_rng(5)
    for theme in themes:
        (root / theme).mkdir(parents=True, exist_ok=True)
        for n in range(names):
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            Image.new("RGBA", (16, 16), (*colour, 255)).save(root / theme / f"icon-{n:02d}.png")
        (root / theme / ".complete").write_text("test\n")
    return root
