"""LightningDataModules: M-per-class training batches and query/gallery evaluation sets
(:class:`RetrievalDataModule`), or shuffled image pairs (:class:`PairDataModule`), on one base that holds
what both share (transforms, batch sizes, workers, the image cache policy)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from cbir.data.catalog import Catalog
from cbir.data.datasets import (
    EvalSpec,
    PairDataset,
    RecordDataset,
    check_bad_image_policy,
    collate_records,
    fill_cache,
    report_catalog_issues,
)
from cbir.data.readers.pairs import PairCatalog
from cbir.data.sampler import MPerClassBatchSampler
from cbir.data.transforms import CleanAndAugmented, eval_transform, seed_transform_in_worker, train_transform
from cbir.errors import ConfigError
from cbir.ranks import distributed_world_size

log = logging.getLogger(__name__)

AUTO_CACHE_MAX_IMAGES = 50_000  # data.cache_images=auto decodes file-backed datasets up to this size


@dataclass(frozen=True)
class LoaderOptions:
    """How a data config's images are batched and read (``data.*`` keys of the same names)."""

    batch_size: int = 64
    eval_batch_size: int | None = None  # default: 2 x batch_size
    num_workers: int | None = None  # default: min(4, CPU cores)
    train_split: str = "train"
    on_bad_image: str = "fail"  # fail: stop at the first unreadable image, naming it; skip: report and go on
    cache_images: bool | str = "auto"  # decode once into memory (auto: file-backed sets up to 50k images)
    cache_max_mb: float = 2048.0
    seed: int | None = None  # the augmentations' random state (albumentations ignores the global seed)
    val_subset: int | float | None = None  # validation on a fixed random subset: a count, or a fraction (0, 1)
    test_subset: int | float | None = None  # the same for the test set

    def __post_init__(self) -> None:
        check_bad_image_policy(self.on_bad_image)

    @property
    def workers(self) -> int:
        return min(4, os.cpu_count() or 1) if self.num_workers is None else int(self.num_workers)


class ImageDataModule(pl.LightningDataModule):
    """What every data module shares: the model's input preprocessing (``inputs``: anything with
    ``input_size``, ``mean`` and ``std``, such as the Embedder), the training augmentation, and the
    loader options."""

    def __init__(self, catalog, inputs, options: LoaderOptions = LoaderOptions(), augment: Sequence = ()) -> None:
        super().__init__()
        self.catalog = catalog
        self.options = options
        size, mean, std = int(inputs.input_size), tuple(inputs.mean), tuple(inputs.std)
        self.train_tf = train_transform(augment, size, mean, std, seed=options.seed)
        self.eval_tf = eval_transform(size, mean, std)
        self.batch_size = options.batch_size
        self.eval_batch_size = options.eval_batch_size or options.batch_size * 2
        self.num_workers = options.workers

    def _loader_kwargs(self, collate_fn: Callable | None = None) -> dict:
        return {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available(),
                "persistent_workers": self.num_workers > 0,
                **({"collate_fn": collate_fn} if collate_fn is not None else {})}


class RetrievalDataModule(ImageDataModule):
    """Training batches from the M-per-class sampler; validation/test sets per :class:`EvalSpec`.
    ``clean_views``: training items also carry each image's crop without the photometric augmentations
    (``clean_image``, :class:`~cbir.data.transforms.CleanAndAugmented`), for the clean/degraded consistency term."""

    def __init__(self, catalog: Catalog, inputs, options: LoaderOptions = LoaderOptions(), augment: Sequence = (),
                 *, batch_sampler: Callable[..., Sampler] | None = None, val: EvalSpec | None = None,
                 test: EvalSpec | None = None, clean_views: bool = False) -> None:
        super().__init__(catalog, inputs, options, augment)
        if clean_views:
            self.train_tf = CleanAndAugmented(augment, int(inputs.input_size), tuple(inputs.mean), tuple(inputs.std),
                                              seed=options.seed)
        self.batch_sampler_factory = batch_sampler or MPerClassBatchSampler
        self.val_spec = val
        self.test_spec = test or val
        self.cache: dict[int, np.ndarray] = {}
        self._cache_filled = False

    def setup(self, stage: str | None = None) -> None:
        """Report catalog issues and, for small file-backed datasets, decode every image once."""
        if self._cache_filled:
            return
        self._cache_filled = True
        report_catalog_issues(self.catalog, [s for s in (self.val_spec, self.test_spec) if s is not None])
        if not self._should_cache():
            return
        self.cache, bad = fill_cache(self.catalog, np.arange(len(self.catalog.records)), self.options.cache_max_mb,
                                     self.options.on_bad_image)
        for message in bad:
            log.warning("skipped unreadable image: %s", message)
        log.info("image cache: %d images decoded in memory", len(self.cache))

    def _should_cache(self) -> bool:
        if self.options.cache_images == "auto":
            file_backed = all(isinstance(r.source, str) for r in self.catalog.records)
            return file_backed and len(self.catalog.records) <= AUTO_CACHE_MAX_IMAGES
        return bool(self.options.cache_images)

    def _dataset(self, indices: np.ndarray, transform: Callable) -> RecordDataset:
        return RecordDataset(self.catalog, indices, transform, on_bad_image=self.options.on_bad_image,
                             cache=self.cache)

    def train_dataloader(self) -> DataLoader:
        indices = self.catalog.select(self.options.train_split)
        dataset = self._dataset(indices, self.train_tf)
        sampler = self.batch_sampler_factory(self.catalog.labels(indices), batch_size=self.batch_size)
        if isinstance(sampler, MPerClassBatchSampler):
            stats = sampler.last_plan_stats
            log.info("train epoch plan: %d batches, %d/%d images visited, %d repeats, %d left over",
                     stats.num_batches, stats.images_visited, stats.images_total, stats.repeated_slots,
                     stats.leftover_images)
        loader_class = ResumableDataLoader if hasattr(sampler, "resume_at") else DataLoader
        return loader_class(dataset, batch_sampler=sampler, worker_init_fn=seed_transform_in_worker,
                            **self._loader_kwargs(collate_records))

    def split_dataloader(self, split: str, augmented: bool = False) -> DataLoader:
        """Every image of ``split`` once, in catalog order, through the evaluation transform (or, ``augmented``,
        the training one): the pairwise re-ranker's training passes (:mod:`cbir.training.reranker`)."""
        dataset = self._dataset(self.catalog.select(split), self.train_tf if augmented else self.eval_tf)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          worker_init_fn=seed_transform_in_worker if augmented else None,
                          **self._loader_kwargs(collate_records))

    def eval_dataloader(self, spec: EvalSpec, limit: int | float | None = None) -> DataLoader:
        dataset = spec.dataset(self.catalog, self.eval_tf, on_bad_image=self.options.on_bad_image, cache=self.cache)
        dataset = subsample_eval_set(dataset, limit, spec)
        sampler = DistributedSampler(dataset, shuffle=False) if distributed_world_size() > 1 else None
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False,
                          **self._loader_kwargs(collate_records))

    def val_dataloader(self) -> DataLoader | list:
        return self.eval_dataloader(self.val_spec, self.options.val_subset) if self.val_spec else []

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.test_spec, self.options.test_subset)


def subsample_eval_set(dataset: RecordDataset, limit: int | float | None, spec: EvalSpec,
                       seed: int = 0) -> RecordDataset:
    """A fixed random subset of an evaluation set — ``limit`` images (a count, or a fraction in (0, 1)) —
    keeping each image's query/gallery role, so the metrics stay retrieval metrics on a smaller set (a cut
    after N batches would keep queries with no gallery). None: the whole set."""
    if limit is None:
        return dataset
    count = int(round(len(dataset) * limit)) if isinstance(limit, float) and 0 < limit < 1 else int(limit)
    if count < 2:
        raise ConfigError(f"evaluation subset of {limit} images from {spec.describe()}: need at least 2")
    if count >= len(dataset):
        return dataset
    keep = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    log.info("evaluating on %d of %d images of %s (a fixed random subset)", count, len(dataset), spec.describe())
    return RecordDataset(dataset.catalog, dataset.indices[keep], dataset.transform, dataset.roles[keep],
                         on_bad_image=dataset.on_bad_image, cache=dataset.cache)


class PairDataModule(ImageDataModule):
    """Shuffled training pairs; validation and test on the held-out pairs (``eval_split``, or every
    pair outside ``options.train_split``)."""

    def __init__(self, catalog: PairCatalog, inputs, options: LoaderOptions = LoaderOptions(),
                 augment: Sequence = (), *, eval_split: str | None = None) -> None:
        super().__init__(catalog, inputs, options, augment)
        self.eval_batch_size = options.eval_batch_size or options.batch_size
        self.train_indices = catalog.select(options.train_split)
        self.eval_indices = catalog.select(eval_split, exclude=options.train_split)

    def _loader(self, indices: np.ndarray, transform: Callable, batch_size: int, shuffle: bool) -> DataLoader:
        kwargs = self._loader_kwargs()
        kwargs.pop("pin_memory")
        return DataLoader(PairDataset(self.catalog, indices, transform), batch_size=batch_size, shuffle=shuffle,
                          worker_init_fn=seed_transform_in_worker, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_indices, self.train_tf, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_indices, self.eval_tf, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class ResumableDataLoader(DataLoader):
    """The training DataLoader, whose position in the epoch travels in checkpoints.

    Lightning stores the ``state_dict()`` of a training loader that has one in every checkpoint, and when
    it resumes from a checkpoint saved mid-epoch (``callbacks.last_checkpoint``, a crash handler) hands it
    back before iterating; the batch sampler (:meth:`MPerClassBatchSampler.resume_at`) then starts after
    the batches already trained on. The position counts batches handed to the training loop, not the
    ones worker processes have prefetched. Iteration starts lazily, at the first batch: Lightning creates
    the iterator before it sets a resumed run's epoch on the sampler, and workers would otherwise
    prefetch the wrong epoch's batches.
    """

    _batches_yielded = 0
    _resume_state: dict | None = None

    def __iter__(self) -> Iterator[dict]:
        return _CountingIterator(self)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.batch_sampler.epoch), "batches_yielded": int(self._batches_yielded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_state = dict(state)

    def _start(self) -> Iterator[dict]:
        """The underlying iterator, resumed part-way if a saved state is for the epoch being started."""
        state, self._resume_state = self._resume_state, None
        start = 0
        if state is not None and int(state["epoch"]) == int(self.batch_sampler.epoch):
            start = int(state["batches_yielded"])
            log.info("resuming epoch %d at batch %d of %d", state["epoch"], start, len(self))
        self.batch_sampler.resume_at(start)
        self._batches_yielded = start
        return super().__iter__()


class _CountingIterator:
    """Iterates a :class:`ResumableDataLoader`, starting it at the first ``next`` and counting batches."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[dict] | None = None

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> dict:
        if self.iterator is None:
            self.iterator = self.loader._start()
        batch = next(self.iterator)
        self.loader._batches_yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)
