"""Experiment tracking helpers: W&B that works without an account."""

from __future__ import annotations

import os
from pathlib import Path

from pytorch_lightning.loggers import WandbLogger


def wandb_mode(mode: str = "auto") -> str:
    """``auto`` → ``online`` when the user configured W&B (``WANDB_API_KEY`` or a ``wandb login`` entry in
    ``~/.netrc``), else ``offline``: runs are written locally and can be synced later with ``wandb sync``."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def wandb_logger(mode: str = "auto", **kwargs) -> WandbLogger:
    """A Lightning ``WandbLogger`` in the mode chosen by :func:`wandb_mode`."""
    resolved = wandb_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    if kwargs.get("save_dir"):
        Path(kwargs["save_dir"]).mkdir(parents=True, exist_ok=True)
    if resolved == "disabled":
        kwargs["mode"] = "disabled"
    return WandbLogger(offline=resolved == "offline", **kwargs)
