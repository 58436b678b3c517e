"""Pixels: the Dataset that loads a record's image, and the LightningDataModule that batches them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from cbir.data.formats import ArrayRef, Catalog
from cbir.data.sampler import MPerClassBatchSampler
from cbir.data.transforms import eval_transform, train_transform
from cbir.errors import BadImageError

log = logging.getLogger(__name__)

ROLE_QUERY = 1
ROLE_GALLERY = 2


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
                if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
                    image = image.convert("RGBA")
                    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(background, image)
                pixels = np.asarray(image.convert("RGB"))
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


class RecordDataset(Dataset):
    """Items ``{"image", "label", "index", "role"}`` for the catalog records at ``indices``.

    ``index`` is the record's position in the catalog (unique, so predictions can be de-duplicated
    after a distributed sampler pads); ``role`` is a bit mask of ROLE_QUERY / ROLE_GALLERY.
    """

    def __init__(self, catalog: Catalog, indices: Sequence[int] | np.ndarray, transform: Callable,
                 roles: np.ndarray | None = None) -> None:
        self.catalog = catalog
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.roles = roles if roles is not None else np.full(len(self.indices), ROLE_QUERY | ROLE_GALLERY)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = int(self.indices[position])
        record = self.catalog.records[index]
        pixels = load_image(self.catalog, record.source, record.box)
        return {
            "image": self.transform(image=pixels)["image"],
            "label": record.label,
            "index": index,
            "role": int(self.roles[position]),
        }


@dataclass(frozen=True)
class EvalSpec:
    """Which records are queries and which the gallery. ``gallery=None`` (or equal to ``queries``)
    means all-vs-all: each query searches all others, itself excluded."""

    queries: str
    gallery: str | None = None

    @property
    def all_vs_all(self) -> bool:
        return self.gallery is None or self.gallery == self.queries

    def dataset(self, catalog: Catalog, transform: Callable) -> RecordDataset:
        queries = catalog.select(self.queries)
        if self.all_vs_all:
            return RecordDataset(catalog, queries, transform)
        gallery = catalog.select(self.gallery)
        indices, inverse = np.unique(np.concatenate([queries, gallery]), return_inverse=True)
        roles = np.zeros(len(indices), dtype=np.int64)
        np.bitwise_or.at(roles, inverse[: len(queries)], ROLE_QUERY)
        np.bitwise_or.at(roles, inverse[len(queries):], ROLE_GALLERY)
        return RecordDataset(catalog, indices, transform, roles)


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
    ) -> None:
        super().__init__()
        self.catalog = catalog
        self.train_tf = train_transform(augment, image_size, mean, std)
        self.eval_tf = eval_transform(image_size, mean, std)
        self.batch_size = batch_size
        self.batch_sampler_factory = batch_sampler or MPerClassBatchSampler
        self.eval_batch_size = eval_batch_size or batch_size * 2
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.train_split = train_split
        self.val_spec = val
        self.test_spec = test or val

    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        indices = self.catalog.select(self.train_split)
        dataset = RecordDataset(self.catalog, indices, self.train_tf)
        sampler = self.batch_sampler_factory(self.catalog.labels(indices), batch_size=self.batch_size)
        if isinstance(sampler, MPerClassBatchSampler):
            stats = sampler.last_plan_stats
            log.info("train epoch plan: %d batches, %d/%d images visited, %d repeats, %d left over",
                     stats.num_batches, stats.images_visited, stats.images_total, stats.repeated_slots,
                     stats.leftover_images)
        return DataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs())

    def eval_dataloader(self, spec: EvalSpec) -> DataLoader:
        dataset = spec.dataset(self.catalog, self.eval_tf)
        sampler = DistributedSampler(dataset, shuffle=False) if _distributed() else None
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False,
                          **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        return self.eval_dataloader(self.val_spec) if self.val_spec else []

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.test_spec)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
