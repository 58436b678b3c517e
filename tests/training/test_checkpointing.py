"""Resuming training continues the same M-per-class plan: at an epoch boundary (the plan is a function of
seed and epoch) and mid-epoch (the training DataLoader's position travels in the checkpoint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import compose_config, tiny_train_overrides
from helpers.data import write_class_images

from cbir.commands.train import train
from cbir.data.catalog import ArrayRef, Catalog, Record
from cbir.data.datamodule import ResumableDataLoader
from cbir.data.datasets import RecordDataset, collate_records
from cbir.data.sampler import MPerClassBatchSampler

STEPS_PER_EPOCH = 4  # 3 training classes x 8 images, batches of 3 classes x 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_data")
    write_class_images(root, num_classes=6, per_class=8, size=24, seed=5)
    return root


def run(data: Path, out: Path, extra: list[str]) -> dict:
    """One single-process ``train.py`` run with the probe recording its batches and final weights.
    Two runs can only match weight for weight with no random augmentation and the same number of
    threads (summation order): one thread, whatever earlier tests left (the embedding map's UMAP changes
    torch's thread count), and no end-of-training pictures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose_config("train", tiny_train_overrides(data, out) + [
            "model=resnet18", "augment=none", "test_after_fit=false", "trainer.log_every_n_steps=1",
            "callbacks.embedding_map=null", "callbacks.retrieval_examples=null",
            "+callbacks.probe._target_=helpers.ddp_probe.RankProbe", f"+callbacks.probe.out={out / 'probe'}", *extra]))
    finally:
        torch.set_num_threads(threads)
    return torch.load(out / "probe" / "rank0.pt", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict:
    return run(data, tmp_path_factory.mktemp("uninterrupted"), ["trainer.max_epochs=2"])


def assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_resume_at_epoch_boundary_replays_the_same_batches(data, tmp_path, uninterrupted):
    assert len(uninterrupted["batches"]) == 2 * STEPS_PER_EPOCH
    """A run that crashes as epoch 1 begins resumes from the epoch-end checkpoint (same config, so the
    same lr schedule) and trains the uninterrupted run's epoch-1 batches to the same weights."""
    first = tmp_path / "first"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(data, first, ["trainer.max_epochs=2", "+callbacks.crash._target_=helpers.ddp_probe.CrashAt",
                          f"+callbacks.crash.step={STEPS_PER_EPOCH}"])
    resumed = run(data, tmp_path / "resumed", [f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
                                               "trainer.max_epochs=2"])
    epoch_1 = [b for b in uninterrupted["batches"] if b[0] == 1]
    assert resumed["batches"] == epoch_1  # same epoch, batch numbers and images
    assert epoch_1 != [b for b in uninterrupted["batches"] if b[0] == 0]  # the plan does change per epoch
    assert_close_states(resumed["end_state"], uninterrupted["end_state"])


@pytest.mark.slow
def test_resume_mid_epoch_skips_the_batches_already_trained(data, tmp_path, uninterrupted):
    """A crash in epoch 1 after a step checkpoint (every 5 steps: after epoch 1's first batch): the
    resumed run trains the rest of epoch 1 only, the same batches the uninterrupted run did, and ends
    with the same weights."""
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(data, crashed, ["trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=5",
                            "+callbacks.crash._target_=helpers.ddp_probe.CrashAt", "+callbacks.crash.step=7"])
    checkpoint = crashed / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 5
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_yielded": 1}]

    resumed = run(data, tmp_path / "resumed", [f"ckpt_path={checkpoint}", "trainer.max_epochs=2"])
    epoch_1 = [b for b in uninterrupted["batches"] if b[0] == 1]
    assert resumed["batches"] == epoch_1[1:]
    assert_close_states(resumed["end_state"], uninterrupted["end_state"])
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 2 * STEPS_PER_EPOCH


def test_last_checkpoint_is_the_newest_epoch_even_without_a_new_best(data, tmp_path):
    """Lightning's ModelCheckpoint(save_last=True) refreshes last.ckpt only when it also saved a best
    checkpoint; here the best checkpoint is only considered at epoch 1 of 3, and last.ckpt must still
    hold epoch 2's end, so ckpt_path=last never resumes from an older epoch."""
    run(data, tmp_path, ["trainer.max_epochs=3", "+callbacks.model_checkpoint.every_n_epochs=2"])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 3 * STEPS_PER_EPOCH)
    best = sorted((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert [p.name for p in best] == ["best-epoch001.ckpt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [  # each with its checksum
        "best-epoch001.ckpt", "best-epoch001.ckpt.sha256", "last.ckpt", "last.ckpt.sha256"]


def test_last_checkpoint_is_written_each_epoch_without_validation(data, tmp_path):
    """No validation (limit_val_batches=0): a crash as epoch 1 begins still finds epoch 0's last.ckpt."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(data, tmp_path, ["trainer.max_epochs=2", "trainer.limit_val_batches=0", "callbacks.model_checkpoint=null",
                             "+callbacks.crash._target_=helpers.ddp_probe.CrashAt", f"+callbacks.crash.step={STEPS_PER_EPOCH}"])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == STEPS_PER_EPOCH


# -- the resumable training loader on its own -----------------------------------------------------------


def tiny_loader(num_workers: int = 0) -> ResumableDataLoader:
    pixels = np.zeros((48, 8, 8, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(6), 8)
    catalog = _array_catalog(pixels, labels)
    sampler = MPerClassBatchSampler(labels, m=2, batch_size=6, seed=3)
    dataset = RecordDataset(catalog, np.arange(len(labels)), lambda image: {"image": torch.from_numpy(image)})
    return ResumableDataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_records,
                               persistent_workers=num_workers > 0)


def _array_catalog(pixels: np.ndarray, labels: np.ndarray) -> Catalog:
    records = [Record(source=ArrayRef("x", i), label=int(label), split="train") for i, label in enumerate(labels)]
    return Catalog(name="tiny", records=records, class_names=[str(c) for c in range(6)], arrays={"x": pixels})


def indices(batches) -> list[list[int]]:
    return [batch["index"].tolist() for batch in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_position_counts_batches_handed_out_and_resumes_there(num_workers):
    loader = tiny_loader(num_workers)
    loader.batch_sampler.set_epoch(2)
    iterator = iter(loader)
    full = indices(iterator)
    assert len(full) == len(loader) == loader.batch_sampler.epoch_length > 3

    interrupted = tiny_loader(num_workers)
    interrupted.batch_sampler.set_epoch(2)
    iterator = iter(interrupted)
    seen = indices([next(iterator), next(iterator), next(iterator)])
    # workers have prefetched further; the state counts what the loop received
    assert interrupted.state_dict() == {"epoch": 2, "batches_yielded": 3}

    resumed = tiny_loader(num_workers)
    resumed.load_state_dict(interrupted.state_dict())
    iterator = iter(resumed)  # Lightning creates the iterator before it sets the resumed epoch
    resumed.batch_sampler.set_epoch(2)
    rest = indices(iterator)
    assert seen + rest == full
    assert resumed.state_dict() == {"epoch": 2, "batches_yielded": len(full)}
    resumed.batch_sampler.set_epoch(3)
    assert len(indices(iter(resumed))) == len(resumed) > 3  # the next epoch starts from its beginning


def test_a_state_from_another_epoch_is_not_applied():
    loader = tiny_loader()
    loader.load_state_dict({"epoch": 1, "batches_yielded": 5})
    loader.batch_sampler.set_epoch(2)  # that epoch had finished: Lightning moved on to the next one
    assert len(indices(iter(loader))) == len(loader) > 5
