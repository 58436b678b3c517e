"""Thumbnails of indexed images, found by id only (the client never names a path), cached in memory.

An id maps to what the index stored for it: a file path, or ``<dataset>:<array>/<row>`` for array-backed
collections such as Fashion-MNIST, whose pixels come from the collection the index was built from.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageOps

from cbir.data.images import image_to_rgb
from cbir.errors import CbirError
from cbir.search import Searcher

log = logging.getLogger(__name__)


class ThumbnailNotFound(CbirError):
    """No indexed image with this id, or its pixels are gone."""


class Thumbnails:
    """``get(id)`` → (bytes, media type); an LRU of ``capacity`` encoded thumbnails."""

    def __init__(self, searcher: Searcher, *, size: int = 256, capacity: int = 2048) -> None:
        self.searcher, self.size, self.capacity = searcher, int(size), int(capacity)
        self._cache: OrderedDict[int, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: int) -> tuple[bytes, str]:
        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
        entry = self._encode(self._pixels(image_id))
        with self._lock:
            self._cache[image_id] = entry
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return entry

    def warm(self) -> None:
        """Make the first thumbnail of the index (and so load what its pixels come from: a dataset's arrays)."""
        try:
            first = self.searcher.index.first_id()
            if first is not None:
                self.get(int(first))
        except (CbirError, OSError, ValueError) as exc:  # a missing file shows as a broken thumbnail later, not here
            log.info("thumbnail warm-up skipped: %s", exc)

    def _pixels(self, image_id: int) -> Image.Image:
        try:
            source = self.searcher.image_source(image_id)
        except CbirError:
            raise ThumbnailNotFound(f"no indexed image with id {image_id}") from None
        if Path(source).is_file():
            try:
                with Image.open(source) as image:
                    image.draft("RGB", (self.size, self.size))  # JPEG: decode at a reduced scale
                    image.load()
                    upright = ImageOps.exif_transpose(image)
                    if upright.mode.startswith(("I", "F")):  # 16/32-bit, float: scaled as the model sees them
                        return Image.fromarray(image_to_rgb(upright))
                    return upright.copy()
            except (OSError, SyntaxError, ValueError) as exc:
                raise ThumbnailNotFound(f"indexed image {image_id} cannot be read any more ({exc})") from None
        try:  # a row of a dataset array (or a file that is gone): the Searcher reads it or says why not
            return Image.fromarray(self.searcher.load_source(source))
        except CbirError as exc:
            raise ThumbnailNotFound(f"indexed image {image_id}: {exc}") from None

    def _encode(self, image: Image.Image) -> tuple[bytes, str]:
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        image.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
        if max(image.size) < self.size // 2:  # tiny images (28 px): nearest-neighbour upscaling stays crisp
            scale = max(1, self.size // max(image.size))
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        out = io.BytesIO()
        if image.mode in ("RGBA", "LA"):
            image.save(out, "PNG", optimize=True)
            return out.getvalue(), "image/png"
        image.save(out, "JPEG", quality=85)
        return out.getvalue(), "image/jpeg"

