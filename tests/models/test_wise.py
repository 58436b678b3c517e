"""WiSE-FT: the exported trunk is alpha * fine-tuned + (1 - alpha) * pretrained; the head is never averaged."""

from __future__ import annotations

import pytest
import torch

from cbir.errors import ConfigError
from cbir.models.embedder import build_embedder
from cbir.models.wise import interpolate_trunk


def pair():
    torch.manual_seed(0)
    fine_tuned = build_embedder("resnet18", pretrained="none", image_size=32)
    torch.manual_seed(1)
    pretrained = build_embedder("resnet18", pretrained="none", image_size=32)
    return fine_tuned, pretrained


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_trunk_is_the_weighted_average_and_the_head_is_kept(alpha):
    fine_tuned, pretrained = pair()
    before, theirs = state(fine_tuned), state(pretrained)
    counts = interpolate_trunk(fine_tuned, pretrained, alpha)
    after = fine_tuned.state_dict()
    assert counts["averaged"] > 0
    for key, value in after.items():
        if key.startswith("backbone.") and value.is_floating_point():
            expected = alpha * before[key] + (1 - alpha) * theirs[key]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, before[key]), key  # head and integer buffers: fine-tuned
    images = torch.randn(2, 3, 32, 32)
    if alpha == 1.0:
        fresh, _ = pair()
        assert torch.allclose(fine_tuned.eval()(images), fresh.eval()(images))


def test_alpha_zero_gives_the_pretrained_trunk_features():
    fine_tuned, pretrained = pair()
    interpolate_trunk(fine_tuned, pretrained, 0.0)
    images = torch.randn(2, 3, 32, 32)
    ours, theirs = fine_tuned.eval().backbone(images), pretrained.eval().backbone(images)
    assert all(torch.allclose(ours[s], theirs[s], atol=1e-6) for s in ours)


def test_bad_alpha_and_mismatched_models_are_config_errors():
    fine_tuned, _ = pair()
    with pytest.raises(ConfigError, match="must lie in"):
        interpolate_trunk(fine_tuned, fine_tuned, 1.5)
    other = build_embedder("mobilenet_v2", pretrained="none", image_size=32)
    with pytest.raises(ConfigError, match="does not match"):
        interpolate_trunk(fine_tuned, other, 0.5)


def test_export_refuses_wise_ft_without_pretrained_weights(tiny_folder, tmp_path):
    from helpers.configs import compose_config, tiny_train_overrides

    from cbir.commands.export import export
    from cbir.commands.train import train
    from cbir.training import factory

    run = tmp_path / "run"  # a run (its config.yaml says model.pretrained=none) and a checkpoint beside it
    train(compose_config("train", tiny_train_overrides(tiny_folder, run) + ["model=resnet18", "trainer=debug"]))
    cfg = compose_config("train", tiny_train_overrides(tiny_folder, run) + ["model=resnet18"])
    module = factory.build_module(cfg, factory.build_embedder_from_config(cfg))
    path = run / "checkpoints" / "manual.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"model_config": factory.model_config(cfg)}, "state_dict": module.state_dict()}, path)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        export(compose_config("export", [f"ckpt_path={path}", f"out={tmp_path / 'b'}", "wise_alpha=0.5",
                                         "runtimes=[]", f"paths.output_dir={tmp_path}"]))
