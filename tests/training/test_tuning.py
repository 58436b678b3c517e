"""Tuning modes train exactly the parameters they say, and the distillation term keeps a frozen copy of
the pretrained trunk that never learns."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import compose_config, tiny_train_overrides

from cbir.errors import ConfigError
from cbir.training import factory


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build(tmp_path, *overrides: str):
    cfg = compose_config("train", tiny_train_overrides(tmp_path, tmp_path) + ["model=resnet18", *overrides])
    return cfg, factory.build_embedder_from_config(cfg)


def test_tune_modes_count_their_parameters(tmp_path):
    _, full = build(tmp_path)
    stages = full.backbone.stage_parameters()
    per_stage = {stage: sum(p.numel() for p in params) for stage, params in stages.items()}
    head = trainable(full.head)
    assert trainable(full) == sum(per_stage.values()) + head > 0

    _, head_only = build(tmp_path, "train.tune=head")
    assert trainable(head_only) == head and trainable(head_only.backbone) == 0

    names = list(per_stage)
    for n in (1, 2, len(names)):
        _, last = build(tmp_path, f"train.tune=last:{n}")
        assert trainable(last) == sum(per_stage[s] for s in names[-n:]) + head, n
        frozen = [s for s in names[:-n] if any(p.requires_grad for p in last.backbone.stage_parameters()[s])]
        assert not frozen


@pytest.mark.parametrize("tune,message", [("last:0", "choose from"), ("last:9", "N from 1 to"), ("some", "choose from")])
def test_bad_tune_modes_are_config_errors(tmp_path, tune, message):
    with pytest.raises(ConfigError, match=message):
        build(tmp_path, f"train.tune={tune}")
    with pytest.raises(ConfigError, match="choose one way"):
        build(tmp_path, "train.tune=head", "model.freeze_stages=2")


def test_distillation_teacher_is_frozen_and_pulls_towards_the_pretrained_structure(tmp_path):
    from cbir.training.distill import SimilarityDistillation

    cfg, embedder = build(tmp_path, "train.distill_weight=1.0")
    module = factory.build_module(cfg, embedder)
    assert module.distill is not None and trainable(module.distill) == 0
    teacher_before = {k: v.clone() for k, v in module.distill.teacher.state_dict().items()}
    optimiser = module.configure_optimizers()
    optimiser = optimiser["optimizer"] if isinstance(optimiser, dict) else optimiser
    assert not {id(p) for p in module.distill.parameters()} & {id(p) for g in optimiser.param_groups for p in g["params"]}

    images = torch.randn(6, 3, 32, 32)
    batch = {"image": images, "label": torch.tensor([0, 0, 1, 1, 2, 2]), "bad_images": []}
    module.train()
    loss = module.training_step(batch, 0)
    loss.backward()
    optimiser.step()
    after = module.distill.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in after)  # the teacher never learns

    distill = SimilarityDistillation(embedder.backbone)
    same = distill.teacher_embeddings(images)
    assert float(distill(images, same)) == pytest.approx(0.0, abs=1e-6)  # identical structure: no pull
    assert float(distill(images, torch.randn(6, 16))) > 0.01
