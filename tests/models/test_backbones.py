"""Every backbone × head: shapes, unit norm, stage freezing, frozen BN, multi-scale and fast inference.

Models are built untrained at 32 px with batches of 2, each backbone once per module, to stay fast.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from cbir.errors import ConfigError
from cbir.models.backbones import BACKBONES, Backbone
from cbir.models.embedder import Embedder, build_embedder
from cbir.models.fusion import DOLGHead, FusionHead
from cbir.models.inference import embed, prepare_for_inference
from cbir.models.pooling import GeMHead, resolve_stage

SIZE = 32
FROZEN = 2  # the backbones shared below freeze the stem and their first two stages
HEADS = {
    "gem": partial(GeMHead, dim=24),
    "fusion_concat": partial(FusionHead, dim=24, branch_dim=16),
    "fusion_sum": partial(FusionHead, dim=24, fuse="sum", stages=(1, 2, 3)),
    "dolg": partial(DOLGHead, dim=24, local_dim=16),
}


@pytest.fixture(scope="module")
def backbones() -> dict[str, Backbone]:
    torch.manual_seed(0)
    return {}


def _backbone(cache: dict[str, Backbone], name: str) -> Backbone:
    if name not in cache:
        cache[name] = Backbone(name, freeze_stages=FROZEN)
    return cache[name]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_with_every_head_gives_unit_embeddings(name, backbones):
    trunk = _backbone(backbones, name)
    assert len(trunk.channels) == 4 and all(width > 0 for width in trunk.channels.values())
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        features = trunk.eval()(images)
    assert list(features) == list(trunk.channels)
    assert [f.shape[1] for f in features.values()] == list(trunk.channels.values())
    for head_name, head in HEADS.items():
        embedder = Embedder(trunk, head(channels=trunk.channels), input_size=SIZE).eval()
        with torch.no_grad():
            out = embedder(images)
        assert out.shape == (2, 24) == (2, embedder.embedding_dim), head_name
        assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5), head_name


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_gradients_reach_unfrozen_stages_only(name, backbones):
    trunk = _backbone(backbones, name)
    embedder = Embedder(trunk, DOLGHead(trunk.channels, dim=8, local_dim=8), input_size=SIZE).train()
    embedder.zero_grad(set_to_none=True)
    embedder(torch.randn(2, 3, SIZE, SIZE)).pow(3).sum().backward()
    stages = list(trunk.channels)
    for index, (stage, params) in enumerate(trunk.stage_parameters().items()):
        assert params, f"{stage} has no parameters"
        if index < FROZEN:
            assert all(not p.requires_grad and p.grad is None for p in params), f"{stage} is frozen"
        else:
            assert all(p.grad is not None for p in params), f"a parameter of {stage} got no gradient"
            assert any(p.grad.abs().sum() > 0 for p in params), f"{stage}'s gradients are all zero"
    assert stages[:FROZEN] == sorted(trunk.frozen_stages, key=stages.index)
    assert all(p.grad is not None for p in embedder.head.parameters() if p.requires_grad)


def test_frozen_stages_keep_their_bn_statistics_and_train_mode_survives_train():
    trunk = Backbone("resnet18", freeze_stages="layer2")
    assert trunk.frozen_stages == {"layer1", "layer2"}
    embedder = Embedder(trunk, GeMHead(trunk.channels, dim=8), input_size=SIZE).train()
    frozen_bn, trained_bn = trunk.body.get_submodule("layer2.0.bn1"), trunk.body.get_submodule("layer3.0.bn1")
    assert not frozen_bn.training and trained_bn.training
    before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    embedder(torch.randn(2, 3, SIZE, SIZE))
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(trained_bn.running_mean, before[1])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_bn_frozen_keeps_running_statistics_in_train_mode(name):
    embedder = build_embedder(name, pretrained="none", image_size=SIZE, head=partial(GeMHead, dim=8),
                              bn_frozen=True)
    embedder.eval().train()  # Lightning switches modes every epoch
    norms = [m for m in embedder.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(not m.training for m in norms)
    before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]
    loss = embedder(torch.randn(2, 3, SIZE, SIZE)).sum()
    for m, (mean, var, count) in zip(norms, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert int(m.num_batches_tracked) == count
    loss.backward()  # stats fixed, but the BN affine weights of unfrozen stages still learn
    assert all(m.weight.grad is not None for m in norms)
    assert embedder.head.bn.training  # the head's BN is not the backbone's


def test_freeze_stages_values():
    trunk = Backbone("mobilenet_v2", freeze_stages="all")
    assert trunk.frozen_stages == set(trunk.channels)
    assert not any(p.requires_grad for p in trunk.parameters())
    assert Backbone("mobilenet_v2", freeze_stages=-1).frozen_stages == set(trunk.channels)
    assert Backbone("mobilenet_v2", freeze_stages=0).frozen_stages == set()
    assert Backbone("mobilenet_v2", freeze_stages="1").frozen_stages == {"stage2"}
    with pytest.raises(ConfigError, match="freeze_stages"):
        Backbone("mobilenet_v2", freeze_stages=5)
    for wrong in ("layer3", True):
        with pytest.raises(ConfigError, match="freeze_stages"):
            Backbone("mobilenet_v2", freeze_stages=wrong)


def test_stages_by_name_or_index_and_clear_errors():
    channels = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert resolve_stage(channels, None) == "layer4" and resolve_stage(channels, -2) == "layer3"
    assert resolve_stage(channels, "layer2") == resolve_stage(channels, "1") == "layer2"
    assert FusionHead(channels, stages=["layer3", "layer4"]).stages == ["layer3", "layer4"]
    with pytest.raises(ConfigError, match="head.stage='stage5' is not a backbone stage"):
        GeMHead(channels, stage="stage5")
    with pytest.raises(ConfigError, match="two or more"):
        FusionHead(channels, stages=[-1])
    with pytest.raises(ConfigError, match="head.fuse"):
        FusionHead(channels, fuse="max")
    with pytest.raises(ConfigError, match="two different stages"):
        DOLGHead(channels, local_stage="layer4")


def test_dolg_local_part_is_orthogonal_to_the_global_vector():
    torch.manual_seed(0)
    channels = {"a": 8, "b": 16}
    head = DOLGHead(channels, dim=12, local_dim=10).eval()
    features = {"a": torch.randn(3, 8, 6, 6), "b": torch.rand(3, 16, 3, 3)}
    global_vec, local_vec = head.orthogonal_parts(features)
    assert global_vec.shape == local_vec.shape == (3, 10)
    cosine = torch.nn.functional.cosine_similarity(global_vec, local_vec, dim=1)
    assert cosine.abs().max() < 1e-5 and local_vec.norm(dim=1).min() > 0
    assert head(features).shape == (3, 12)


def test_fusion_sum_starts_with_equal_weights_and_learns_them():
    head = FusionHead({"a": 8, "b": 16}, dim=4, fuse="sum").train()
    features = {"a": torch.rand(4, 8, 3, 3), "b": torch.rand(4, 16, 2, 2)}
    assert torch.allclose(torch.softmax(head.fuse_logits, 0), torch.full((2,), 0.5))
    head(features).pow(2).sum().backward()
    assert head.fuse_logits.grad is not None


def test_multi_scale_inference_is_a_power_mean_of_per_scale_embeddings():
    torch.manual_seed(0)
    embedder = build_embedder("resnet18", pretrained="none", image_size=64, head=partial(GeMHead, dim=16),
                              scales=(1, 0.7071, 0.5)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = embedder(images)
        per_scale = [embedder.embed_single_scale(torch.nn.functional.interpolate(
            images, size=(round(64 * s),) * 2, mode="bilinear", antialias=s < 1)) for s in embedder.scales]
        single = embedder.embed_single_scale(images)
    expected = torch.nn.functional.normalize(torch.stack(per_scale).mean(0), dim=1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(out, single, atol=1e-3)

    embedder.set_scales([1, 0.5], power=3.0)
    with torch.no_grad():
        cubed = embedder(images)
    assert torch.allclose(cubed.norm(dim=1), torch.ones(2), atol=1e-5)
    embedder.train()  # training always embeds one scale
    assert torch.allclose(embedder(images), embedder.embed_single_scale(images))
    with pytest.raises(ConfigError, match="scales"):
        embedder.set_scales([1, 0])


def test_inference_helper_channels_last_bf16_and_compile_agree_with_fp32():
    torch.manual_seed(0)
    embedder = build_embedder("resnet18", pretrained="none", image_size=64, head=partial(GeMHead, dim=16)).eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        reference = embedder(images)
    model = prepare_for_inference(embedder, channels_last=True)
    assert embedder.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    fast = embed(model, images, channels_last=True)
    assert torch.allclose(fast, reference, atol=1e-4)
    low = embed(model, images, channels_last=True, bf16=True)
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low, reference).min() > 0.98
    compiled = prepare_for_inference(embedder, compile="eager")  # traced by dynamo, no C++ build
    assert torch.allclose(embed(compiled, images), reference, atol=1e-4)


def test_extract_speed_benchmark_runs_and_writes_json(tmp_path, capsys, monkeypatch):
    """A tiny run of benchmarks/extract_speed.py, so the script keeps working."""
    import importlib.util
    import json
    import sys

    from helpers.paths import ROOT

    script = ROOT / "benchmarks" / "extract_speed.py"
    spec = importlib.util.spec_from_file_location("extract_speed", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "extract_speed", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.main(["--model", "resnet18", "--size", "32", "--batch", "2", "--iters", "1", "--warmup", "0",
                        "--variants", "fp32,bf16+channels_last", "--out", str(tmp_path / "speed.json")]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert [r["variant"] for r in result["results"]] == ["fp32", "bf16+channels_last"]
    assert all(r["bare_img_per_s"] > 0 and r["ours_img_per_s"] > 0 for r in result["results"])
    assert "| fp32" in capsys.readouterr().out
