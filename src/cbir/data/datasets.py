"""Pixels for training and evaluation: the Datasets that load records' images (through
:mod:`cbir.data.images`), the evaluation spec that says which records are queries and which the gallery,
and the in-memory image cache."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from cbir.data.catalog import Catalog
from cbir.data.images import load_image, load_record
from cbir.data.readers.pairs import PairCatalog
from cbir.errors import BadImageError, ConfigError

log = logging.getLogger(__name__)

ROLE_QUERY = 1
ROLE_GALLERY = 2


def check_bad_image_policy(on_bad_image: str) -> None:
    if on_bad_image not in ("fail", "skip"):
        raise ConfigError(f"data.on_bad_image must be fail or skip, got {on_bad_image!r}")


class RecordDataset(Dataset):
    """Items ``{"image", "label", "index", "role"}`` for the catalog records at ``indices``.

    ``index`` is the record's position in the catalog (unique, so predictions can be de-duplicated
    after a distributed sampler pads); ``role`` is a bit mask of ROLE_QUERY / ROLE_GALLERY.
    With ``on_bad_image="skip"`` an unreadable image becomes ``{"bad_image": path}``, which
    :func:`collate_records` drops from the batch and reports; with ``"fail"`` it raises.
    ``cache`` (record index → decoded pixels) skips decoding for images already in it.
    A ``transform`` that also returns ``clean_image`` (:class:`cbir.data.transforms.CleanAndAugmented`) adds it to
    the item: the target of the clean/degraded consistency term (:mod:`cbir.training.consistency`).
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
        views = self.transform(image=pixels)
        item = {
            "image": views["image"],
            "label": self.catalog.records[index].label,
            "index": index,
            "role": int(self.roles[position]),
        }
        if "clean_image" in views:
            item["clean_image"] = views["clean_image"]
        return item


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


class PairDataset(Dataset):
    """Items ``{"image_a", "image_b", "same", "index"}``; an unreadable image raises, naming it."""

    def __init__(self, catalog: PairCatalog, indices: Sequence[int] | np.ndarray, transform: Callable) -> None:
        self.catalog = catalog
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = int(self.indices[position])
        pair = self.catalog.pairs[index]
        return {
            "image_a": self.transform(image=load_image(None, pair.path_a))["image"],
            "image_b": self.transform(image=load_image(None, pair.path_b))["image"],
            "same": pair.same,
            "index": index,
        }
