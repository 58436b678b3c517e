"""Mid-epoch checkpoints, so that a crash in a long epoch loses minutes, not the epoch."""

from __future__ import annotations

from pytorch_lightning.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """Refreshes ``last.ckpt`` in ``dirpath`` every ``every_n_train_steps`` training steps; 0 turns it off
    entirely (a plain ``ModelCheckpoint`` would still write ``last.ckpt`` when training ends).

    The checkpoint holds the training DataLoader's position, so resuming from it (``ckpt_path=...``)
    continues the epoch at the next batch (:class:`cbir.data.datamodule.ResumableDataLoader`). It shares
    ``last.ckpt`` with the epoch-end ``ModelCheckpoint`` (which must not version its name either), so
    ``ckpt_path=last`` resumes from whichever was written last."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0) -> None:
        every_n_train_steps = int(every_n_train_steps or 0)
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0,
                         save_last=every_n_train_steps > 0, enable_version_counter=False)
