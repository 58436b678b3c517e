"""M-per-class batch sampler: batch composition, epoch coverage, determinism, DDP disjointness."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cbir.data.sampler import MPerClassBatchSampler
from cbir.errors import ConfigError, DataError


def uneven_labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, size=25)  # includes classes smaller than m
    return rng.permutation(np.repeat(np.arange(25), sizes))


@pytest.mark.parametrize("m,batch_size", [(4, 32), (2, 16), (8, 64)])
def test_every_batch_has_m_images_of_each_of_its_classes(m, batch_size):
    labels = uneven_labels()
    sampler = MPerClassBatchSampler(labels, m=m, batch_size=batch_size, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == batch_size
        counts = Counter(labels[batch].tolist())
        assert len(counts) == batch_size // m
        assert set(counts.values()) == {m}


def test_epoch_covers_the_data_set():
    labels = np.repeat(np.arange(40), 12)  # sizes divisible by m: nothing may be left out
    sampler = MPerClassBatchSampler(labels, m=4, batch_size=32, seed=3)
    seen = [i for batch in sampler for i in batch]
    assert sorted(seen) == list(range(len(labels)))  # every image exactly once
    stats = sampler.last_plan_stats
    assert stats.images_visited == stats.images_total == len(labels)
    assert stats.leftover_images == 0 and stats.repeated_slots == 0


def test_uneven_classes_are_covered_except_a_reported_leftover():
    labels = uneven_labels(4)
    sampler = MPerClassBatchSampler(labels, m=4, batch_size=32, seed=0)
    seen = {i for batch in sampler for i in batch}
    stats = sampler.last_plan_stats
    assert len(seen) == stats.images_visited
    assert stats.images_visited + stats.leftover_images == len(labels)
    assert stats.leftover_images < 0.1 * len(labels)
    assert stats.repeated_slots > 0  # classes of size 1..3 were topped up with repeats


def test_deterministic_per_seed_and_epoch():
    labels = uneven_labels()
    a = MPerClassBatchSampler(labels, m=4, batch_size=32, seed=7)
    b = MPerClassBatchSampler(labels, m=4, batch_size=32, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)  # a new epoch reshuffles
    b.set_epoch(1)
    assert list(a) == list(b)
    c = MPerClassBatchSampler(labels, m=4, batch_size=32, seed=8)
    assert list(c) != list(MPerClassBatchSampler(labels, m=4, batch_size=32, seed=7))


def test_ranks_get_disjoint_batches_of_equal_count():
    labels = np.repeat(np.arange(30), 10)
    ranks = [MPerClassBatchSampler(labels, m=2, batch_size=20, seed=5, num_replicas=3, rank=r) for r in range(3)]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
    flat = [tuple(b) for batches in per_rank for b in batches]
    assert len(flat) == len(set(flat))
    indices = [i for batches in per_rank for b in batches for i in b]
    assert len(indices) == len(set(indices))  # no image on two ranks in the same epoch
    single = MPerClassBatchSampler(labels, m=2, batch_size=20, seed=5)
    assert len(single) >= 3 * len(ranks[0])


def test_bad_arguments():
    labels = np.repeat(np.arange(3), 5)
    with pytest.raises(ConfigError, match="multiple"):
        MPerClassBatchSampler(labels, m=3, batch_size=10)
    with pytest.raises(DataError, match="only 3"):
        MPerClassBatchSampler(labels, m=2, batch_size=16)


def test_lightning_advances_the_epoch():
    """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``; a batch sampler that it
    cannot reach would replay the same batches every epoch."""
    import torch
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader, TensorDataset

    labels = np.repeat(np.arange(8), 4)
    sampler = MPerClassBatchSampler(labels, m=2, batch_size=8, seed=0)
    loader = DataLoader(TensorDataset(torch.arange(len(labels))), batch_sampler=sampler)
    first = [b[0].tolist() for b in loader]
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3
    assert [b[0].tolist() for b in loader] != first


def test_resume_at_starts_one_iteration_part_way_through_the_epoch():
    labels = np.repeat(np.arange(12), 6)
    for replicas in (1, 2):
        sampler = MPerClassBatchSampler(labels, m=2, batch_size=6, seed=4, num_replicas=replicas, rank=replicas - 1)
        sampler.set_epoch(3)
        whole = list(sampler)
        sampler.resume_at(2)
        assert list(sampler) == whole[2:]  # this rank's batches after the first two of the same plan
        assert len(sampler) == len(whole)  # the epoch's length is unchanged: the skipped batches count as done
        assert list(sampler) == whole  # only the next iteration is shortened
    with pytest.raises(ValueError):
        sampler.resume_at(-1)


def test_every_epoch_has_the_same_number_of_batches():
    """The greedy fill ends a batch sooner or later from epoch to epoch; the sampler pads or cuts to epoch 0's
    length, so ``len()`` (read once by Lightning) stays true and every epoch reaches its validation."""
    labels = uneven_labels(2)
    sampler = MPerClassBatchSampler(labels, m=4, batch_size=32, seed=0)
    raw_lengths, padded, dropped = set(), 0, 0
    for epoch in range(30):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == sampler.epoch_length
        for batch in batches:
            counts = Counter(labels[batch].tolist())
            assert len(batch) == 32 and len(counts) == 8 and set(counts.values()) == {4}
        stats = sampler.last_plan_stats
        assert stats.images_visited + stats.leftover_images == len(labels)
        raw_lengths.add(len(sampler._greedy_plan(epoch)[3]))
        padded += stats.padded_batches
        dropped += stats.dropped_batches
    assert len(raw_lengths) > 1 and padded > 0  # the uncorrected length did vary; padding happened


def test_lightning_validates_every_epoch():
    """The symptom the fixed length cures: with a batch count that changed between epochs, Lightning skipped
    validation (and best-checkpointing) of every epoch shorter than the first."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    labels = uneven_labels(2)
    sampler = MPerClassBatchSampler(labels, m=4, batch_size=32, seed=0)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.validated_epochs: list[int] = []

        def training_step(self, batch, _):
            return self.layer(batch[0].float()[:, None]).mean()

        def validation_step(self, batch, _):
            if not self.validated_epochs or self.validated_epochs[-1] != self.current_epoch:
                self.validated_epochs.append(self.current_epoch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = TensorDataset(torch.arange(len(labels)))
    model = Tiny()
    trainer = pl.Trainer(max_epochs=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(model, DataLoader(data, batch_sampler=sampler), DataLoader(data, batch_size=64))
    assert model.validated_epochs == list(range(12))
