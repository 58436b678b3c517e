"""The model zoo: adding a bundle (float16 weights, checked), listing, loading by ``zoo:<name>``, starting a
training from it, and the models committed in checkpoints/zoo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.configs import compose_config

from cbir import load_bundle
from cbir.commands import models as models_command
from cbir.errors import ConfigError
from cbir.export.bundle import export_bundle
from cbir.export.zoo import add_to_zoo
from cbir.training.factory import build_embedder_from_config, model_config
from cbir.zoo import ZooError, zoo_dir, zoo_models

TINY = ["model=resnet18", "model.pretrained=none", "model.image_size=32", "head=gem", "head.dim=16"]


@pytest.fixture()
def tiny_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_ZOO", str(tmp_path / "zoo"))
    torch.manual_seed(0)
    cfg = compose_config("train", TINY)
    embedder = build_embedder_from_config(cfg)
    bundle = export_bundle(embedder, tmp_path / "bundle", model_config=model_config(cfg), runtimes=[])
    entry = add_to_zoo(bundle, "tiny", description="a test model", command="none", trained_on="nothing",
                       metrics={"precision_at_1": 0.5})
    return embedder, entry


def test_add_list_and_load_by_name(tiny_zoo, capsys):
    embedder, entry = tiny_zoo
    assert entry["fp16_max_abs_difference"] < 1e-3 and entry["backbone"] == "resnet18"
    assert entry["weights_dtype"] == "float16"
    weights = torch.load(zoo_dir() / "tiny" / "weights.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())  # half the size
    assert set(zoo_models()) == {"tiny"}
    bundle = load_bundle("zoo:tiny")
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    original = embedder.eval()(bundle.to_tensor([image])).detach().numpy()
    assert np.abs(bundle.embed([image]) - original).max() < 1e-3
    assert models_command.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "zoo:tiny" in out and "P@1 50.0" in out
    assert models_command.main(["info", "zoo:tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["weights_sha256"] == entry["weights_sha256"]


def test_training_can_start_from_a_zoo_model(tiny_zoo):
    embedder, _ = tiny_zoo
    started = build_embedder_from_config(compose_config("train", [*TINY, "model.pretrained=zoo:tiny"]))
    for key, value in embedder.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(started.state_dict()[key], value.half().float()), key
    # another head dimension: the trunk still comes from the zoo model, the head starts fresh
    other_head = build_embedder_from_config(compose_config("train", [*TINY, "model.pretrained=zoo:tiny", "head.dim=8"]))
    trunk = started.backbone.state_dict()
    assert all(torch.equal(value, trunk[key]) for key, value in other_head.backbone.state_dict().items())
    assert other_head.embedding_dim == 8
    with pytest.raises(ConfigError, match="is a resnet18 model; use model=resnet18"):
        build_embedder_from_config(compose_config("train", ["model=mobilenet_v2", "model.pretrained=zoo:tiny"]))


def test_unknown_missing_and_damaged_zoo_models_are_clear_errors(tiny_zoo):
    with pytest.raises(ZooError, match="no such model in the zoo; available: tiny"):
        load_bundle("zoo:nope")
    weights = zoo_dir() / "tiny" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-50] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ZooError, match="does not match the SHA-256"):
        build_embedder_from_config(compose_config("train", [*TINY, "model.pretrained=zoo:tiny"]))


def test_committed_zoo_models_load_and_match_their_hashes(monkeypatch):
    monkeypatch.delenv("CBIR_ZOO", raising=False)
    models = zoo_models()
    assert {"fashion_mnist", "emoji"} <= set(models)  # checkpoints/zoo in this repository
    for name, entry in models.items():
        bundle = load_bundle(f"zoo:{name}")  # checks every file against its manifest
        assert bundle.embedding_dim == entry["embedding_dim"] and bundle.input_size == entry["input_size"]
        assert entry["metrics"]["precision_at_1"] > 0.5 and entry["command"].startswith("python ")
        embedding = bundle.embed([np.zeros((28, 28, 3), np.uint8)])
        assert embedding.shape == (1, entry["embedding_dim"]) and np.isfinite(embedding).all()
