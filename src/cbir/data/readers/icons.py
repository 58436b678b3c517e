"""Icon-theme benchmark: the same freedesktop icon names drawn by several desktop icon themes, taken from
Debian packages (PNG themes only, so no SVG renderer is needed): tango (32 px), gnome, moka, oxygen and
elementary-xfce (48 px); mate is packaged too but left out by default (see ``DEFAULT_THEMES``).

A class is a standard icon name (``document-open``, ``edit-copy``, ``folder``...); its views are the
themes that draw it (``Record.domain`` is the theme). Names drawn by fewer than ``min_themes`` themes are
left out. Classes are sorted by name; the first half is ``train``, the second ``test`` (zero-shot, like
emoji), so a model trained on emoji or on the icon training half is scored on names it never saw.

``fetch_icons`` downloads each theme's package with ``apt-get download`` (no root needed, nothing is
installed), streams the package's file tree out of the ``.deb`` with ``dpkg-deb --fsys-tarfile`` and keeps
one size of each icon (``data/icons/<theme>/<name>.png``). Aliases (symlinks) are skipped, and an image
that a theme repeats byte for byte under a second name keeps only its first name, so no two classes share
a picture.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from pathlib import Path, PurePosixPath

from cbir.data.catalog import Catalog, Record
from cbir.data.readers.fetched import fetch_once, is_fetched
from cbir.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("data/icons")


@dataclass(frozen=True)
class IconTheme:
    package: str  # Debian package
    pattern: str  # the PNGs kept, as a glob over the package's paths (one size)


THEMES: dict[str, IconTheme] = {
    "tango": IconTheme("tango-icon-theme", "./usr/share/icons/Tango/32x32/*/*.png"),
    "gnome": IconTheme("gnome-icon-theme", "./usr/share/icons/gnome/48x48/*/*.png"),
    "mate": IconTheme("mate-icon-theme", "./usr/share/icons/mate/48x48/*/*.png"),
    "moka": IconTheme("moka-icon-theme", "./usr/share/icons/Moka/48x48/*/*.png"),
    "oxygen": IconTheme("oxygen-icon-theme", "./usr/share/icons/oxygen/base/48x48/*/*.png"),
    "elementary": IconTheme("elementary-xfce-icon-theme", "./usr/share/icons/elementary-xfce/*/48/*.png"),
}
# mate is a fork of gnome's icons (most of its drawings are gnome's, re-rendered): views that near-copy
# another view would make the benchmark easy, so it is packaged but not in the default set
DEFAULT_THEMES = ("tango", "gnome", "moka", "oxygen", "elementary")


def fetch_icons(root: str | os.PathLike = DEFAULT_ROOT, themes: Sequence[str] = DEFAULT_THEMES,
                timeout: float = 600.0) -> Path:
    """Download each theme's Debian package and keep its icons in ``root/<theme>/`` (once; idempotent)."""
    root = Path(root)
    for theme in themes:
        if fetch_once(root / theme, partial(_fetch_theme, theme, timeout=timeout)):
            log.info("icons: %s unpacked into %s", THEMES[theme].package, root / theme)
    return root


def _fetch_theme(theme: str, download: Path, staging: Path, timeout: float) -> str:
    """``apt-get download`` one theme's package into ``download`` and keep its icons in ``staging``."""
    spec = _theme(theme)
    deb = _apt_download(spec.package, download, timeout)
    kept = _extract_icons(deb, spec.pattern, staging)
    if not kept:
        raise DataError(f"{deb.name}: no icon matches {spec.pattern} (has the package changed layout?)")
    return f"{deb.name}\n{kept} icons\n"


def _theme(theme: str) -> IconTheme:
    try:
        return THEMES[theme]
    except KeyError:
        raise DataError(f"icon theme {theme!r} is not packaged; choose from {', '.join(THEMES)}") from None


def _apt_download(package: str, dest: Path, timeout: float) -> Path:
    apt = shutil.which("apt-get")
    if apt is None or shutil.which("dpkg-deb") is None:
        raise DataError(f"the icons data comes from the Debian package {package}, and apt-get/dpkg-deb are not "
                        "here: run `cbir data fetch icons` on a Debian/Ubuntu machine and copy data/icons")
    try:
        subprocess.run([apt, "download", package], cwd=dest, check=True, capture_output=True, text=True,
                       timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DataError(f"apt-get download {package} timed out after {timeout:.0f}s (offline?)") from None
    except subprocess.CalledProcessError as exc:
        reason = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"apt-get download {package} failed ({reason[0]}); run `apt-get update`, or fetch "
                        "on a connected machine and copy data/icons") from None
    debs = list(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise DataError(f"apt-get download {package} left no package file in {dest}")
    return debs[0]


def _extract_icons(deb: Path, pattern: str, staging: Path) -> int:
    """Stream the package's files and write the regular PNGs matching ``pattern`` as ``<name>.png``; a
    name seen twice (two contexts) or a picture seen twice (the same bytes under another name) is skipped."""
    names: set[str] = set()
    digests: set[str] = set()
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc, \
            tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
        members = ((m, archive.extractfile(m).read()) for m in archive if m.isfile() and fnmatch(m.name, pattern))
        for member, data in sorted(members, key=lambda item: PurePosixPath(item[0].name).stem):
            name = PurePosixPath(member.name).stem
            digest = hashlib.sha256(data).hexdigest()
            if name in names or digest in digests:
                continue
            names.add(name)
            digests.add(digest)
            (staging / f"{name}.png").write_bytes(data)
    if proc.returncode != 0:
        raise DataError(f"dpkg-deb could not read {deb.name} (exit code {proc.returncode})")
    return len(names)


def read_icons(root: str | os.PathLike = DEFAULT_ROOT, themes: Sequence[str] = DEFAULT_THEMES, min_themes: int = 2,
               fetch: bool = True) -> Catalog:
    """Icon names drawn by at least ``min_themes`` of ``themes``, one view per theme, split zero-shot by
    name. Fetches the packages first when ``fetch`` and they are absent."""
    root = Path(root)
    if not all(is_fetched(root / theme) for theme in themes):
        if not fetch:
            raise DataError(f"icons data missing under {root}: run `cbir data fetch icons`")
        fetch_icons(root, themes)
    views: dict[str, list[tuple[str, str]]] = {}
    for theme in themes:
        for path in sorted((root / theme).glob("*.png")):
            views.setdefault(path.stem, []).append((theme, str(path)))
    classes = sorted(name for name, found in views.items() if len(found) >= max(2, int(min_themes)))
    if not classes:
        raise DataError(f"no icon name under {root} is drawn by {min_themes} or more of the themes {list(themes)}")
    first_test = len(classes) // 2
    records = [Record(path, label, "train" if label < first_test else "test", domain=theme)
               for label, name in enumerate(classes) for theme, path in views[name]]
    return Catalog("icons", records, classes)
