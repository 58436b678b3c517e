"""Extraction shared out between processes with ``torch.distributed``: one rank per GPU, or several on CPU.

Two ways in, one code path (:func:`run_rank`):

- ``torchrun --nproc_per_node N cbir index build ...``: every rank runs the command; the launcher's
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``) is detected;
- ``processes=N`` from one ordinary process: N ranks are spawned (``torch.multiprocessing.spawn``) and the
  parent gathers their shards.

Rank 0 alone checks or writes the work folder's manifest and lists the shards still to do (so a killed run
resumes, with any number of ranks); it tells every rank, and each extracts the shards ``todo[rank::world]``
into the same folder (shard files are already one per shard, written atomically). The ranks then report
to each other, so one failure stops all with its message instead of a hang, and rank 0 reads the shards
back in collection order: the embeddings and their order, hence the ids the index gives them, are those
of a single-process run. Coordination uses gloo (tiny objects only), so the same code runs on CPU and
CUDA; on CUDA each rank uses the GPU ``cuda:<local rank>``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cbir.errors import CbirError, ConfigError
from cbir.index.collection import Collection
from cbir.index.errors import DistributedExtractionError
from cbir.index.shards import (
    Extraction,
    ExtractionOptions,
    default_device,
    extract_shards,
    extraction_manifest,
    gather_shards,
    images_in_shards,
    prepare_work_dir,
    shard_count,
    unfinished_shards,
)
from cbir.ranks import Rank, launched_rank

log = logging.getLogger(__name__)


def rank_device(device: str | None, local_rank: int, local_world: int) -> str:
    """The device of one rank: ``cuda:<local rank>`` when extracting on CUDA, else the CPU."""
    device = device or default_device()
    if not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ConfigError(f"index extraction with {local_world} processes: device={device} would put every rank "
                          "on one GPU; use device=cuda (one GPU per rank) or device=cpu")
    available = torch.cuda.device_count()
    if local_world > available:
        raise ConfigError(f"index extraction: {local_world} processes on this machine but {available} GPUs "
                          f"visible; use processes={max(available, 1)} (one per GPU) or device=cpu")
    return f"cuda:{local_rank}"


def extract_distributed(model: nn.Module, collection: Collection, work: Path, options: ExtractionOptions, *,
                        load_embeddings: bool = True) -> Extraction | None:
    """:func:`cbir.index.extract.extract_collection` over several ranks; returns the extraction on rank 0
    (and in a spawning parent), None on the other ranks."""
    launched = launched_rank()
    if launched is not None:
        if options.processes not in (1, launched.world):
            raise ConfigError(f"index.processes={options.processes} but the launcher started {launched.world} "
                              "ranks: leave processes at 1 under torchrun (the launcher decides)")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", launched.world))
        run_device = rank_device(options.device, launched.local_rank, local_world)
        return run_rank(launched, model, collection, work, options, device=run_device, init_method="env://",
                        gather=True, load_embeddings=load_embeddings)
    rank_device(options.device, options.processes - 1, options.processes)  # fail here, in the parent
    return spawn_extraction(model, collection, work, options, load_embeddings=load_embeddings)


def run_rank(me: Rank, model: nn.Module, collection: Collection, work: Path, options: ExtractionOptions, *,
             device: str, init_method: str, gather: bool, load_embeddings: bool = True) -> Extraction | None:
    """One rank's part: agree on the shards to do, extract this rank's, wait for all, gather on rank 0."""
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=init_method, rank=me.rank, world_size=me.world)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    try:
        num_shards = shard_count(len(collection), options.shard_size)
        todo = _agree_on_shards(me, model, collection, work, options, num_shards=num_shards, group=group)
        mine = todo[me.rank::me.world]
        failure, error = None, None
        try:
            if mine:
                images = images_in_shards(mine, len(collection), options.shard_size)
                extract_shards(model, collection, work, mine, options.with_changes(progress=options.progress and
                                                                                   me.rank == 0),
                               device=device, done_images=0, total=images,
                               desc=f"extracting (rank 0 of {me.world})")
        except Exception as exc:  # reported to every rank below, then raised here
            failure, error = f"{type(exc).__name__}: {exc}", exc
        failures: list[str | None] = [None] * me.world
        dist.all_gather_object(failures, failure, group=group)
        if error is not None:
            raise error
        failed = [(rank, text) for rank, text in enumerate(failures) if text]
        if failed:
            rank, text = failed[0]
            raise DistributedExtractionError(f"extraction rank {rank} of {me.world} failed ({text}); the shards "
                                             f"finished are kept in {work}: fix the cause and run again to resume")
        if gather and me.rank == 0:
            return gather_shards(work, collection, num_shards, load_embeddings)
        return None
    finally:
        if owns_group:
            dist.destroy_process_group()


def _agree_on_shards(me: Rank, model: nn.Module, collection: Collection, work: Path, options: ExtractionOptions, *,
                     num_shards: int, group) -> list[int]:
    """Rank 0 prepares the work folder (manifest written once) and lists the unfinished shards; every rank
    gets that list, or rank 0's error."""
    message: list = [None]
    if me.rank == 0:
        try:
            prepare_work_dir(work, extraction_manifest(model, collection, options), options.resume)
            todo = unfinished_shards(work, num_shards)
            if len(todo) < num_shards:
                log.info("extraction: resuming, %d of %d shards already done", num_shards - len(todo), num_shards)
            message = [("ok", todo)]
        except Exception as exc:
            message = [("error", (type(exc), str(exc)))]
            dist.broadcast_object_list(message, src=0, group=group)
            raise
    dist.broadcast_object_list(message, src=0, group=group)
    status, value = message[0]
    if status == "error":
        kind, text = value
        raise kind(text) if issubclass(kind, CbirError) else DistributedExtractionError(f"rank 0: {text}")
    return value


# ---------------------------------------------------------------------------------------------------
# processes=N from one ordinary process
# ---------------------------------------------------------------------------------------------------
def spawn_extraction(model: nn.Module, collection: Collection, work: Path, options: ExtractionOptions, *,
                     load_embeddings: bool = True) -> Extraction:
    """Spawn ``options.processes`` ranks (each with its share of the CPU threads), wait, and gather their
    shards."""
    from torch.multiprocessing.spawn import ProcessException

    processes = options.processes
    threads = max(1, (os.cpu_count() or 1) // processes)
    rendezvous = Path(tempfile.mkdtemp(prefix="cbir-extract-"))
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_spawned_rank, nprocs=processes, join=True,
                 args=(processes, str(rendezvous / "store"), threads, model, collection, work, options, errors))
    except ProcessException as exc:
        reported = []
        while not errors.empty():
            reported.append(errors.get())
        # the rank that failed first-hand, not the ones that only heard about it
        reported.sort(key=lambda r: (r[1] is DistributedExtractionError, r[0]))
        if not reported:
            raise DistributedExtractionError(f"an extraction process died ({exc}); the shards finished are kept "
                                             f"in {work}: run again to resume") from None
        rank, kind, text = reported[0]
        if issubclass(kind, CbirError):
            raise kind(text) from None
        raise DistributedExtractionError(f"extraction process {rank} of {processes} failed ({kind.__name__}: {text}); "
                                         f"the shards finished are kept in {work}: fix the cause and run again "
                                         "to resume") from None
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)
    return gather_shards(work, collection, shard_count(len(collection), options.shard_size), load_embeddings)


def _spawned_rank(rank: int, world: int, store: str, threads: int, model: nn.Module, collection: Collection,
                  work: Path, options: ExtractionOptions, errors) -> None:
    torch.set_num_threads(threads)
    try:
        run_rank(Rank(rank, world, rank), model, collection, work, options,
                 device=rank_device(options.device, rank, world), init_method=f"file://{store}", gather=False)
    except Exception as exc:
        errors.put((rank, type(exc), str(exc)))
        raise
