"""The one image decoder: deep greyscale scaled instead of clipped to white or black, EXIF orientation
applied, for queries, collections, training and thumbnails alike (issue D1, D2)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cbir.data.images import decode_image, scale_to_8bit


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


RAMP = np.tile(np.linspace(0.0, 1.0, 64), (16, 1))  # left black → right white


@pytest.mark.parametrize(("mode", "values", "fmt"), [
    ("I;16", (RAMP * 65535).astype(np.uint16), "PNG"),
    ("I", (RAMP * 65535).astype(np.int32), "TIFF"),        # 32-bit int holding 16-bit data
    ("I", (RAMP * 2_000_000_000).astype(np.int32), "TIFF"),  # full 32-bit range
    ("F", RAMP.astype(np.float32), "TIFF"),                # float in [0, 1]
    ("F", (RAMP * 4000 - 1000).astype(np.float32), "TIFF"),  # float, any range
])
def test_deep_greyscale_keeps_its_ramp(mode, values, fmt):
    image = Image.fromarray(values)  # uint16 → I;16, int32 → I, float32 → F
    pixels = decode_image(encoded(image, fmt))
    assert pixels.shape == (16, 64, 3) and pixels.dtype == np.uint8
    row = pixels[0, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253  # black to white, not all white (PIL's clip) or all black
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 50


def test_scale_to_8bit_rules():
    assert scale_to_8bit(np.array([0, 128, 255])).tolist() == [0, 128, 255]  # 8-bit data as it is
    assert scale_to_8bit(np.array([0, 65535], dtype=np.uint16)).tolist() == [0, 255]
    assert scale_to_8bit(np.array([0.0, 0.5, 1.0], dtype=np.float32)).tolist() == [0, 128, 255]
    assert scale_to_8bit(np.array([np.nan, 2.0, 4.0])).tolist() == [0, 0, 255]  # NaN takes the minimum
    assert scale_to_8bit(np.array([7, 7, 7], dtype=np.int32)).tolist() == [7, 7, 7]
    assert scale_to_8bit(np.full(3, 5e6)).tolist() == [0, 0, 0]  # constant out-of-range: no division by zero


def test_exif_orientation_turns_the_image_upright():
    upright = np.zeros((20, 40, 3), dtype=np.uint8)
    upright[:, :20] = (255, 0, 0)  # red left half, blue right half
    upright[:, 20:] = (0, 0, 255)
    # stored rotated as a sideways phone photo is, with orientation 6 (rotate 90° clockwise to view)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = decode_image(encoded(stored, "PNG", exif=exif))
    assert pixels.shape == (20, 40, 3)
    assert pixels[10, 5].tolist() == [255, 0, 0] and pixels[10, 35].tolist() == [0, 0, 255]
    plain = decode_image(encoded(stored, "PNG"))  # no EXIF: as stored
    assert plain.shape == (40, 20, 3)


def test_a_decompression_bomb_in_training_data_is_skipped_or_named(tmp_path):
    """D8: a 400-megapixel PNG of 50 KB among training images: with on_bad_image=skip it is dropped and
    reported, with fail it is one error naming it — never a crash from inside PIL."""
    from cbir.data.catalog import Catalog, Record
    from cbir.data.datasets import RecordDataset
    from cbir.errors import BadImageError

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    catalog = Catalog("t", [Record(str(good), 0, "train"), Record(str(bomb), 0, "train")], ["a"])
    skip = RecordDataset(catalog, [0, 1], lambda image: {"image": image}, on_bad_image="skip")
    assert "image" in skip[0]
    assert "bomb.png" in skip[1]["bad_image"] and "too many pixels" in skip[1]["bad_image"]
    fail = RecordDataset(catalog, [1], lambda image: {"image": image}, on_bad_image="fail")
    with pytest.raises(BadImageError, match="bomb.png"):
        fail[0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_image_is_decoded_reduced_and_its_full_upright_size_reported(fmt):
    """Queries decode at most reduce_to pixels (a JPEG by its decoder's own scaling): a 36 Mpx upload costs one
    decode, not several full-size copies (issue 15 D4); the size reported is the image as sent, upright."""
    from cbir.data.images import decode_image_and_size

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    image = Image.fromarray(wide)
    buffer = io.BytesIO()
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    image.save(buffer, fmt, exif=exif.tobytes())
    pixels, size = decode_image_and_size(buffer.getvalue(), reduce_to=200_000)
    assert size == (1200, 1600)  # upright: the phone held sideways
    assert pixels.shape[0] > pixels.shape[1] and pixels.shape[0] * pixels.shape[1] <= 200_000
    full, full_size = decode_image_and_size(buffer.getvalue())
    assert full.shape == (1600, 1200, 3) and full_size == size
    small = full[::4, ::4].mean(axis=(0, 1))  # the reduced image shows the same picture
    assert np.allclose(pixels.mean(axis=(0, 1)), small, atol=6)
