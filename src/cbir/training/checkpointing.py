"""``last.ckpt``: the checkpoint ``ckpt_path=last`` resumes from, always the newest training state."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` in ``dirpath`` at the end of every epoch (or every validation) and, with
    ``every_n_train_steps=N``, every N training steps, so a crash in a long epoch loses minutes, not the
    epoch.

    Not ``ModelCheckpoint(save_last=True)``: since Lightning 2.x that refreshes ``last.ckpt`` only in
    epochs that also saved a new best checkpoint, so after an epoch that did not improve,
    ``ckpt_path=last`` would resume from an older epoch. The checkpoint holds the training DataLoader's
    position, so resuming from a mid-epoch one continues the epoch at the next batch
    (:class:`cbir.data.datamodule.ResumableDataLoader`)."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0) -> None:
        every_n_train_steps = int(every_n_train_steps or 0)
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0,
                         save_last=True, enable_version_counter=False)

    # when ModelCheckpoint saves an epoch's checkpoint: at the training epoch's end (validation has run by
    # then; also the only moment when there is no validation), or at each validation end when validation
    # runs several times per epoch or every few epochs
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_save_on_train_epoch_end(trainer):
            self._save_newest(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_newest(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Ctrl-C (SIGINT) or SIGTERM (a scheduler's kill, ``timeout``): save the state reached so far, so the run
        resumes from here instead of from the last epoch's end. Errors are not saved over a good checkpoint."""
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking or trainer.fast_dev_run or self.dirpath is None:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        self.interrupted_checkpoint = str(path)

    def _save_newest(self, trainer: pl.Trainer) -> None:
        """Always, unlike ModelCheckpoint's own check, which also skips a step a step checkpoint just saved:
        the epoch-end state (epoch finished, validation metrics) is the newer one."""
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
