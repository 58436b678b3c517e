"""Benchmark data fetched once from a registry into one folder per source (``data/emoji/google``,
``data/icons/tango``): the folder appears whole, with a ``.complete`` mark, or not at all."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from cbir.io import atomic_folder

COMPLETE = ".complete"


def is_fetched(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def fetch_once(folder: Path, fill: Callable[[Path, Path], str]) -> bool:
    """Fill ``folder`` unless it is complete already: ``fill(download_dir, staging)`` downloads into a
    temporary folder, writes what to keep into ``staging`` and returns the text of the ``.complete`` mark.
    ``staging`` replaces ``folder`` only when ``fill`` returns, so a failed or interrupted fetch leaves
    nothing half-written. Returns whether it fetched."""
    if is_fetched(folder):
        return False
    with tempfile.TemporaryDirectory() as download, atomic_folder(folder) as staging:
        mark = fill(Path(download), staging)
        (staging / COMPLETE).write_text(mark)
    return True
