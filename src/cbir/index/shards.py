"""Extraction shards: a collection cut into shards of ``shard_size`` images, each embedded and written
atomically as ``shard_NNNNN.npy`` (float32 embeddings of its readable images) plus ``shard_NNNNN.json``
(their catalog indices, and the images that could not be read, with the reason). The JSON is written
last, so it marks a shard as done. ``manifest.json`` holds a fingerprint of the model and the collection
so a work folder is never resumed with something else.

Shared by the single-process extraction (:mod:`cbir.index.extract`) and its ranks
(:mod:`cbir.index.distributed`): the shard files, and so the result, are the same either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from cbir.data.datasets import RecordDataset
from cbir.data.transforms import eval_transform
from cbir.errors import ConfigError
from cbir.export.runtimes import check_runtime
from cbir.index.collection import Collection
from cbir.index.errors import ExtractionMismatchError
from cbir.io import atomic_save_npy, atomic_write_json
from cbir.models.checkpoint import hash_state
from cbir.models.inference import embed, prepare_for_inference
from cbir.models.precision import check_precision

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SKIPPED = "skipped.json"


@dataclass(frozen=True)
class ExtractionOptions:
    """How a collection is embedded (``conf/index/*.yaml`` hold the same keys under ``# extraction``)."""

    batch_size: int = 64
    num_workers: int = 2
    shard_size: int = 4096  # embeddings written every shard_size images; a killed run resumes from there
    device: str | None = None  # None: cuda when available
    channels_last: bool = True
    precision: str = "auto"  # auto | fp32 | bf16; auto is resolved against a bundle's bf16 check (pipeline), else fp32
    resume: bool = True
    keep_shards: bool = False  # keep the embedding shards after the index is saved (to rebuild without re-embedding)
    progress: bool = True
    processes: int = 1  # extraction ranks to spawn (one per GPU on CUDA); under torchrun the launcher decides
    runtime: str = "auto"  # auto | eager | compiled (torch.compile) | onnx | onnx-int8 (a bundle's copies); auto is
    # resolved against a bundle's measured speeds (pipeline.bundle_model); a bare model runs eager

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError(f"index extraction: batch_size ({self.batch_size}) and shard_size "
                              f"({self.shard_size}) must be >= 1")
        if self.processes < 1:
            raise ConfigError(f"index.processes={self.processes}: must be >= 1")
        check_precision(self.precision)
        check_runtime(self.runtime)

    @property
    def bf16(self) -> bool:
        """bf16 autocast: only when asked for, or resolved so from ``auto`` by a caller holding the bundle."""
        return check_precision(self.precision) == "bf16"

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def with_changes(self, **changes) -> ExtractionOptions:
        return replace(self, **changes)

    @classmethod
    def of(cls, options: ExtractionOptions | None = None, **changes) -> ExtractionOptions:
        """``options`` (default: the defaults) with ``changes`` (field values) applied."""
        return (options or cls()).with_changes(**changes)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Extraction:
    """Embeddings of the readable images (row i belongs to catalog record ``indices[i]``), and the
    images that were skipped (``{"index", "path", "reason"}``)."""

    embeddings: np.ndarray | None  # None when extracted with load_embeddings=False (read shard_files)
    indices: np.ndarray
    skipped: list[dict] = field(default_factory=list)
    shard_files: list[Path] = field(default_factory=list)  # the .npy shards, in collection order
    work_dir: Path | None = None  # the folder of the shards (resumable until the index is saved)


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the weights and the preprocessing the model expects: embeddings from another model, or
    the same model fed differently, must not be mixed into one index."""
    digest = hashlib.sha256()
    for name in ("input_size", "mean", "std", "embedding_dim"):
        digest.update(repr(getattr(model, name, None)).encode())
    if callable(getattr(model, "fingerprint", None)):  # a runtime copy (ONNX): its file, not torch weights
        digest.update(model.fingerprint().encode())
    hash_state(digest, model)
    return digest.hexdigest()


def collection_fingerprint(collection: Collection) -> str:
    digest = hashlib.sha256()
    for index in collection.indices:
        digest.update(collection.source(int(index)).encode() + b"\n")
    return digest.hexdigest()


def collate_items(items: list[dict]) -> dict:
    """Readable images batched; unreadable ones kept apart with their catalog index and reason."""
    good = [item for item in items if "bad_image" not in item]
    batch = default_collate([{"image": i["image"], "index": i["index"]} for i in good]) if good else {}
    batch["bad"] = [(item["index"], item["bad_image"]) for item in items if "bad_image" in item]
    return batch


def extraction_manifest(model: nn.Module, collection: Collection, options: ExtractionOptions) -> dict:
    """What a work folder's shards depend on (checked before resuming)."""
    return {
        "model": model_fingerprint(model),
        "collection": collection_fingerprint(collection),
        "count": len(collection),
        "shard_size": int(options.shard_size),
        "batch_size": int(options.batch_size),
        "bf16": bool(options.bf16),
        "embedding_dim": int(model.embedding_dim),
    }


def shard_count(images: int, shard_size: int) -> int:
    """Shards of ``shard_size`` images (the last one shorter) a collection of ``images`` is cut into."""
    return -(-images // shard_size)


def images_in_shards(shards: list[int], images: int, shard_size: int) -> int:
    """How many of the collection's ``images`` fall in ``shards``."""
    return sum(min(shard_size, images - s * shard_size) for s in shards)


def unfinished_shards(work: Path, num_shards: int) -> list[int]:
    """Shards without their JSON (the file written last), i.e. still to extract."""
    return [s for s in range(num_shards) if not (work / f"shard_{s:05d}.json").is_file()]


def prepare_work_dir(work: Path, manifest: dict, resume: bool) -> None:
    path = work / MANIFEST
    if path.is_file() and resume:
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None
        if saved != manifest:
            changed = sorted(k for k in manifest if (saved or {}).get(k) != manifest[k])
            raise ExtractionMismatchError(
                f"extraction folder {work} holds shards of another run (differs in: {', '.join(changed)}); "
                "delete it or start over with resume=False (--no-resume)")
        return
    if work.exists() and not resume:
        for stale in list(work.glob("shard_*")) + [work / SKIPPED, path]:
            stale.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)


def extract_shards(model: nn.Module, collection: Collection, work: Path, shards: list[int],
                   options: ExtractionOptions, *, device: str, done_images: int, total: int | None = None,
                   desc: str = "extracting") -> None:
    """Embed the images of ``shards`` on ``device`` and write each shard as it completes."""
    batch_size, shard_size, channels_last = options.batch_size, options.shard_size, options.channels_last
    transform = eval_transform(model.input_size, model.mean, model.std)
    dataset = RecordDataset(collection.catalog, collection.indices, transform, on_bad_image="skip")
    plan = []  # (shard, batch of dataset positions); batches never cross a shard boundary
    for shard in shards:
        stop = min((shard + 1) * shard_size, len(collection))
        plan += [(shard, list(range(start, min(start + batch_size, stop))))
                 for start in range(shard * shard_size, stop, batch_size)]
    loader = DataLoader(dataset, batch_sampler=[batch for _, batch in plan], num_workers=options.num_workers,
                        collate_fn=collate_items, pin_memory=device.startswith("cuda"))
    runner = prepare_for_inference(model, device=device, channels_last=channels_last,
                                   compile=options.runtime == "compiled")
    # in a log file (no terminal) a line every 30 s instead of one per batch
    interactive = sys.stderr.isatty()
    bar = tqdm(total=len(collection) if total is None else total, initial=done_images, unit="img", desc=desc,
               disable=not options.progress,
               mininterval=0.1 if interactive else 30.0,
               dynamic_ncols=True)
    pending: dict[str, list] = {"embeddings": [], "indices": [], "skipped": []}
    try:
        for position, ((shard, positions), batch) in enumerate(zip(plan, loader)):
            if "image" in batch:
                out = embed(runner, batch["image"], device=device, channels_last=channels_last, bf16=options.bf16)
                pending["embeddings"].append(out.cpu().numpy().astype(np.float32, copy=False))
                pending["indices"].append(batch["index"].numpy())
            for index, reason in batch["bad"]:
                log.warning("extraction: skipped %s", reason)
                pending["skipped"].append({"index": int(index), "path": collection.source(int(index)),
                                           "reason": reason})
            bar.update(len(positions))
            if position + 1 == len(plan) or plan[position + 1][0] != shard:
                write_shard(work, shard, pending, int(model.embedding_dim))
                pending = {"embeddings": [], "indices": [], "skipped": []}
    finally:
        bar.close()


def write_shard(work: Path, shard: int, pending: dict, dim: int) -> None:
    embeddings = np.concatenate(pending["embeddings"]) if pending["embeddings"] else np.zeros((0, dim), np.float32)
    indices = np.concatenate(pending["indices"]).tolist() if pending["indices"] else []
    atomic_save_npy(work / f"shard_{shard:05d}.npy", embeddings)
    atomic_write_json(work / f"shard_{shard:05d}.json", {"indices": indices, "skipped": pending["skipped"]})


def gather_shards(work: Path, collection: Collection, num_shards: int, load_embeddings: bool = True) -> Extraction:
    embeddings, indices, skipped, files = [], [], [], []
    for shard in range(num_shards):
        meta = json.loads((work / f"shard_{shard:05d}.json").read_text())
        files.append(work / f"shard_{shard:05d}.npy")
        array = np.load(files[-1], mmap_mode=None if load_embeddings else "r")
        if len(array) != len(meta["indices"]):
            raise ExtractionMismatchError(f"extraction folder {work}: shard {shard} is inconsistent; delete "
                                          f"shard_{shard:05d}.* and run again")
        if load_embeddings:
            embeddings.append(array)
        indices.extend(meta["indices"])
        skipped.extend(meta["skipped"])
    atomic_write_json(work / SKIPPED, skipped)
    if skipped:
        log.warning("extraction: %d of %d images could not be read and were skipped (listed in %s)",
                    len(skipped), len(collection), work / SKIPPED)
    gathered = np.concatenate(embeddings).astype(np.float32, copy=False) if load_embeddings else None
    return Extraction(gathered, np.asarray(indices, dtype=np.int64), skipped, files)
