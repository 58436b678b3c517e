"""Offline W&B runs read back from W&B's offline transaction log (``run-<id>.wandb``), without an account."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def _records(path: Path):
    """The records of a ``run-<id>.wandb`` file: a 7-byte header, then LevelDB-log chunks (4-byte CRC,
    2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32 * 1024, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(updates) -> dict:
    return {u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in updates}


def offline_runs(run_dir: Path, wait_s: float = 20.0) -> list[dict]:
    """Every offline W&B run written under ``run_dir/wandb``: id, name, group, exit code (None: not
    finished), config and summary as logged. W&B's service writes the log file after ``finish()`` returns,
    so a run without its exit record is read again for up to ``wait_s`` seconds."""
    runs = []
    for path in sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb")):
        deadline = time.monotonic() + wait_s
        run = _read_run(path)
        while run["exit_code"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
            run = _read_run(path)
        runs.append(run)
    return runs


def _read_run(path: Path) -> dict:
    run = {"config": {}, "summary": {}, "exit_code": None, "path": path}
    try:
        records = list(_records(path))
    except Exception:  # noqa: BLE001 - a record half written: read again
        records = []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, name=record.run.display_name, group=record.run.run_group)
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run
