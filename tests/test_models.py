"""Embedder construction, GeM, and pretrained weight handling (offline)."""

from __future__ import annotations

import pytest
import torch

from cbir.errors import CheckpointError, WeightsUnavailableError
from cbir.models import weights as weights_module
from cbir.models.backbones import BACKBONES
from cbir.models.embedder import build_embedder
from cbir.models.pooling import GeM
from cbir.models.weights import build_pretrained_model, imagenet_cache_path, load_state_dict_file


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_embedder_shapes_and_unit_norm(name):
    embedder = build_embedder(name, pretrained="none", image_size=32).eval()
    with torch.no_grad():
        out = embedder(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 512) == (3, embedder.embedding_dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert list(embedder.backbone.channels)[-1] in ("layer4", "stage5")


def test_gem_interpolates_between_mean_and_max():
    x = torch.rand(2, 4, 5, 5) + 0.1
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3)), atol=1e-5)
    high = GeM(p=50.0)(x)
    assert torch.all(high <= x.amax(dim=(2, 3)) + 1e-4) and torch.all(high > x.mean(dim=(2, 3)))
    assert GeM().p.requires_grad


def test_mobilenet_v2_imagenet_weights_load_offline():
    cache = imagenet_cache_path("mobilenet_v2")
    if not cache.is_file():
        pytest.skip("run `cbir weights fetch mobilenet_v2` (make test does) to seed the cache")
    model = build_pretrained_model("mobilenet_v2", "imagenet")
    reference = torch.load(cache, map_location="cpu", weights_only=True)
    assert set(reference) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def test_missing_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(weights_module, "host_reachable", lambda host, **_: False)
    with pytest.raises(WeightsUnavailableError, match="cbir weights fetch mobilenet_v2"):
        build_pretrained_model("mobilenet_v2", "imagenet")
    with pytest.raises(WeightsUnavailableError, match="resnet34-.*pth from a connected machine"):
        build_pretrained_model("resnet34", "imagenet")


def test_weights_file_with_prefixed_keys(tmp_path):
    source = build_pretrained_model("resnet18", "none")
    state = {"module.pre." + k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    target = build_pretrained_model("resnet18", str(tmp_path / "w.pth"))
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_weights_file_of_wrong_architecture(tmp_path):
    torch.save(build_pretrained_model("resnet18", "none").state_dict(), tmp_path / "r18.pth")
    model = build_pretrained_model("resnet34", "none")
    with pytest.raises(CheckpointError, match="lacks"):
        load_state_dict_file(model, tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(model, tmp_path / "nope.pth")
