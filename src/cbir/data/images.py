"""The one image decoder and the one list of image file types, for training data, collections to index,
queries and thumbnails alike.

Every decoded image is HxWx3 uint8 RGB, turned upright by its EXIF orientation (as viewers and the
thumbnails show it): grey is replicated to three channels, 16/32-bit and float grey scaled to 8 bits, and
transparency composited onto white. The content decides the format, never the file name.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cbir.data.catalog import ArrayRef, Catalog
from cbir.errors import BadImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 6300x6300 photo; larger is refused before decoding (decompression bombs)
ORIENTATION_TAG = 0x0112  # EXIF orientation: 5-8 turn the image by 90 degrees


class ImageTooLargeError(BadImageError):
    """An image has more pixels than allowed (checked before decoding: decompression bombs)."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root``, recursively, sorted."""
    return sorted(p for p in Path(root).rglob("*") if is_image_file(p))


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of a decoded PIL image, transparency composited onto white; 16-bit, 32-bit
    integer and float greyscale scaled to 8 bits (see :func:`scale_to_8bit`)."""
    if image.mode.startswith(("I", "F")):
        grey = scale_to_8bit(np.asarray(image))
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"))


def scale_to_8bit(values: np.ndarray) -> np.ndarray:
    """Greyscale of any depth as uint8: integers up to 255 as they are, up to 65535 as 16-bit (``/257``),
    wider ones and floats outside [0, 1] stretched from their minimum to their maximum; floats in [0, 1]
    times 255. (PIL's own ``convert("RGB")`` clips these modes at 255: a 16-bit image turns white.)"""
    values = np.asarray(values)
    if values.size == 0:
        return values.astype(np.uint8)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    data = np.nan_to_num(values.astype(np.float64), nan=low, posinf=high, neginf=low)
    if values.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        scaled = data * 255.0
    elif values.dtype.kind in "iu" and low >= 0 and high <= 255:
        scaled = data
    elif values.dtype.kind in "iu" and low >= 0 and high <= 65535:
        scaled = data / 257.0
    else:
        scaled = (data - low) * (255.0 / (high - low)) if high > low else np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_image(source: str | os.PathLike | bytes, *, name: str | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, what: str = "image",
                 reduce_to: int | None = None) -> np.ndarray:
    """Decode a file, or the raw bytes of an upload, into HxWx3 uint8 RGB.

    An empty, missing, truncated or non-image input, or one with more than ``max_pixels`` pixels (None:
    PIL's own bomb limit only), raises :class:`BadImageError` naming ``name`` (or the path); ``what``
    says which kind of image it is in the message (``query``, ``image``). ``reduce_to``: an image with more
    pixels comes back shrunk to at most that many (see :func:`decode_image_and_size`)."""
    return decode_image_and_size(source, name=name, max_pixels=max_pixels, what=what, reduce_to=reduce_to)[0]


def decode_image_and_size(source: str | os.PathLike | bytes, *, name: str | None = None,
                          max_pixels: int | None = DEFAULT_MAX_PIXELS, what: str = "image",
                          reduce_to: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`decode_image`, and the (width, height) of the full image, upright. With ``reduce_to``, a larger
    image is decoded reduced — a JPEG at 1/2, 1/4 or 1/8 scale by its decoder (``Image.draft``), any image
    then box-reduced by an integer factor — so a 36 Mpx upload costs one full decode at most, not the
    several full-size copies that conversion and clean-up would make."""
    label = name or (str(source) if not isinstance(source, bytes) else "upload")
    if isinstance(source, bytes):
        if not source:
            raise BadImageError(f"{what} {label}: empty file (0 bytes)")
        handle = io.BytesIO(source)
    else:
        path = Path(source)
        if path.is_dir():
            raise BadImageError(f"{what} {label}: is a folder, not an image file")
        if not path.is_file():
            raise BadImageError(f"{what} {label}: file does not exist")
        if path.stat().st_size == 0:
            raise BadImageError(f"{what} {label}: empty file (0 bytes)")
        try:
            handle = path.open("rb")
        except OSError as exc:  # permissions, a folder, a vanished file
            raise BadImageError(f"{what} {label}: cannot read file ({exc.strerror or exc})") from None
    try:
        with handle, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLargeError(f"{what} {label}: {width}x{height} pixels is more than the limit "
                                             f"of {max_pixels:,} pixels")
                turned = image.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)
                size = (height, width) if turned else (width, height)
                if reduce_to is not None and width * height > reduce_to:
                    factor = math.ceil(math.sqrt(width * height / reduce_to))
                    if image.format == "JPEG":
                        image.draft(image.mode, (width // factor, height // factor))  # decoder-side scaling
                image.load()
                if reduce_to is not None and image.width * image.height > reduce_to:
                    try:
                        image = image.reduce(math.ceil(math.sqrt(image.width * image.height / reduce_to)))
                    except ValueError:  # a mode reduce() does not take (palette, 1-bit): the full image then
                        pass
                pixels = image_to_rgb(ImageOps.exif_transpose(image))  # upright, as viewers show it
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"{what} {label}: cannot decode: not an image, or an unsupported image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{what} {label}: too many pixels to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"{what} {label}: cannot decode image ({exc})") from None
    if pixels.size == 0:
        raise BadImageError(f"{what} {label}: image has no pixels")
    return np.ascontiguousarray(pixels), size


def load_image(catalog: Catalog | None, source: str | ArrayRef,
               box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of one record: a file, or a row of one of ``catalog``'s arrays. ``box``
    (x, y, w, h in pixels) crops to an annotated object, clipped to the image since benchmark boxes may
    overhang its border."""
    if isinstance(source, ArrayRef):
        pixels = catalog.arrays[source.array][source.index]
    else:
        pixels = decode_image(source, max_pixels=None)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if box is not None:
        x, y, w, h = box
        height, width = pixels.shape[:2]
        left, right = np.clip([np.floor(x), np.ceil(x + w)], 0, width).astype(int)
        top, bottom = np.clip([np.floor(y), np.ceil(y + h)], 0, height).astype(int)
        if right <= left or bottom <= top:
            raise BadImageError(f"box {box} (x, y, w, h) lies outside image {source} ({width}x{height})")
        pixels = pixels[top:bottom, left:right]
    return np.ascontiguousarray(pixels)


def load_record(catalog: Catalog, index: int) -> np.ndarray:
    record = catalog.records[index]
    return load_image(catalog, record.source, record.box)


def cached_loader(catalog: Catalog, cache: dict[int, np.ndarray] | None = None) -> Callable[[int], np.ndarray]:
    """Record index → pixels, from ``cache`` when decoded already."""
    cache = cache or {}

    def pixels_of(index: int) -> np.ndarray:
        return cache[index] if index in cache else load_record(catalog, index)

    return pixels_of
