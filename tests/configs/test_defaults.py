"""Defaults are written once: where a dataclass and a shipped YAML name the same settings, they must agree
(the YAML documents them for the command line, the dataclass for Python callers)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from omegaconf import OmegaConf

from cbir.configs import config_dir, preset
from cbir.index.builder import IndexOptions
from cbir.index.shards import ExtractionOptions
from cbir.models.handcrafted import DescriptorOptions
from cbir.preprocess import build_preprocessor
from cbir.preprocess.calibrate import fit_auto
from cbir.preprocess.query import PRESETS, STEPS


def defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_index_yaml_is_the_index_and_extraction_dataclasses():
    yaml = OmegaConf.to_container(OmegaConf.load(config_dir() / "index" / "auto.yaml"))
    expected = {**defaults(IndexOptions), **defaults(ExtractionOptions)}
    expected.pop("progress")  # a Python-side switch (the CLI always shows progress)
    assert set(yaml) == set(expected), f"keys differ: {set(yaml) ^ set(expected)}"
    assert {k: yaml[k] for k in expected} == expected


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq", "ondisk"])
def test_each_index_kind_yaml_forces_its_kind_only(kind):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"index={kind}", "out=x"])
    assert cfg.index.kind == kind
    from cbir.index.pipeline import split_options

    options = {k: v for k, v in OmegaConf.to_container(cfg.index, resolve=True).items() if k not in ("collection", "out")}
    _, index_options = split_options(options)  # every key is a real setting
    assert index_options.kind == kind


def test_handcrafted_yaml_is_the_descriptor_dataclass():
    yaml = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "handcrafted.yaml"))["descriptor"]
    assert yaml == {k: plain(v) for k, v in defaults(DescriptorOptions).items()}


def test_query_presets_match_their_yaml():
    for name, steps in PRESETS.items():
        from_yaml = build_preprocessor(preset("preprocess", name))
        assert [type(s).name for s in from_yaml.steps] == steps, name
    auto_yaml = preset("preprocess", "auto")["steps"][0]
    auto_defaults = {k: v for k, v in defaults(STEPS["auto"]).items()}
    set_here = {k: v for k, v in auto_yaml.items() if k != "name"}
    assert set_here == {k: auto_defaults[k] for k in set_here}
    # the thresholds a bundle fits to its domain are left out, or they would override the fitted ones
    fitted = set(fit_auto([np.full((8, 8, 3), 200, np.uint8)] * 20)["params"])
    assert not fitted & set(set_here) and fitted <= set(auto_defaults)
    comments = (config_dir() / "preprocess" / "auto.yaml").read_text()
    for key in fitted:  # the shipped values are documented in the file
        assert f"{key}: {auto_defaults[key]}" in comments, key
