"""precision=auto|fp32|bf16: the hardware probe, the export-time bf16 check, and how auto resolves."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbir.errors import ConfigError
from cbir.export.bundle import Preprocessing, synthetic_check_images
from cbir.models import precision
from cbir.models.precision import bf16_parity, check_precision, use_bf16

IMAGES = synthetic_check_images(Preprocessing(input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3), count=48)


class SmallConvNet(nn.Module):
    """A conv + pool embedder: bf16 rounding barely moves its embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, images):
        return F.normalize(F.adaptive_avg_pool2d(F.relu(self.conv(images)), 2).flatten(1), dim=1)


class LargeOffsetNet(nn.Module):
    """Deliberately broken under bf16: the linear layer sees pixels + 1000, which bf16 (8 significant bits,
    steps of 4 near 1000) rounds away, so the bf16 embeddings lose the picture."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * 16 * 16, 16)

    def forward(self, images):
        shifted = images.flatten(1) + 1000.0
        return F.normalize(self.proj(shifted) - self.proj(torch.full_like(shifted, 1000.0)), dim=1)


def test_check_passes_a_model_that_bf16_barely_changes():
    result = bf16_parity(SmallConvNet(), IMAGES)
    assert result["passed"], result
    assert result["cosine_min"] >= precision.MIN_COSINE and result["recall"] >= precision.MIN_RECALL
    assert result["images"] == 48 and result["k"] == 10
    assert set(result["images_per_second"]) == {"fp32", "bf16"}


def test_check_rejects_a_model_that_bf16_breaks():
    result = bf16_parity(LargeOffsetNet(), IMAGES)
    assert not result["passed"]
    assert result["cosine_min"] < 0.9


def test_check_leaves_the_model_as_it_was():
    model = SmallConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bf16_parity(model, IMAGES[:8])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.conv.weight.is_contiguous()  # the channels-last copy was a copy


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_with_native_units_and_a_passed_check(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    passed, failed = {"passed": True}, {"passed": False, "cosine_min": 0.9, "k": 10, "recall": 0.5}
    assert use_bf16("auto", "cpu", passed) is native
    assert use_bf16("auto", "cpu", failed) is False
    assert use_bf16("auto", "cpu", None) is False  # a bundle exported before the check: no evidence, fp32
    assert use_bf16("bf16", "cpu", failed) is True  # asked for explicitly: the user's call
    assert use_bf16("fp32", "cpu", passed) is False


def test_unknown_precision_is_one_clear_error():
    with pytest.raises(ConfigError, match="precision=half: choose from auto, fp32, bf16"):
        check_precision("half")


def test_native_probe_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("CBIR_NATIVE_BF16", raising=False)
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(precision, "Path", lambda _: type("P", (), {"read_text": lambda self: "fpu sse avx2"})())
    try:
        assert precision.native_bf16("cpu") is False
        precision.cpu_has_native_bf16.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
        assert precision.native_bf16(None) is True
        monkeypatch.setenv("CBIR_NATIVE_BF16", "0")
        precision.cpu_has_native_bf16.cache_clear()
        assert precision.native_bf16("cpu") is False  # the override wins over the hardware
    finally:
        precision.cpu_has_native_bf16.cache_clear()
