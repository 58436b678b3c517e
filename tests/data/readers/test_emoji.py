"""Emoji cross-vendor data: fetch (verified, partial unpack) and reader, on a fake npm package."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from helpers.configs import compose_config
from helpers.emoji_data import fake_package, write_unpacked

from cbir.data.readers import emoji
from cbir.data.readers.emoji import fetch_emoji, read_emoji
from cbir.errors import DataError


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """Route fetch_emoji's `npm pack` to local fake tarballs with their real integrity."""
    tarballs, packages = {}, {}
    for vendor in ("google", "twitter"):
        tarball, integrity = fake_package(vendor, tmp_path / f"{vendor}.tgz")
        package = f"emoji-datasource-{vendor}"
        tarballs[package], packages[vendor] = tarball, (package, integrity)
    monkeypatch.setattr(emoji, "EMOJI_PACKAGES", packages)

    def fake_pack(package, dest, timeout):
        target = dest / tarballs[package].name
        target.write_bytes(tarballs[package].read_bytes())
        return target

    monkeypatch.setattr(emoji, "_npm_pack", fake_pack)
    return packages


def test_fetch_unpacks_only_metadata_and_64px_images(fake_npm, tmp_path):
    root = fetch_emoji(tmp_path / "emoji")
    for vendor in ("google", "twitter"):
        files = sorted(p.relative_to(root / vendor).as_posix() for p in (root / vendor).rglob("*") if p.is_file())
        assert "emoji.json" in files and ".complete" in files
        assert len([f for f in files if f.startswith("64/")]) == 7  # 5 base + 2 skin tones
        assert not any(f.startswith(("32/", "sheets")) or f.endswith("README.md") for f in files)


def test_fetch_rejects_a_tampered_tarball(fake_npm, tmp_path, monkeypatch):
    package, _ = fake_npm["google"]
    monkeypatch.setitem(emoji.EMOJI_PACKAGES, "google", (package, "sha512-" + base64.b64encode(b"x" * 64).decode()))
    with pytest.raises(DataError, match="integrity check failed"):
        fetch_emoji(tmp_path / "emoji", vendors=["google"])
    assert not (tmp_path / "emoji" / "google").exists()


def test_reader_classes_views_and_zero_shot_split(fake_npm, tmp_path):
    catalog = read_emoji(tmp_path / "emoji")
    # classes sorted by code point: 0023-FE0F-20E3, 1F44D, 1F600, 1F680, 2764-FE0F
    assert catalog.class_names == ["0023-FE0F-20E3", "2764-FE0F", "1F44D", "1F600", "1F680"]
    counts = np.bincount(catalog.labels())
    assert counts.tolist() == [2, 2, 6, 2, 2]  # both vendors; thumbs-up adds two skin tones per vendor
    assert set(catalog.labels(catalog.select("train"))) == {0, 1}
    assert set(catalog.labels(catalog.select("test"))) == {2, 3, 4}
    assert {r.domain for r in catalog.records} == {"google", "twitter"}
    google_test = catalog.select("test@google")
    assert len(google_test) == 5 and all(catalog.records[i].domain == "google" for i in google_test)
    assert all("/google/" in catalog.records[i].source for i in google_test)
    no_tones = read_emoji(tmp_path / "emoji", skin_tones=False)
    assert len(no_tones.records) == 10


def test_reader_keeps_only_emoji_both_vendors_draw(tmp_path):
    root = write_unpacked(tmp_path / "emoji", missing=("twitter", "1F600"))
    catalog = read_emoji(root, fetch=False)
    assert "1F600" not in catalog.class_names and len(catalog.class_names) == 4


def test_missing_data_without_fetch_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cbir data fetch emoji"):
        read_emoji(tmp_path / "none", fetch=False)


def test_npm_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="npm is not installed"):
        fetch_emoji(tmp_path / "emoji", vendors=["google"])


def test_cross_vendor_protocol_averages_both_directions(tmp_path, tiny_folder):
    """eval.py protocol=cross_vendor: queries one vendor, gallery the other, both directions averaged."""
    from cbir.commands.eval import evaluate

    root = write_unpacked(tmp_path / "emoji")
    common = ["data=emoji", f"data.root={root}", "data.reader.fetch=false", "data.image_size=32",
              "data.num_workers=0", "model=resnet18", "model.pretrained=none", "trainer.accelerator=cpu",
              "trainer.enable_progress_bar=false"]
    metrics = evaluate(compose_config("eval", common + ["protocol=cross_vendor", f"paths.output_dir={tmp_path / 'a'}"]))
    # test classes 2-4: 5 images per vendor (thumbs-up has 3) -> 5 queries each way
    assert metrics["num_queries"] == 10
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert "queries 'test@google' vs gallery 'test@twitter'" in saved["protocol"] and "averaged" in saved["protocol"]
    with pytest.raises(Exception, match="choose from: test, val, cross_vendor"):
        evaluate(compose_config("eval", common + ["protocol=nope", f"paths.output_dir={tmp_path / 'b'}"]))
