"""Checkpoints are written whole (atomically) with a SHA-256 beside them, and a changed file is refused."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import compose_config, tiny_train_overrides

from cbir.commands.train import train
from cbir.errors import CheckpointError
from cbir.models.checkpoint import load_checkpoint_model, sidecar, verify_checkpoint
from cbir.training.checkpoint_io import VerifiedCheckpointIO


def test_save_writes_a_checksum_and_a_flipped_byte_is_refused(tmp_path):
    path = tmp_path / "last.ckpt"
    VerifiedCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)
    assert sidecar(path).read_text().split()[1] == "last.ckpt"
    verify_checkpoint(path)  # as saved: fine
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify_checkpoint(path)
    VerifiedCheckpointIO().remove_checkpoint(path)
    assert not path.exists() and not sidecar(path).exists()


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = VerifiedCheckpointIO()
    io.save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def crash(obj, target):  # the process dies half-way through writing
        open(target, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


def test_training_checkpoints_carry_checksums_that_loading_checks(tiny_folder, tmp_path):
    cfg = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path) + [
        "model=resnet18", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "test_after_fit=false",
        "callbacks.retrieval_examples=null", "callbacks.embedding_map=null"])
    train(cfg)
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert checkpoints and all(sidecar(c).is_file() for c in checkpoints)
    best = next(c for c in checkpoints if c.name.startswith("best-"))
    load_checkpoint_model(best)
    with open(best, "r+b") as handle:  # one flipped bit near the end (weights)
        handle.seek(-100, 2)
        byte = handle.read(1)
        handle.seek(-100, 2)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint_model(best)
