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


def test_auto_tuning_keeps_a_pretrained_cnns_stem_and_first_stage(tmp_path):
    def frozen(*overrides: str):
        cfg = compose_config("train", tiny_train_overrides(tmp_path, tmp_path) + ["model=resnet18", *overrides])
        return factory.freeze_stages_for(cfg)

    assert compose_config("train", tiny_train_overrides(tmp_path, tmp_path)).train.tune == "auto"  # the default
    assert frozen("model.pretrained=imagenet") == factory.AUTO_FROZEN_CNN_STAGES == 1
    assert frozen("model.pretrained=imagenet", "model.freeze_stages=3") == 3  # the model's own setting wins
    assert frozen("model.pretrained=none") == 0  # a random trunk has nothing to keep
    assert frozen("model.pretrained=imagenet", "train.tune=full") == 0
    assert frozen("model=dinov2_vits14", "model.pretrained=dinov2") == 0  # ViTs train in full

    # what it freezes: exactly the first stage's parameters (the stem is counted in it)
    cfg = compose_config("train", tiny_train_overrides(tmp_path, tmp_path) + ["model=resnet18"])
    cfg.model.freeze_stages = factory.AUTO_FROZEN_CNN_STAGES
    embedder = factory.build_embedder_from_config(cfg)
    stages = embedder.backbone.stage_parameters()
    first = next(iter(stages))
    assert not any(p.requires_grad for p in stages[first])
    assert all(p.requires_grad for name, params in stages.items() if name != first for p in params)


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


def test_tune_modes_on_a_vit_count_blocks_and_embeddings(tmp_path):
    def vit(*overrides):
        cfg = compose_config("train", tiny_train_overrides(tmp_path, tmp_path) + [
            "model=dinov2_vits14", "model.image_size=28", *overrides])
        return factory.build_embedder_from_config(cfg)

    full = vit()
    per_stage = {stage: sum(p.numel() for p in params) for stage, params in full.backbone.stage_parameters().items()}
    head = trainable(full.head)
    assert trainable(full) == sum(per_stage.values()) + head
    assert trainable(vit("train.tune=head")) == head
    last = vit("train.tune=last:1")
    assert trainable(last) == per_stage["block12"] + head
    blocks = last.backbone.body.blocks
    assert all(p.requires_grad for b in blocks[9:] for p in b.parameters())
    assert not any(p.requires_grad for b in blocks[:9] for p in b.parameters())
    assert not last.backbone.body.pos_embed.requires_grad and last.backbone.body.norm.weight.requires_grad
    with pytest.raises(ConfigError, match="N from 1 to 4"):
        vit("train.tune=last:5")


def test_layer_decay_scales_each_trunk_layer_below_the_head(tmp_path):
    cfg = compose_config("train", tiny_train_overrides(tmp_path, tmp_path) + [
        "model=resnet18", "train.layer_decay=0.5", "optimizer.lr=0.01"])
    module = factory.build_module(cfg, factory.build_embedder_from_config(cfg))
    optimiser = module.configure_optimizers()
    optimiser = optimiser["optimizer"] if isinstance(optimiser, dict) else optimiser
    lrs = {g["name"]: g["lr"] for g in optimiser.param_groups}
    assert lrs["embedder"] == pytest.approx(0.01)  # the head
    assert [lrs[f"trunk.{d}"] for d in range(4)] == pytest.approx([0.01 * 0.5 ** (4 - d) for d in range(4)])
    placed = [id(p) for g in optimiser.param_groups for p in g["params"]]
    assert len(placed) == len(set(placed)) == sum(1 for p in module.embedder.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="layer_decay must lie in"):
        factory.build_module(compose_config("train", tiny_train_overrides(tmp_path, tmp_path) + [
            "model=resnet18", "train.layer_decay=1.5"]), module.embedder)


def test_lora_trains_only_adapters_and_the_head(tmp_path):
    cfg = compose_config("train", tiny_train_overrides(tmp_path, tmp_path) + [
        "model=dinov2_vits14", "model.image_size=28", "train.tune=lora", "train.lora_rank=4"])
    embedder = factory.build_embedder_from_config(cfg)
    per_block = sum(4 * (i + o) for i, o in [(384, 1152), (384, 384), (384, 1536), (1536, 384)])
    assert trainable(embedder) == 12 * per_block + trainable(embedder.head)
    names = {n for n, p in embedder.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert factory.model_config(cfg)["lora"] == {"rank": 4, "alpha": 16.0}
    with pytest.raises(ConfigError, match="is a CNN"):
        build(tmp_path, "train.tune=lora")


def test_merged_lora_weights_give_the_same_embeddings(tmp_path):
    from cbir.models.from_config import embedder_from_model_config
    from cbir.models.lora import merge_lora_state

    cfg = compose_config("train", tiny_train_overrides(tmp_path, tmp_path) + [
        "model=dinov2_vits14", "model.image_size=28", "train.tune=lora", "train.lora_rank=2"])
    adapted = factory.build_embedder_from_config(cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.05)  # B starts at zero: give the adapters something to merge
    model_cfg = factory.model_config(cfg)
    lora = model_cfg.pop("lora")
    plain = embedder_from_model_config(model_cfg, "none").eval()
    plain.load_state_dict(merge_lora_state(adapted.state_dict(), **lora), strict=True)
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        before, merged = adapted(images), plain(images)
    assert torch.allclose(before, merged, atol=1e-5)
    assert not any("lora" in k for k in plain.state_dict())
    base = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    unadapted = embedder_from_model_config(model_cfg, "none").eval()
    unadapted.load_state_dict(base, strict=True)
    with torch.no_grad():
        assert (unadapted(images) - before).abs().max() > 1e-3  # the adapters did change the embedding


def test_a_lora_run_saves_a_checkpoint_that_loads_and_exports_as_a_plain_model(tiny_folder, tmp_path):
    from cbir.commands.train import train
    from cbir.export.bundle import export_bundle
    from cbir.models.checkpoint import load_checkpoint_model

    cfg = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path) + [
        "model=dinov2_vits14", "model.image_size=28", "train.tune=lora", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "test_after_fit=false"])
    train(cfg)
    ckpt = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any(".lora_B." in k for k in saved)
    embedder, model_cfg = load_checkpoint_model(ckpt)
    assert "lora" not in model_cfg and not any("lora" in k for k in embedder.state_dict())
    out = export_bundle(embedder, tmp_path / "bundle", model_config=model_cfg, runtimes=["torchscript"])
    assert (out / "manifest.json").is_file()


def test_the_generic_recipe_composes_and_trains(tiny_folder, tmp_path):
    """experiment=generic (the README's recipe for a folder of photos) runs end to end (tiny and fast here)."""
    from cbir.commands.train import train

    cfg = compose_config("train", ["experiment=generic", f"data.root={tiny_folder}"])
    assert (cfg.model.backbone, cfg.model.pooling, cfg.train.tune) == ("dinov2_vits14", "cls", "full")
    assert cfg.train.layer_decay == 0.75
    assert cfg.model.image_size == 224 and cfg.model.pretrained == "dinov2"
    best_emoji = compose_config("train", ["experiment=emoji"])
    assert (best_emoji.model.backbone, best_emoji.model.image_size, best_emoji.train.layer_decay) == (
        "dinov2_vits14", 98, 0.75)
    assert "albumentations.OneOf" in [t._target_ for t in best_emoji.augment.transforms]  # augment=robust
    fast = compose_config("train", ["experiment=generic", *tiny_train_overrides(tiny_folder, tmp_path)[1:],
                                    "data.image_size=28", "trainer.fast_dev_run=true"])
    train(fast)
