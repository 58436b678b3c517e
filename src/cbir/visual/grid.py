"""Result grids: a query and its hits as thumbnails with rank and score, bordered green or red when the
labels say right or wrong. Drawn by ``search.py grid=...``, the web page's examples and training's
retrieval pictures alike."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.data.images import decode_image
from cbir.errors import CbirError
from cbir.io import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    """One hit as drawn: its rank, score, where its pixels are (``path``, given to ``load``) and label."""

    rank: int
    score: float
    path: str
    label: str | None


GRID_PAD, GRID_CAPTION, GRID_BORDER = 6, 16, 4  # pixels around tiles, under tiles (text), of a tile's border
GRID_QUERY, GRID_CORRECT, GRID_WRONG = "#3366cc", "#22aa44", "#cc3333"  # border colours


def save_grid(query_image: np.ndarray, hits: Sequence[Tile], out_path: str | Path, *, query_label: str | None = None,
              thumb: int = 160, columns: int = 5, load=None) -> Path:
    """A PNG of :func:`render_grid`."""
    picture = render_grid(query_image, hits, query_label=query_label, thumb=thumb, columns=columns, load=load)
    with atomic_path(out_path) as temp:
        picture.save(temp, format="PNG")
    return Path(out_path)


def render_grid(query_image: np.ndarray, hits: Sequence[Tile], *, query_label: str | None = None,
                thumb: int = 160, columns: int = 5, load=None) -> Image.Image:
    """The query (left) and its hits with rank and score; when labels are known, a green border marks a
    hit with the query's label and a red border one without. ``load(hit.path)`` gives a hit's pixels
    (default: open the file; :meth:`Searcher.load_source` also reads dataset arrays). Training's
    retrieval examples (:mod:`cbir.training.visuals`) stack one such grid per query. A hit is anything
    with ``rank``, ``score``, ``path`` and ``label`` (:class:`cbir.search.Hit`, :class:`Tile`)."""
    from PIL import ImageDraw, ImageOps

    caption, pad, border = GRID_CAPTION, GRID_PAD, GRID_BORDER
    rows = max(1, math.ceil(len(hits) / columns))
    width = pad + (thumb + pad) * (columns + 1)
    height = pad + rows * (thumb + caption + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def paste(image: Image.Image, x: int, y: int, text: str, colour: str | None) -> None:
        tile = ImageOps.pad(image.convert("RGB"), (thumb - 2 * border, thumb - 2 * border), color="white")
        if colour:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=colour)
        canvas.paste(tile, (x + border, y + border))
        draw.text((x, y + thumb + 2), text[:max(6, min(28, thumb // 6))], fill="black")  # ~6 px a character

    paste(Image.fromarray(query_image), pad, pad, "query" + (f" ({query_label})" if query_label else ""), GRID_QUERY)
    for n, hit in enumerate(hits):
        x = pad + (thumb + pad) * (1 + n % columns)
        y = pad + (thumb + caption + pad) * (n // columns)
        try:
            picture = Image.fromarray(load(hit.path) if load is not None else decode_image(hit.path, max_pixels=None))
        except (OSError, TypeError, ValueError, CbirError) as exc:  # a missing picture never stops the grid
            log.warning("result grid: cannot show %s (%s)", hit.path, exc)
            picture = Image.new("RGB", (thumb, thumb), "#dddddd")
        colour = None
        if query_label is not None and hit.label is not None:
            colour = GRID_CORRECT if hit.label == query_label else GRID_WRONG
        match = getattr(hit, "match", None)  # a calibrated index's hits: the match probability reads better
        paste(picture, x, y, f"#{hit.rank} {hit.score:.3f}" + (f" {100 * match:.0f}%" if match is not None else ""),
              colour)
    return canvas
