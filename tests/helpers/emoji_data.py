"""Fake emoji data: tarballs shaped like the emoji-datasource-<vendor> npm packages, and the folder
`cbir data fetch emoji` leaves on disk, both for five base emoji (one with two skin tones)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# (unified, skin variations) — five base emoji, one with two skin tones; code points deliberately unsorted
ENTRIES = [("1F600", []), ("0023-FE0F-20E3", []), ("1F44D", ["1F44D-1F3FB", "1F44D-1F3FF"]),
           ("2764-FE0F", []), ("1F680", [])]


def _png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 4), colour, dtype=np.uint8), mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _metadata(vendors=("google", "twitter"), missing: tuple[str, str] | None = None) -> list[dict]:
    entries = []
    for code, tones in ENTRIES:
        entry = {"unified": code, "image": code.lower() + ".png"}
        for v in vendors:
            entry[f"has_img_{v}"] = missing != (v, code)
        entry["skin_variations"] = {t.split("-")[-1]: {"unified": t, "image": t.lower() + ".png",
                                                       **{f"has_img_{v}": True for v in vendors}} for t in tones}
        entries.append(entry)
    return entries


def fake_package(vendor: str, path: Path, missing=None) -> tuple[Path, str]:
    """A tarball shaped like emoji-datasource-<vendor> (plus files that must not be unpacked)."""
    members = {"package/emoji.json": json.dumps(_metadata(missing=missing)).encode(),
               "package/README.md": b"readme",
               f"package/img/{vendor}/sheets/64.png": _png(1)}
    for i, (code, tones) in enumerate(ENTRIES):
        for name in [code, *tones]:
            members[f"package/img/{vendor}/64/{name.lower()}.png"] = _png(10 * i)
            members[f"package/img/{vendor}/32/{name.lower()}.png"] = _png(10 * i)
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()
    return path, integrity


def write_unpacked(root: Path, missing=None) -> Path:
    """What `cbir data fetch emoji` leaves on disk, for the fake entries."""
    for vendor in ("google", "twitter"):
        (root / vendor / "64").mkdir(parents=True)
        (root / vendor / "emoji.json").write_text(json.dumps(_metadata(missing=missing)))
        for i, (code, tones) in enumerate(ENTRIES):
            for name in [code, *tones]:
                (root / vendor / "64" / f"{name.lower()}.png").write_bytes(_png(40 * i))
        (root / vendor / ".complete").write_text("x")
    return root
