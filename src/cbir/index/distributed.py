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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cbir.errors import CbirError, ConfigError
from cbir.index.collection import Collection
from cbir.index.extract import (Extraction, _extract_shards, _gather, _prepare_work_dir, default_device,
                                extraction_manifest, images_in_shards, shard_count, unfinished_shards)

log = logging.getLogger(__name__)


class DistributedExtractionError(CbirError):
    """A rank of a multi-process extraction failed (the shards other ranks finished are kept)."""


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int


def launched_rank() -> Rank | None:
    """This process's rank when a launcher such as ``torchrun`` started several (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return Rank(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def is_main_process() -> bool:
    """True for a single process and for rank 0 of a launched group (the one that writes the index)."""
    launched = launched_rank()
    return launched is None or launched.rank == 0


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


def extract_distributed(model: nn.Module, collection: Collection, work_dir: str | os.PathLike, *,
                        processes: int, batch_size: int, num_workers: int, shard_size: int,
                        device: str | None, channels_last: bool, bf16: bool, resume: bool, progress: bool,
                        load_embeddings: bool = True) -> Extraction | None:
    """:func:`cbir.index.extract.extract_collection` over several ranks; returns the extraction on rank 0
    (and in a spawning parent), None on the other ranks."""
    options = dict(batch_size=batch_size, num_workers=num_workers, shard_size=shard_size,
                   channels_last=channels_last, bf16=bf16, resume=resume, progress=progress)
    launched = launched_rank()
    if launched is not None:
        if processes not in (1, launched.world):
            raise ConfigError(f"index.processes={processes} but the launcher started {launched.world} ranks: "
                              "leave processes at 1 under torchrun (the launcher decides)")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", launched.world))
        run_device = rank_device(device, launched.local_rank, local_world)
        return run_rank(launched, model, collection, Path(work_dir), device=run_device, init_method="env://",
                        gather=True, load_embeddings=load_embeddings, **options)
    if processes < 1:
        raise ConfigError(f"index.processes={processes}: must be >= 1")
    rank_device(device, processes - 1, processes)  # fail here, in the parent, on a bad device request
    return spawn_extraction(model, collection, Path(work_dir), processes=processes, device=device,
                            load_embeddings=load_embeddings, **options)


def run_rank(me: Rank, model: nn.Module, collection: Collection, work: Path, *, device: str, init_method: str,
             gather: bool, batch_size: int, num_workers: int, shard_size: int, channels_last: bool, bf16: bool,
             resume: bool, progress: bool, load_embeddings: bool = True) -> Extraction | None:
    """One rank's part: agree on the shards to do, extract this rank's, wait for all, gather on rank 0."""
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=init_method, rank=me.rank, world_size=me.world)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    try:
        num_shards = shard_count(len(collection), shard_size)
        todo = _agree_on_shards(me, model, collection, work, shard_size=shard_size, batch_size=batch_size,
                                bf16=bf16, resume=resume, num_shards=num_shards, group=group)
        mine = todo[me.rank::me.world]
        failure, error = None, None
        try:
            if mine:
                images = images_in_shards(mine, len(collection), shard_size)
                _extract_shards(model, collection, work, mine, batch_size=batch_size, num_workers=num_workers,
                                shard_size=shard_size, device=device, channels_last=channels_last, bf16=bf16,
                                progress=progress and me.rank == 0, done_images=0, total=images,
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
            return _gather(work, collection, num_shards, load_embeddings)
        return None
    finally:
        if owns_group:
            dist.destroy_process_group()


def _agree_on_shards(me: Rank, model: nn.Module, collection: Collection, work: Path, *, shard_size: int,
                     batch_size: int, bf16: bool, resume: bool, num_shards: int, group) -> list[int]:
    """Rank 0 prepares the work folder (manifest written once) and lists the unfinished shards; every rank
    gets that list, or rank 0's error."""
    message: list = [None]
    if me.rank == 0:
        try:
            manifest = extraction_manifest(model, collection, shard_size=shard_size, batch_size=batch_size, bf16=bf16)
            _prepare_work_dir(work, manifest, resume)
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
def spawn_extraction(model: nn.Module, collection: Collection, work: Path, *, processes: int, device: str | None,
                     load_embeddings: bool = True, **options) -> Extraction:
    """Spawn ``processes`` ranks (each with its share of the CPU threads), wait, and gather their shards."""
    from torch.multiprocessing.spawn import ProcessException

    threads = max(1, (os.cpu_count() or 1) // processes)
    rendezvous = Path(tempfile.mkdtemp(prefix="cbir-extract-"))
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_spawned_rank, nprocs=processes, join=True,
                 args=(processes, str(rendezvous / "store"), threads, model, collection, work, device, options, errors))
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
    num_shards = shard_count(len(collection), options["shard_size"])
    return _gather(work, collection, num_shards, load_embeddings)


def _spawned_rank(rank: int, world: int, store: str, threads: int, model: nn.Module, collection: Collection,
                  work: Path, device: str | None, options: dict, errors) -> None:
    torch.set_num_threads(threads)
    try:
        run_rank(Rank(rank, world, rank), model, collection, work, device=rank_device(device, rank, world),
                 init_method=f"file://{store}", gather=False, **options)
    except Exception as exc:
        errors.put((rank, type(exc), str(exc)))
        raise
