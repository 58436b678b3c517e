"""Every loss and miner in conf/ trains; proxy/classifier losses get their class count, their own
optimiser group, survive a resume and stay out of the exported model; cross-batch memory wraps a loss."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.configs import compose_config, tiny_train_overrides

from cbir.commands.train import train
from cbir.configs import config_dir
from cbir.errors import ConfigError
from cbir.models.checkpoint import load_embedder_checkpoint
from cbir.training import factory
from cbir.training.module import contiguous_label_map

CONF = config_dir()
LOSSES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
MINERS = sorted(p.stem for p in (CONF / "miner").glob("*.yaml"))
PROXY_LOSSES = ["arcface", "cosface", "normalized_softmax", "proxy_anchor"]  # one weight per class
PAIR_LOSSES = [loss for loss in LOSSES if loss not in PROXY_LOSSES]  # compare embeddings within a batch


def test_loss_lists_match_conf():
    assert set(PROXY_LOSSES) <= set(LOSSES) and len(LOSSES) >= 10
    for loss in PROXY_LOSSES:
        assert "num_classes: ???" in (CONF / "loss" / f"{loss}.yaml").read_text()


def _overrides(folder: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_overrides(folder, out) + ["model=resnet18", "trainer=debug", *extra]


def _miner_choice(loss: str) -> str:
    """The miner a loss selects in its defaults list."""
    text = (CONF / "loss" / f"{loss}.yaml").read_text()
    return text.split("/miner@_global_.miner:")[1].split()[0]


# fast_dev_run of train.py: each loss with its own miner and with none, each miner with triplet
FAST_DEV_RUNS = sorted({(loss, _miner_choice(loss)) for loss in LOSSES} | {(loss, "none") for loss in LOSSES}
                       | {("triplet", miner) for miner in MINERS})


@pytest.mark.parametrize("loss,miner", FAST_DEV_RUNS, ids=[f"{l}+{m}" for l, m in FAST_DEV_RUNS])
def test_fast_dev_run_loss_miner(loss, miner, tiny_folder, tmp_path):
    """python train.py loss=<loss> miner=<miner>"""
    train(compose_config("train", _overrides(tiny_folder, tmp_path, f"loss={loss}", f"miner={miner}")))
    assert (tmp_path / "config.yaml").is_file()


@pytest.fixture(scope="module")
def embedder():
    from cbir.models.embedder import build_embedder

    return build_embedder("resnet18", pretrained="none", image_size=32)


@pytest.fixture(scope="module")
def batch(tiny_folder, tmp_path_factory, embedder):
    cfg = compose_config("train", _overrides(tiny_folder, tmp_path_factory.mktemp("batch")))
    catalog = factory.build_catalog(cfg.data)
    return next(iter(factory.build_datamodule(cfg, catalog, embedder).train_dataloader()))


# every pair/triplet loss with every miner: one real training step (forward, mine, loss, backward)
CROSS = [(loss, miner) for loss in PAIR_LOSSES for miner in MINERS] + [(loss, "none") for loss in PROXY_LOSSES]


@pytest.mark.parametrize("loss,miner", CROSS, ids=[f"{l}+{m}" for l, m in CROSS])
def test_every_loss_miner_pair_takes_a_training_step(loss, miner, tiny_folder, tmp_path, embedder, batch):
    cfg = compose_config("train", _overrides(tiny_folder, tmp_path, f"loss={loss}", f"miner={miner}"))
    module = factory.build_module(cfg, embedder)
    assert (module.miner is None) == (miner == "none")
    embedder.zero_grad()
    value = module.training_step(batch, 0)
    assert torch.isfinite(value)
    value.backward()
    grads = [p.grad for p in embedder.head.parameters() if p.grad is not None]
    assert grads, f"{loss}+{miner}: no gradient reached the head"


@pytest.mark.parametrize("loss", ["triplet", "contrastive", "multi_similarity", "circle", "supcon", "ntxent"])
def test_cross_batch_memory_wraps_loss_and_miner(loss, tiny_folder, tmp_path, embedder, batch):
    from pytorch_metric_learning.losses import CrossBatchMemory

    cfg = compose_config("train", _overrides(tiny_folder, tmp_path, f"loss={loss}", "loss.xbm=true",
                                             "loss.xbm_memory_size=64"))
    module = factory.build_module(cfg, embedder)
    assert isinstance(module.loss_fn, CrossBatchMemory) and module.miner is None  # the miner moved inside
    assert module.loss_fn.memory_size == 64 and module.loss_fn.embedding_size == embedder.embedding_dim
    assert (module.loss_fn.miner is None) == (_miner_choice(loss) == "none")
    for step in range(2):
        assert torch.isfinite(module.training_step(batch, step))
    assert module.loss_fn.queue_idx == 2 * len(batch["label"])  # both batches are in the memory


def test_cross_batch_memory_queue_position_travels_in_checkpoints(tiny_folder, tmp_path, embedder, batch):
    """The memory rows are buffers; the write position and the wrapped-round flag must come back too,
    or a resumed run ignores the restored rows until the queue wraps again."""
    cfg = compose_config("train", _overrides(tiny_folder, tmp_path, "loss=triplet", "loss.xbm=true",
                                             "loss.xbm_memory_size=64"))
    module = factory.build_module(cfg, embedder)
    steps = 64 // len(batch["label"]) + 1  # wraps round once
    for step in range(steps):
        module.training_step(batch, step)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)

    restored = factory.build_module(cfg, copy.deepcopy(embedder))
    restored.load_state_dict(checkpoint["state_dict"])
    restored.on_load_checkpoint(checkpoint)
    assert restored.loss_fn.has_been_filled and module.loss_fn.has_been_filled
    assert restored.loss_fn.queue_idx == module.loss_fn.queue_idx == (steps * len(batch["label"])) % 64
    assert torch.equal(restored.loss_fn.embedding_memory, module.loss_fn.embedding_memory)


def test_fast_dev_run_with_cross_batch_memory(tiny_folder, tmp_path):
    train(compose_config("train", _overrides(tiny_folder, tmp_path, "loss=multi_similarity", "loss.xbm=true")))
    assert (tmp_path / "config.yaml").is_file()


def test_cross_batch_memory_refuses_proxy_losses(tiny_folder, tmp_path, embedder):
    cfg = compose_config("train", _overrides(tiny_folder, tmp_path, "loss=proxy_anchor", "loss.xbm=true"))
    with pytest.raises(ConfigError, match="loss.xbm=true.*ProxyAnchorLoss"):
        factory.build_module(cfg, embedder)


@pytest.mark.parametrize("loss", PROXY_LOSSES)
def test_proxy_losses_get_classes_dim_and_their_own_lr(loss, tiny_folder, tmp_path):
    cfg = compose_config("train", _overrides(tiny_folder, tmp_path, f"loss={loss}", "head.dim=24"))
    embedder = factory.build_embedder_from_config(cfg)
    catalog = factory.build_catalog(cfg.data)
    module = factory.build_module(cfg, embedder, catalog)
    weights = next(module.loss_fn.parameters())
    assert sorted(weights.shape) == sorted((3, 24))  # 3 training classes of 6 (zero-shot split), 24-d
    optimizer = module.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["loss"]["params"] == [weights]
    assert groups["loss"]["lr"] == pytest.approx(100 * groups["embedder"]["lr"])

    cfg = compose_config("train", _overrides(tiny_folder, tmp_path, f"loss={loss}", "optimizer.loss_lr=0.5"))
    optimizer = factory.build_module(cfg, embedder, catalog).configure_optimizers()["optimizer"]
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5)


def test_pair_losses_keep_a_single_group(tiny_folder, tmp_path, embedder):
    module = factory.build_module(compose_config("train", _overrides(tiny_folder, tmp_path)), embedder)
    assert [g["name"] for g in module.configure_optimizers()["optimizer"].param_groups] == ["embedder"]


def test_contiguous_label_map():
    table = contiguous_label_map([5, 1, 2, 1])
    assert table.tolist() == [-1, 0, 1, -1, -1, 2]
    assert contiguous_label_map(None) is None


def test_labels_with_gaps_are_remapped_for_proxy_losses(tiny_folder, tmp_path, embedder, batch):
    """Hold out classes 0, 3, 4: the training ids 1, 2, 5 become proxies 0, 1, 2."""
    held_out = tmp_path / "test_classes.txt"
    held_out.write_text("class_00\nclass_03\nclass_04\n")
    cfg = compose_config("train", _overrides(tiny_folder, tmp_path, "loss=proxy_anchor",
                                             f"data.test_classes_file={held_out}"))
    module = factory.build_module(cfg, embedder)
    assert module.loss_fn.num_classes == 3
    labels = torch.tensor([1, 2, 5, 5])
    assert module.training_labels(labels).tolist() == [0, 1, 2, 2]
    with pytest.raises(RuntimeError, match=r"labels \[3\] outside the training classes"):
        module.training_labels(torch.tensor([1, 3]))
    train(cfg)  # the whole loop on the gapped ids (ProxyAnchor one-hot encodes labels < num_classes)


class _RecordProxiesAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.proxies = pl_module.loss_fn.proxies.detach().clone()
        self.loss_lr = trainer.optimizers[0].param_groups[1]["lr"]


def test_proxies_are_checkpointed_restored_and_not_exported(tiny_folder, tmp_path):
    run = tmp_path / "run"
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.fast_dev_run=false",
             "test_after_fit=false", "scheduler=none"]
    train(compose_config("train", _overrides(tiny_folder, run, "loss=proxy_anchor", *short)))
    ckpt_path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    saved = checkpoint["state_dict"]["loss_fn.proxies"]
    assert len(checkpoint["optimizer_states"][0]["param_groups"]) == 2

    # resume: a freshly built module (new random proxies) continues from the saved ones
    cfg = compose_config("train", _overrides(tiny_folder, tmp_path / "resumed", "loss=proxy_anchor", *short,
                                             "trainer.max_epochs=2", "callbacks=none"))
    embedder = factory.build_embedder_from_config(cfg)
    catalog = factory.build_catalog(cfg.data)
    module = factory.build_module(cfg, embedder, catalog)
    assert not torch.allclose(module.loss_fn.proxies, saved)
    recorder = _RecordProxiesAtStart()
    trainer = factory.build_trainer(cfg, callbacks=[recorder])
    trainer.fit(module, datamodule=factory.build_datamodule(cfg, catalog, embedder), ckpt_path=str(ckpt_path))
    assert torch.equal(recorder.proxies, saved)
    assert recorder.loss_lr == pytest.approx(100 * cfg.optimizer.lr)

    exported = load_embedder_checkpoint(ckpt_path)
    assert not any("prox" in key or key.startswith("loss") for key in exported.state_dict())
    embedder_weights = {k[len("embedder."):]: v for k, v in checkpoint["state_dict"].items()
                        if k.startswith("embedder.")}
    assert set(exported.state_dict()) == set(embedder_weights)


class _SnapshotBackbone(pl.Callback):
    """The backbone's weights and BatchNorm statistics at the start and after each training epoch."""

    def __init__(self):
        self.snapshots = []

    def _take(self, pl_module):
        return {k: v.detach().clone() for k, v in pl_module.embedder.backbone.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        self.snapshots.append(self._take(pl_module))
        self.head = {k: v.detach().clone() for k, v in pl_module.embedder.head.state_dict().items()}

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshots.append(self._take(pl_module))
        if trainer.current_epoch == 0:
            self.head_changed = any(not torch.equal(v, pl_module.embedder.head.state_dict()[k])
                                    for k, v in self.head.items())


def _changed(before: dict, after: dict, keys=None) -> list[str]:
    return [k for k in (before if keys is None else keys) if not torch.equal(before[k], after[k])]


@pytest.mark.slow
@pytest.mark.parametrize("freeze_stages", [0, 1])
def test_warmup_freezes_backbone_then_unfreezes(freeze_stages, tiny_folder, tmp_path):
    """train.warmup_epochs=1: epoch 0 trains only the head (and proxies), epoch 1 the backbone too,
    except the stages model.freeze_stages keeps frozen."""
    cfg = compose_config("train", _overrides(
        tiny_folder, tmp_path, "loss=proxy_anchor", "train.warmup_epochs=1", f"model.freeze_stages={freeze_stages}",
        "trainer.fast_dev_run=false", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "callbacks=none", "scheduler=none"))
    embedder = factory.build_embedder_from_config(cfg)
    catalog = factory.build_catalog(cfg.data)
    module = factory.build_module(cfg, embedder, catalog)
    snapshot = _SnapshotBackbone()
    trainer = factory.build_trainer(cfg, callbacks=[snapshot])
    trainer.fit(module, datamodule=factory.build_datamodule(cfg, catalog, embedder))
    start, after_warmup, after_second = snapshot.snapshots
    assert snapshot.head_changed, "the head must learn during the warm-up"
    assert _changed(start, after_warmup) == [], "the backbone (weights and BN statistics) moved during warm-up"
    changed = _changed(after_warmup, after_second)
    assert any(k.endswith("weight") for k in changed), "the backbone did not learn after the warm-up"
    backbone = embedder.backbone
    frozen_keys = [f"body.{name}.{k}" for name, stage in backbone.module_stage.items()
                   if stage in backbone.frozen_stages
                   for k in backbone.body.get_submodule(name).state_dict(keep_vars=False) if "." not in k]
    assert bool(frozen_keys) == (freeze_stages > 0)
    assert _changed(start, after_second, frozen_keys) == [], "model.freeze_stages was not respected"
    assert all(p.requires_grad for p in embedder.backbone.stage_parameters()[list(backbone.channels)[-1]])


def test_no_warmup_no_callback(tiny_folder, tmp_path, embedder):
    module = factory.build_module(compose_config("train", _overrides(tiny_folder, tmp_path)), embedder)
    assert module.configure_callbacks() == []
