"""train.consistency_weight: each augmented view is pulled towards its own clean image's embedding (the
evaluation transform), with no gradient through the clean side."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import compose_config, tiny_train_overrides

from cbir.errors import ConfigError
from cbir.training import factory
from cbir.training.consistency import consistency_loss


def unit(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_the_term_is_zero_on_agreement_and_only_the_augmented_view_gets_a_gradient():
    clean = unit(5)
    assert float(consistency_loss(clean.clone(), clean)) == pytest.approx(0.0, abs=1e-6)
    assert float(consistency_loss(-clean, clean)) == pytest.approx(2.0, abs=1e-6)  # opposite: the maximum
    augmented = unit(5, seed=1).requires_grad_(True)
    target = clean.clone().requires_grad_(True)
    value = consistency_loss(augmented, target)
    assert 0.1 < float(value.detach()) < 2.0
    value.backward()
    assert augmented.grad is not None and float(augmented.grad.abs().sum()) > 0
    assert target.grad is None  # the clean image is the fixed target
    with pytest.raises(ValueError, match="clean ones"):
        consistency_loss(unit(5), unit(4))


def robust_config(root, tmp_path, *overrides):
    return compose_config("train", tiny_train_overrides(root, tmp_path) + [
        "augment=robust", "augment.p=1.0", "train.consistency_weight=1.0", *overrides])


def test_the_clean_view_is_the_same_crop_and_flip_without_the_damage():
    import albumentations as A
    import numpy as np

    from cbir.data.transforms import CleanAndAugmented, eval_transform

    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    views = CleanAndAugmented([A.HorizontalFlip(p=1.0), A.GaussNoise(std_range=(0.2, 0.2), p=1.0)], 32, mean, std,
                              seed=0)(image=image)
    flipped = eval_transform(32, mean, std)(image=np.ascontiguousarray(image[:, ::-1]))["image"]
    assert torch.equal(views["clean_image"], flipped)  # the flip is shared, the noise is not
    assert not torch.equal(views["image"], flipped)
    noise = (views["image"] - flipped).std()
    assert 0.3 < float(noise) < 2.0  # the augmented view is the same flipped picture plus the noise


def test_training_batches_carry_each_crops_clean_view(tiny_folder, tmp_path):
    from cbir.data.transforms import CleanAndAugmented

    cfg = robust_config(tiny_folder, tmp_path)
    catalog = factory.build_catalog(cfg.data)
    embedder = factory.build_embedder_from_config(cfg)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    assert isinstance(datamodule.train_tf, CleanAndAugmented)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["clean_image"].shape == batch["image"].shape
    assert not torch.equal(batch["clean_image"], batch["image"])  # the training view is degraded (p=1)

    plain = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path) + ["augment=robust"])
    plain_batch = next(iter(factory.build_datamodule(plain, catalog, embedder).train_dataloader()))
    assert "clean_image" not in plain_batch  # off by default: no second view made


def test_the_term_adds_to_the_loss_and_training_on_it_pulls_damaged_views_home(tiny_folder, tmp_path):
    clean = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    damaged = clean + 0.5 * torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = {"image": damaged, "clean_image": clean, "label": torch.tensor([0, 0, 1, 1, 2, 2]), "bad_images": []}

    def trained(weight: float):
        """The same initial model, 30 SGD steps on the same batch, with the term at ``weight``; its term after
        (BatchNorm on its running statistics, so training and evaluation see the same network)."""
        torch.manual_seed(0)
        cfg = robust_config(tiny_folder, tmp_path, f"train.consistency_weight={weight}", "model.bn_frozen=true")
        module = factory.build_module(cfg, factory.build_embedder_from_config(cfg))
        optimiser = torch.optim.SGD([p for p in module.embedder.parameters() if p.requires_grad], lr=0.05)
        for _ in range(30):
            module.train()
            optimiser.zero_grad()
            module.training_step(batch, 0).backward()
            optimiser.step()
        module.eval()
        with torch.no_grad():
            embedded = module.embedder(clean)
            spread = float(1 - (embedded @ embedded.T)[~torch.eye(6, dtype=torch.bool)].mean())
            return module, float(consistency_loss(module.embedder(damaged), embedded)), spread

    module, pulled, spread = trained(5.0)
    _, free, free_spread = trained(0.0)
    assert pulled < 0.6 * free  # the metric loss alone lets the damaged views drift from their clean images
    assert spread > 0.8 * free_spread  # ... and the term does not get there by collapsing the clean images

    module.train()
    with_term = float(module.training_step(batch, 0))
    module.consistency_weight = 0.0
    assert float(module.training_step(batch, 0)) < with_term
    module.consistency_weight = 5.0
    with pytest.raises(RuntimeError, match="clean views"):
        module.training_step({key: value for key, value in batch.items() if key != "clean_image"}, 0)


def test_bad_consistency_settings_are_config_errors(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match=">= 0"):
        factory.consistency_weight(robust_config(tiny_folder, tmp_path, "train.consistency_weight=-1"))
    pairs = compose_config("train", ["data=pairs", "data.path=/x/pairs.csv", f"paths.output_dir={tmp_path}",
                                     "train.consistency_weight=1.0"])
    with pytest.raises(ConfigError, match="data=pairs"):
        factory.consistency_weight(pairs)
    assert factory.consistency_weight(compose_config("train", [f"paths.output_dir={tmp_path}"])) == 0.0


def test_a_run_with_the_term_trains_and_logs_it(tiny_folder, tmp_path):
    from cbir.commands.train import train

    cfg = robust_config(tiny_folder, tmp_path, "trainer.max_epochs=1", "test_after_fit=false", "logger=csv")
    train(cfg)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    values = [float(r["train/consistency_epoch"]) for r in rows if r.get("train/consistency_epoch")]
    assert values and all(0.0 < v < 2.0 for v in values)
