"""Siamese pair mode (data=pairs): the CSV reader and its errors, pair batches, verification metrics,
and training on explicit pairs end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.configs import compose_config, tiny_train_overrides
from helpers.data import write_class_images
from helpers.pairs import write_pair_csv

from cbir.commands.train import train
from cbir.data.datamodule import LoaderOptions, PairDataModule
from cbir.data.readers.pairs import read_pairs
from cbir.errors import BadImageError, ConfigError, DataError
from cbir.training import factory
from cbir.training.module import PairModule, pair_indices, pair_verification_metrics


@pytest.fixture(scope="module")
def pair_csv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    write_class_images(root / "images", num_classes=6, per_class=4, size=24)
    return write_pair_csv(root / "images", root / "pairs.csv")


def _overrides(pair_csv: Path, out: Path, *extra: str) -> list[str]:
    common = [o for o in tiny_train_overrides(pair_csv.parent, out) if not o.startswith("data")]
    return common + ["data=pairs", f"data.path={pair_csv}", "data.image_size=32", "data.batch_size=8",
                     "data.eval_batch_size=32", "data.num_workers=0", "model=resnet18", "loss=contrastive", *extra]


def test_read_pairs_holds_out_a_fraction(pair_csv):
    catalog = read_pairs(pair_csv, held_out_fraction=0.25)
    assert len(catalog.pairs) == 72  # 36 same-class pairs (6 classes x C(4, 2)) + 36 different
    splits = [p.split for p in catalog.pairs]
    assert splits.count("val") == 18 and splits.count("train") == 54
    assert all(Path(p.path_a).is_file() and Path(p.path_b).is_file() for p in catalog.pairs)
    assert sum(p.same for p in catalog.pairs) == 36
    assert "train: " in catalog.summary() and "val: " in catalog.summary()


def test_read_pairs_with_split_column(pair_csv, tmp_path):
    csv_path = write_pair_csv(pair_csv.parent / "images", pair_csv.parent / "split_pairs.csv", split=True)
    catalog = read_pairs(csv_path)
    assert {p.split for p in catalog.pairs} == {"train", "test"}
    assert len(catalog.select(None, exclude="train")) == len(catalog.select("test"))
    with pytest.raises(DataError, match="no pairs in split 'val'.*splits: test, train"):
        catalog.select("val")


@pytest.mark.parametrize("row,message", [
    ("images/class_00/img_0.png,images/class_00/img_1.png", r"line 3 has 2 columns; expected path_a,path_b,same"),
    ("images/class_00/img_0.png,images/class_00/nope.png,1", r"line 3: image .*nope.png does not exist"),
    ("images/class_00/img_0.png,images/class_00/img_1.png,yes", r"line 3: same must be 0 or 1, got 'yes'"),
])
def test_bad_pair_csv_names_the_line(row, message, pair_csv):
    bad = pair_csv.parent / "bad.csv"
    bad.write_text("path_a,path_b,same\nimages/class_00/img_0.png,images/class_00/img_2.png,1\n" + row + "\n")
    with pytest.raises(DataError, match=message):
        read_pairs(bad)


def test_missing_pair_csv(tmp_path):
    with pytest.raises(DataError, match="pair CSV .*missing.csv does not exist"):
        read_pairs(tmp_path / "missing.csv")


def test_undecodable_image_names_it(pair_csv, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(f"{pair_csv.parent / 'images/class_00/img_0.png'},{broken},0\n"
                        f"{pair_csv.parent / 'images/class_00/img_1.png'},{broken},0\n")
    catalog = read_pairs(csv_path, held_out_fraction=0.5)
    inputs = SimpleNamespace(input_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    module = PairDataModule(catalog, inputs, LoaderOptions(batch_size=2, num_workers=0))
    with pytest.raises(BadImageError, match="broken.png"):
        next(iter(module.train_dataloader()))


def test_pair_indices_and_metrics():
    a1, p, a2, n = pair_indices(torch.tensor([1, 0, 1, 0]))
    assert (a1.tolist(), p.tolist(), a2.tolist(), n.tolist()) == ([0, 2], [4, 6], [1, 3], [5, 7])
    metrics = pair_verification_metrics(torch.tensor([0.9, 0.2, 0.1, 0.3]), torch.tensor([1, 1, 0, 0]))
    assert metrics["pair_roc_auc"] == pytest.approx(0.75)
    assert metrics["pair_accuracy"] == pytest.approx(0.75) and metrics["pair_threshold"] == pytest.approx(0.9)
    perfect = pair_verification_metrics(torch.tensor([0.9, 0.8, 0.1, 0.3]), torch.tensor([1, 1, 0, 0]))
    assert perfect["pair_accuracy"] == 1.0 and 0.3 < perfect["pair_threshold"] <= 0.8 + 1e-6


def test_pair_batches_and_module(pair_csv, tmp_path):
    cfg = compose_config("train", _overrides(pair_csv, tmp_path))
    embedder = factory.build_embedder_from_config(cfg)
    catalog = factory.build_catalog(cfg.data)
    datamodule = factory.build_datamodule(cfg, catalog, embedder)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image_a"].shape == batch["image_b"].shape == (8, 3, 32, 32)
    module = factory.build_module(cfg, embedder)
    assert isinstance(module, PairModule) and module.miner is None  # contrastive's pair miner is not used
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("loss", ["triplet", "proxy_anchor", "supcon"])
def test_pair_mode_refuses_losses_that_cannot_use_pairs(loss, pair_csv, tmp_path):
    cfg = compose_config("train", _overrides(pair_csv, tmp_path, f"loss={loss}"))
    with pytest.raises(ConfigError, match="data=pairs trains on explicit pairs"):
        factory.build_module(cfg, factory.build_embedder_from_config(cfg))


def test_pair_mode_refuses_cross_batch_memory(pair_csv, tmp_path):
    cfg = compose_config("train", _overrides(pair_csv, tmp_path, "loss.xbm=true"))
    with pytest.raises(ConfigError, match="ContrastiveLoss with loss.xbm=true"):
        factory.build_module(cfg, factory.build_embedder_from_config(cfg))


def test_fast_dev_run_pairs(pair_csv, tmp_path):
    """python train.py data=pairs data.path=pairs.csv loss=contrastive"""
    train(compose_config("train", _overrides(pair_csv, tmp_path, "trainer=debug")))
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.slow
def test_pair_mode_learns_and_checkpoints_by_pair_auc(pair_csv, tmp_path):
    """A few epochs on the easy colour fixture: the training loss falls, held-out pair accuracy is
    well above chance, and the best checkpoint is chosen by val/pair_roc_auc."""
    cfg = compose_config("train", _overrides(pair_csv, tmp_path, "trainer.max_epochs=4", "logger=csv",
                                             "trainer.log_every_n_steps=1", "optimizer.lr=1e-3", "augment=none"))
    assert cfg.callbacks.model_checkpoint.monitor == "val/pair_roc_auc"
    best = train(cfg)
    assert best is not None and 0.0 <= best <= 1.0
    assert any(p.name.startswith("best-epoch") for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    rows = [line.split(",") for line in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    column = header.index("train/loss_epoch")
    epoch_losses = [float(r[column]) for r in rows if r[column]]
    assert len(epoch_losses) == 4 and epoch_losses[-1] < epoch_losses[0]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    trained = next(v for k, v in results.items() if k.startswith("trained"))
    assert trained["pair_accuracy"] > 0.75 and trained["num_pairs"] == 14  # 20% of 72 pairs held out
