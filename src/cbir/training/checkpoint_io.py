"""Checkpoint files that are whole and unmodified, or refused.

Lightning writes a ``.ckpt`` straight to its final name: a kill during the save left a truncated
``last.ckpt``, and nothing noticed a file changed afterwards (a bit flip loads and quietly changes results).
:class:`VerifiedCheckpointIO` writes each checkpoint through :func:`cbir.io.atomic_path` (the old file stays
until the new one is complete) and a ``<name>.sha256`` beside it; :func:`cbir.models.checkpoint.verify_checkpoint` checks it before
a checkpoint is resumed, evaluated or exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from cbir.io import atomic_path, atomic_write_text, sha256_file
from cbir.models.checkpoint import sidecar


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, writing atomically and with a SHA-256 sidecar."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        with atomic_path(path) as temporary:
            torch.save(checkpoint, temporary)
        atomic_write_text(sidecar(path), f"{sha256_file(path)}  {path.name}\n")

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        sidecar(path).unlink(missing_ok=True)
