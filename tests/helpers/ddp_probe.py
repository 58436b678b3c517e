"""Callbacks the DDP and resume tests add to ``train.py`` runs
(``+callbacks.probe._target_=helpers.ddp_probe.RankProbe``, with ``tests/`` on PYTHONPATH): each rank records
what it trained on and what it ended with, so a test can compare ranks (and runs) from outside the processes;
``CrashAt`` simulates a crash mid-training."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


class RankProbe(pl.Callback):
    """Writes ``{out}/rank{R}.pt``: the training batches' record indices (epoch, batch_idx, indices), the
    logged step losses, the module's state (weights, loss parameters and buffers) at the start and end of
    fitting."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.batches: list[tuple[int, int, list[int]]] = []
        self.losses: list[float] = []
        self.start_state: dict[str, torch.Tensor] = {}

    @staticmethod
    def _state(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone().contiguous() for k, v in pl_module.state_dict().items()}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_state = self._state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((trainer.current_epoch, batch_idx, batch["index"].tolist()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size, "batches": self.batches,
                    "losses": self.losses, "start_state": self.start_state, "end_state": self._state(pl_module)},
                   self.out / f"rank{trainer.global_rank}.pt")


class CrashAt(pl.Callback):
    """Simulates a crash: raises before training step ``step`` (a global step count) begins."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash before step {self.step}")
