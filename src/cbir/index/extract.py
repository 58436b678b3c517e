"""Streaming, resumable embedding extraction over a collection (:mod:`cbir.index.shards` holds the shard
format). A killed run, started again with the same model and collection, skips the finished shards and
gives the same embeddings as an uninterrupted run. Unreadable images are skipped, logged and listed in
``skipped.json``, never silently dropped.

With ``processes > 1`` (or under ``torchrun``) the shards are shared out between ranks
(:mod:`cbir.index.distributed`); the shard files, and so the result, are the same.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from cbir.index import shards
from cbir.index.collection import Collection
from cbir.index.distributed import extract_distributed
from cbir.index.shards import Extraction, ExtractionOptions
from cbir.ranks import launched_rank

log = logging.getLogger(__name__)


def extract_collection(model: nn.Module, collection: Collection, work_dir: str | os.PathLike,
                       options: ExtractionOptions | None = None, *, load_embeddings: bool = True,
                       **changes) -> Extraction | None:
    """Embed every image of ``collection`` into shards under ``work_dir`` (resuming finished shards when
    ``options.resume``) and return all embeddings (only the shard files with ``load_embeddings=False``,
    for collections beyond RAM). Images are preprocessed with the model's own evaluation transform;
    inference goes through :mod:`cbir.models.inference`. ``changes`` are :class:`ExtractionOptions`
    fields (``batch_size=8``). ``processes > 1`` spawns that many ranks, and under ``torchrun`` every rank
    takes part; then only rank 0 returns the extraction (others None)."""
    options = ExtractionOptions.of(options, **changes)
    if options.processes != 1 or launched_rank() is not None:
        return extract_distributed(model, collection, Path(work_dir), options, load_embeddings=load_embeddings)
    work = Path(work_dir)
    device = options.device or shards.default_device()
    shards.prepare_work_dir(work, shards.extraction_manifest(model, collection, options), options.resume)
    num_shards = shards.shard_count(len(collection), options.shard_size)
    todo = shards.unfinished_shards(work, num_shards)
    done = [s for s in range(num_shards) if s not in todo]
    done_images = shards.images_in_shards(done, len(collection), options.shard_size)
    if todo:
        if done_images:
            log.info("extraction: resuming, %d of %d shards already done", num_shards - len(todo), num_shards)
        shards.extract_shards(model, collection, work, todo, options, device=device, done_images=done_images)
    return shards.gather_shards(work, collection, num_shards, load_embeddings)
