"""The icon-theme reader: icons kept from real .deb packages (one size, no aliases, no repeated pictures),
classes drawn by enough themes, a zero-shot split by name, and clear errors without apt."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from cbir.data.readers import icons
from cbir.errors import DataError

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build test packages")


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (size, size), (*colour, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def build_deb(tmp_path: Path, package: str, files: dict[str, bytes], links: dict[str, str]) -> Path:
    tree = tmp_path / f"{package}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: test <t@example.org>\nDescription: test\n")
    for path, data in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(data)
    for path, target in links.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tree / path)
    deb = tmp_path / f"{package}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    return deb


@pytest.fixture
def themes(tmp_path, monkeypatch):
    """Two fake themes: 'a' (32 px layout) and 'b' (48 px layout)."""
    a = "usr/share/icons/A/32x32"
    b = "usr/share/icons/B/48x48"
    debs = {
        "theme-a": build_deb(tmp_path, "theme-a", {
            f"{a}/actions/edit-copy.png": png((255, 0, 0)),
            f"{a}/actions/edit-cut.png": png((0, 255, 0)),
            f"{a}/actions/edit-cut-again.png": png((0, 255, 0)),  # the same picture under a second name
            f"{a}/places/folder.png": png((0, 0, 255)),
            "usr/share/icons/A/16x16/actions/edit-paste.png": png((9, 9, 9)),  # another size: not kept
        }, {f"{a}/actions/gtk-copy.png": "edit-copy.png"}),  # an alias: not kept
        "theme-b": build_deb(tmp_path, "theme-b", {
            f"{b}/actions/edit-copy.png": png((200, 0, 0)),
            f"{b}/actions/edit-cut.png": png((0, 200, 0)),
            f"{b}/places/folder.png": png((0, 0, 200)),
            f"{b}/places/user-home.png": png((50, 50, 50)),
        }, {}),
    }
    monkeypatch.setattr(icons, "THEMES", {"a": icons.IconTheme("theme-a", f"./{a}/*/*.png"),
                                          "b": icons.IconTheme("theme-b", f"./{b}/*/*.png")})
    calls = []

    def fake_download(package, dest, timeout):
        calls.append(package)
        return shutil.copy(debs[package], dest / debs[package].name) and dest / debs[package].name

    monkeypatch.setattr(icons, "_apt_download", fake_download)
    return calls


def test_fetch_keeps_one_size_and_skips_aliases_and_repeated_pictures(themes, tmp_path):
    root = tmp_path / "icons"
    icons.fetch_icons(root, ["a", "b"])
    assert sorted(p.name for p in (root / "a").glob("*.png")) == ["edit-copy.png", "edit-cut.png", "folder.png"]
    assert sorted(p.name for p in (root / "b").glob("*.png")) == ["edit-copy.png", "edit-cut.png", "folder.png",
                                                                  "user-home.png"]
    icons.fetch_icons(root, ["a", "b"])
    assert themes == ["theme-a", "theme-b"]  # fetched once


def test_classes_are_names_drawn_by_enough_themes_split_zero_shot(themes, tmp_path):
    catalog = icons.read_icons(tmp_path / "icons", ["a", "b"])
    assert catalog.class_names == ["edit-copy", "edit-cut", "folder"]  # user-home: one theme only
    by_class = {}
    for record in catalog.records:
        by_class.setdefault(catalog.class_names[record.label], []).append((record.domain, record.split))
    assert by_class["edit-copy"] == [("a", "train"), ("b", "train")]
    assert {split for _, split in by_class["folder"]} == {"test"}
    assert all(len(views) == 2 for views in by_class.values())


def test_missing_data_without_fetch_and_missing_apt_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="run `cbir data fetch icons`"):
        icons.read_icons(tmp_path / "none", ["tango"], fetch=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get/dpkg-deb are not here"):
        icons.fetch_icons(tmp_path / "none", ["tango"])
    with pytest.raises(DataError, match="icon theme 'nope' is not packaged"):
        icons.fetch_icons(tmp_path / "none", ["nope"])
