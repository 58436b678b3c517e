"""A user's own config folder adds options to the shipped groups (Hydra's search path), and
``CBIR_CONFIG_DIR`` replaces the shipped folder; a folder without train.yaml is one clear error."""

from __future__ import annotations

import shutil

import pytest

from cbir.commands.runner import check_overrides
from cbir.configs import config_dir
from cbir.errors import ConfigError


def test_search_path_adds_a_data_option(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "my_photos.yaml").write_text(
        (config_dir() / "data" / "folder.yaml").read_text().replace("name: folder", "name: my_photos"))
    with pytest.raises(ConfigError, match="unknown option 'my_photos'"):
        check_overrides("train", ["data=my_photos"])
    check_overrides("train", [f"hydra.searchpath=[file://{tmp_path}]", "data=my_photos", "data.root=/x"])


def test_config_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="CBIR_CONFIG_DIR"):
        config_dir()
    monkeypatch.delenv("CBIR_CONFIG_DIR")
    shutil.copytree(config_dir(), tmp_path / "conf")
    monkeypatch.setenv("CBIR_CONFIG_DIR", str(tmp_path / "conf"))
    assert config_dir() == (tmp_path / "conf").resolve()
