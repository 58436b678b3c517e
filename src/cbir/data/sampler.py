"""M-per-class batch sampling with true epoch semantics.

Metric-learning losses need several images of each class in a batch. Common samplers (e.g.
pytorch-metric-learning's ``MPerClassSampler``) draw classes with replacement, so an "epoch" neither
visits every image nor has a fixed length, and under DDP every rank draws its own independent stream.

:class:`MPerClassBatchSampler` instead plans each epoch up front, from ``(seed, epoch)`` alone:

1. each class's images are shuffled and cut into groups of ``m``; a class whose size is not a multiple
   of ``m`` tops up its last group with random repeats of its own images (so classes with fewer than
   ``m`` images are repeated — with augmentation they are still different views);
2. batches are filled with ``batch_size / m`` groups of *distinct* classes, drawing classes with
   probability proportional to their remaining groups, so large classes are spread over the epoch and
   the leftover at the end (groups that cannot form a batch of distinct classes) is as small as possible;
3. under DDP every rank computes the same plan and takes every ``world_size``-th batch, so ranks get
   disjoint batches and the same number of steps.

Because the plan is a function of ``(seed, epoch)``, resuming at an epoch boundary replays the same
batches as an uninterrupted run; :meth:`MPerClassBatchSampler.resume_at` starts the next iteration part-way
through an epoch (:class:`cbir.data.datamodule.ResumableDataLoader` calls it from a mid-epoch checkpoint).

Every image is visited once per epoch, except the few in the leftover groups, which are reported in
``last_plan_stats``.

Every epoch has the same number of batches (epoch 0's): the greedy fill of step 2 can end one batch sooner or
later from one epoch to the next, and Lightning decides "end of epoch, validate now" by counting batches against
the length it read once — an epoch one batch short was silently never validated (nor checkpointed as best), the
last epoch included. A short epoch is padded with a batch made of its leftover groups and random groups of other
classes; a long one drops its last batch (its images count as leftover); both are reported in the stats.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

from cbir.errors import ConfigError, DataError
from cbir.ranks import distributed_rank, distributed_world_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlanStats:
    """What one epoch's plan covers."""

    num_batches: int
    images_visited: int  # distinct images in the epoch's batches (all ranks)
    images_total: int
    repeated_slots: int  # batch slots filled by repeats in classes smaller than a multiple of m
    leftover_images: int  # images whose groups could not join a batch of distinct classes
    padded_batches: int = 0  # batches added to reach the fixed epoch length (leftover groups + random images)
    dropped_batches: int = 0  # batches cut to keep the fixed epoch length


class MPerClassBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices: ``batch_size // m`` classes, ``m`` images each."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        m: int,
        batch_size: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        labels = np.asarray(labels)
        if m < 1 or batch_size < 1 or batch_size % m:
            raise ConfigError(f"sampler: batch_size ({batch_size}) must be a positive multiple of m ({m})")
        classes, inverse = np.unique(labels, return_inverse=True)
        self.classes_per_batch = batch_size // m
        if len(classes) < self.classes_per_batch:
            raise DataError(
                f"sampler: a batch of {batch_size} with m={m} needs {self.classes_per_batch} classes, "
                f"but the training set has only {len(classes)}; lower data.batch_size or raise data.m_per_class"
            )
        self.m = m
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._num_replicas = num_replicas
        self._rank = rank
        self._indices_by_class = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        small = sum(len(ix) < m for ix in self._indices_by_class)
        if small:
            log.warning("sampler: %d of %d classes have fewer than m=%d images; their images are repeated",
                        small, len(classes), m)
        self._plan_cache: tuple[int, list[list[int]], EpochPlanStats] | None = None
        self._epoch_length: int | None = None
        self._resume_batch = 0

    # -- distributed context -------------------------------------------------------------------------
    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return distributed_world_size()

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return distributed_rank()

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (by Lightning through :attr:`sampler`, or by hand in plain loops)."""
        self.epoch = int(epoch)

    @property
    def sampler(self) -> MPerClassBatchSampler:
        """Lightning/Fabric set the epoch via ``dataloader.batch_sampler.sampler.set_epoch(epoch)`` (the
        shape of torch's ``BatchSampler``); without this every epoch would repeat epoch 0's batches."""
        return self

    # -- plan -----------------------------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> tuple[list[list[int]], EpochPlanStats]:
        """All batches of ``epoch`` (every rank's), and what they cover. Deterministic in (seed, epoch)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1], self._plan_cache[2]
        rng, groups, remaining, batches, repeated = self._greedy_plan(epoch)
        if epoch == 0 and self._epoch_length is None:
            self._epoch_length = len(batches)  # what epoch_length would compute again
        target = self.epoch_length
        padded = 0
        while len(batches) < target:
            batches.append(self._padding_batch(groups, remaining, rng))
            padded += 1
        dropped = max(0, len(batches) - target)
        del batches[target:]
        if padded or dropped:
            log.info("sampler: epoch %d's plan %s %d batch(es) to keep %d batches an epoch", epoch,
                     "padded with" if padded else "dropped", padded or dropped, target)
        visited = {i for b in batches for i in b}
        total = sum(len(ix) for ix in self._indices_by_class)
        stats = EpochPlanStats(
            num_batches=len(batches),
            images_visited=len(visited),
            images_total=total,
            repeated_slots=repeated,
            leftover_images=total - len(visited),
            padded_batches=padded,
            dropped_batches=dropped,
        )
        self._plan_cache = (epoch, batches, stats)
        return batches, stats

    @property
    def epoch_length(self) -> int:
        """Batches in every epoch (all ranks together): what epoch 0's greedy fill gives."""
        if self._epoch_length is None:
            self._epoch_length = len(self._greedy_plan(0)[3])
        return self._epoch_length

    def _greedy_plan(self, epoch: int) -> tuple[np.random.Generator, list[list[np.ndarray]], np.ndarray,
                                                list[list[int]], int]:
        """Steps 1-2 of the module docstring: groups of m, then batches of distinct classes until fewer than
        ``classes_per_batch`` classes have groups left. Its length varies by a batch or so between epochs."""
        rng = np.random.default_rng([self.seed, epoch])
        groups: list[list[np.ndarray]] = []
        repeated = 0
        for indices in self._indices_by_class:
            shuffled = rng.permutation(indices)
            shortfall = (-len(shuffled)) % self.m
            if shortfall:
                shuffled = np.concatenate([shuffled, rng.choice(indices, size=shortfall, replace=True)])
                repeated += shortfall
            groups.append(list(shuffled.reshape(-1, self.m)))
        remaining = np.array([len(g) for g in groups], dtype=np.float64)

        batches: list[list[int]] = []
        while np.count_nonzero(remaining) >= self.classes_per_batch:
            chosen = rng.choice(len(groups), size=self.classes_per_batch, replace=False,
                                p=remaining / remaining.sum())
            batch = np.concatenate([groups[c].pop() for c in chosen])
            remaining[chosen] -= 1
            batches.append(batch.tolist())
        return rng, groups, remaining, batches, repeated

    def _padding_batch(self, groups: list[list[np.ndarray]], remaining: np.ndarray,
                       rng: np.random.Generator) -> list[int]:
        """One more batch of distinct classes: the leftover groups first (images this epoch has not visited
        yet), then ``m`` random images of randomly chosen other classes."""
        leftover_classes = np.flatnonzero(remaining)[: self.classes_per_batch]
        parts = [groups[c].pop() for c in leftover_classes]
        remaining[leftover_classes] -= 1
        others = np.setdiff1d(np.arange(len(groups)), leftover_classes)
        for c in rng.choice(others, size=self.classes_per_batch - len(parts), replace=False):
            indices = self._indices_by_class[c]
            parts.append(rng.choice(indices, size=self.m, replace=len(indices) < self.m))
        return np.concatenate(parts).tolist()

    @property
    def last_plan_stats(self) -> EpochPlanStats:
        return self.plan()[1]

    def _rank_batches(self) -> list[list[int]]:
        batches, _ = self.plan()
        replicas = self.num_replicas
        per_rank = len(batches) // replicas
        if per_rank == 0:
            raise DataError(f"sampler: the epoch has {len(batches)} batches, fewer than {replicas} ranks")
        return batches[self.rank : per_rank * replicas : replicas]

    def resume_at(self, batch: int) -> None:
        """Start the next iteration at this rank's ``batch``-th batch of the current epoch (the ones
        before it were trained on before an interruption); later iterations start at 0 again.
        ``len()`` stays the whole epoch's, as Lightning counts the skipped batches as done."""
        if batch < 0:
            raise ValueError(f"sampler: cannot resume at batch {batch}")
        self._resume_batch = int(batch)

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_batch = self._resume_batch, 0
        yield from self._rank_batches()[start:]

    def __len__(self) -> int:
        return len(self.plan()[0]) // self.num_replicas

