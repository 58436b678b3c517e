"""Pixels: the Dataset that loads a record's image, and the LightningDataModule that batches them."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from cbir.data.formats import ArrayRef, Catalog
from cbir.data.sampler import MPerClassBatchSampler
from cbir.data.transforms import eval_transform, seed_transform_in_worker, train_transform
from cbir.errors import BadImageError, ConfigError

log = logging.getLogger(__name__)

ROLE_QUERY = 1
ROLE_GALLERY = 2
AUTO_CACHE_MAX_IMAGES = 50_000  # data.cache_images=auto decodes file-backed datasets up to this size


def load_image(catalog: Catalog, source: str | ArrayRef,
               box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of one record; grey arrays are replicated to three channels and
    transparent images composited onto white. ``box`` (x, y, w, h in pixels) crops to an annotated
    object, clipped to the image since benchmark boxes may overhang its border."""
    if isinstance(source, ArrayRef):
        pixels = catalog.arrays[source.array][source.index]
    else:
        try:
            with Image.open(source) as image:
                image.load()
                pixels = image_to_rgb(image)
        except FileNotFoundError:
            raise BadImageError(f"image file {source} does not exist") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise BadImageError(f"cannot decode image {source}: {exc}") from None
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if box is not None:
        x, y, w, h = box
        height, width = pixels.shape[:2]
        left, right = np.clip([np.floor(x), np.ceil(x + w)], 0, width).astype(int)
        top, bottom = np.clip([np.floor(y), np.ceil(y + h)], 0, height).astype(int)
        if right <= left or bottom <= top:
            raise BadImageError(f"box {box} (x, y, w, h) lies outside image {source} ({width}x{height})")
        pixels = pixels[top:bottom, left:right]
    return np.ascontiguousarray(pixels)


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of a decoded PIL image, transparency composited onto white."""
    if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"))


def check_bad_image_policy(on_bad_image: str) -> None:
    if on_bad_image not in ("fail", "skip"):
        raise ConfigError(f"data.on_bad_image must be fail or skip, got {on_bad_image!r}")


def load_record(catalog: Catalog, index: int) -> np.ndarray:
    record = catalog.records[index]
    return load_image(catalog, record.source, record.box)


class RecordDataset(Dataset):
    """Items ``{"image", "label", "index", "role"}`` for the catalog records at ``indices``.

    ``index`` is the record's position in the catalog (unique, so predictions can be de-duplicated
    after a distributed sampler pads); ``role`` is a bit mask of ROLE_QUERY / ROLE_GALLERY.
    With ``on_bad_image="skip"`` an unreadable image becomes ``{"bad_image": path}``, which
    :func:`collate_records` drops from the batch and reports; with ``"fail"`` it raises.
    ``cache`` (record index → decoded pixels) skips decoding for images already in it.
    """

    def __init__(self, catalog: Catalog, indices: Sequence[int] | np.ndarray, transform: Callable,
                 roles: np.ndarray | None = None, on_bad_image: str = "fail",
                 cache: dict[int, np.ndarray] | None = None) -> None:
        check_bad_image_policy(on_bad_image)
        self.catalog = catalog
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.roles = roles if roles is not None else np.full(len(self.indices), ROLE_QUERY | ROLE_GALLERY)
        self.on_bad_image = on_bad_image
        self.cache = cache if cache is not None else {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = int(self.indices[position])
        pixels = self.cache.get(index)
        if pixels is None:
            try:
                pixels = load_record(self.catalog, index)
            except BadImageError as exc:
                if self.on_bad_image == "fail":
                    raise
                return {"bad_image": str(exc), "index": index}
        return {
            "image": self.transform(image=pixels)["image"],
            "label": self.catalog.records[index].label,
            "index": index,
            "role": int(self.roles[position]),
        }


def collate_records(items: list[dict]) -> dict:
    """Default collation of the good items; skipped images travel along as ``batch["bad_images"]``
    (a list of messages) so the training process can report every one of them."""
    good = [item for item in items if "bad_image" not in item]
    batch = default_collate(good) if good else {}
    batch["bad_images"] = [item["bad_image"] for item in items if "bad_image" in item]
    return batch


def fill_cache(catalog: Catalog, indices: Sequence[int] | np.ndarray, max_mb: float,
               on_bad_image: str = "fail") -> tuple[dict[int, np.ndarray], list[str]]:
    """Decode ``indices`` once into memory (before DataLoader workers fork, so they share it), up to
    ``max_mb``. Returns the cache and the messages of unreadable images (``on_bad_image="skip"``)."""
    cache: dict[int, np.ndarray] = {}
    bad: list[str] = []
    used = 0
    for index in tqdm(np.unique(indices), desc="decoding images into memory", unit="img", leave=False):
        try:
            pixels = load_record(catalog, int(index))
        except BadImageError as exc:
            if on_bad_image == "fail":
                raise
            bad.append(str(exc))
            continue
        used += pixels.nbytes
        if used > max_mb * 2**20:
            log.warning("image cache: stopped at %d images (data.cache_max_mb=%s reached)", len(cache), max_mb)
            break
        cache[int(index)] = pixels
    return cache, bad


def report_catalog_issues(catalog: Catalog, specs: Sequence[EvalSpec]) -> list[str]:
    """Warn about what silently skews results: duplicate image paths, and classes with a single image
    in an all-vs-all evaluation set (their queries have nothing to find and are excluded)."""
    issues = []
    paths = [r.source for r in catalog.records if isinstance(r.source, str)]
    duplicates = [p for p, n in Counter(paths).items() if n > 1]
    if duplicates:
        issues.append(f"{len(duplicates)} image paths appear more than once (first: {duplicates[0]})")
    for spec in specs:
        if spec.all_vs_all:
            counts = Counter(catalog.labels(catalog.select(spec.queries)).tolist())
            singles = sum(n == 1 for n in counts.values())
            if singles:
                issues.append(f"{singles} of {len(counts)} classes in '{spec.queries}' have a single image; "
                              "their queries are excluded from the metrics")
    for issue in issues:
        log.warning("%s: %s", catalog.name, issue)
    return issues


@dataclass(frozen=True)
class EvalSpec:
    """Which records are queries and which the gallery. ``gallery=None`` (or equal to ``queries``)
    means all-vs-all: each query searches all others, itself excluded."""

    queries: str
    gallery: str | None = None

    @property
    def all_vs_all(self) -> bool:
        return self.gallery is None or self.gallery == self.queries

    def describe(self) -> str:
        if self.all_vs_all:
            return f"all-vs-all within '{self.queries}' (self excluded)"
        return f"queries '{self.queries}' vs gallery '{self.gallery}'"

    def dataset(self, catalog: Catalog, transform: Callable, **kwargs) -> RecordDataset:
        """The evaluation set; ``kwargs`` go to :class:`RecordDataset` (on_bad_image, cache)."""
        queries = catalog.select(self.queries)
        if self.all_vs_all:
            return RecordDataset(catalog, queries, transform, **kwargs)
        gallery = catalog.select(self.gallery)
        indices, inverse = np.unique(np.concatenate([queries, gallery]), return_inverse=True)
        roles = np.zeros(len(indices), dtype=np.int64)
        np.bitwise_or.at(roles, inverse[: len(queries)], ROLE_QUERY)
        np.bitwise_or.at(roles, inverse[len(queries):], ROLE_GALLERY)
        return RecordDataset(catalog, indices, transform, roles, **kwargs)


class RetrievalDataModule(pl.LightningDataModule):
    """Training batches from the M-per-class sampler; validation/test sets per :class:`EvalSpec`."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Sequence = (),
        batch_size: int = 64,
        batch_sampler: Callable[..., Sampler] | None = None,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        train_split: str = "train",
        val: EvalSpec | None = None,
        test: EvalSpec | None = None,
        on_bad_image: str = "fail",
        cache_images: bool | str = "auto",
        cache_max_mb: float = 2048.0,
        seed: int | None = None,
    ) -> None:
        """``seed``: the augmentations' random state (albumentations ignores the global seed)."""
        super().__init__()
        self.catalog = catalog
        self.train_tf = train_transform(augment, image_size, mean, std, seed=seed)
        self.eval_tf = eval_transform(image_size, mean, std)
        self.batch_size = batch_size
        self.batch_sampler_factory = batch_sampler or MPerClassBatchSampler
        self.eval_batch_size = eval_batch_size or batch_size * 2
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.train_split = train_split
        self.val_spec = val
        self.test_spec = test or val
        check_bad_image_policy(on_bad_image)
        self.on_bad_image = on_bad_image
        self.cache_images = cache_images
        self.cache_max_mb = cache_max_mb
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
        self.cache, bad = fill_cache(self.catalog, np.arange(len(self.catalog.records)), self.cache_max_mb,
                                     self.on_bad_image)
        for message in bad:
            log.warning("skipped unreadable image: %s", message)
        log.info("image cache: %d images decoded in memory", len(self.cache))

    def _should_cache(self) -> bool:
        if self.cache_images == "auto":
            file_backed = all(isinstance(r.source, str) for r in self.catalog.records)
            return file_backed and len(self.catalog.records) <= AUTO_CACHE_MAX_IMAGES
        return bool(self.cache_images)

    def _dataset(self, indices: np.ndarray, transform: Callable) -> RecordDataset:
        return RecordDataset(self.catalog, indices, transform, on_bad_image=self.on_bad_image, cache=self.cache)

    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
            "collate_fn": collate_records,
        }

    def train_dataloader(self) -> DataLoader:
        indices = self.catalog.select(self.train_split)
        dataset = self._dataset(indices, self.train_tf)
        sampler = self.batch_sampler_factory(self.catalog.labels(indices), batch_size=self.batch_size)
        if isinstance(sampler, MPerClassBatchSampler):
            stats = sampler.last_plan_stats
            log.info("train epoch plan: %d batches, %d/%d images visited, %d repeats, %d left over",
                     stats.num_batches, stats.images_visited, stats.images_total, stats.repeated_slots,
                     stats.leftover_images)
        loader_class = ResumableDataLoader if hasattr(sampler, "resume_at") else DataLoader
        return loader_class(dataset, batch_sampler=sampler, worker_init_fn=seed_transform_in_worker,
                            **self._loader_kwargs())

    def eval_dataloader(self, spec: EvalSpec) -> DataLoader:
        dataset = spec.dataset(self.catalog, self.eval_tf, on_bad_image=self.on_bad_image, cache=self.cache)
        sampler = DistributedSampler(dataset, shuffle=False) if _distributed() else None
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False,
                          **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        return self.eval_dataloader(self.val_spec) if self.val_spec else []

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.test_spec)


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


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
