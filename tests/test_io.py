"""The one writer: a file or folder appears whole under its name, or not at all, with the umask's
permissions."""

from __future__ import annotations

import os
import stat

import pytest

from cbir.io import atomic_folder, atomic_path, atomic_write_json, sha256_file


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "x.json", [1])
        with atomic_folder(tmp_path / "bundle") as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o755


def test_a_folder_is_replaced_whole_or_kept(tmp_path):
    target = tmp_path / "bundle"
    with atomic_folder(target) as staging:
        (staging / "v1").write_text("1")
    with pytest.raises(ValueError):
        with atomic_folder(target) as staging:
            (staging / "v2").write_text("2")
            raise ValueError("export failed")
    assert [p.name for p in target.iterdir()] == ["v1"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging folder left
    with atomic_folder(target) as staging:
        (staging / "v3").write_text("3")
    assert [p.name for p in target.iterdir()] == ["v3"]
    assert len(sha256_file(target / "v3")) == 64
