"""Third-party messages that tell a cbir user nothing, filtered at the entry points (train/eval/export).

Each is matched by its own text, so anything else those libraries say still gets through:
- Lightning's adverts for its cloud logger and model registry at every start;
- Lightning's own ``LeafSpec`` deprecation (raised inside Lightning, nothing a user can change);
- "multiple ModelCheckpoint callbacks" at test time: cbir's ``last_checkpoint`` is a second ModelCheckpoint
  on purpose, and the best checkpoint is the first one's, which is what Lightning uses;
- "Found N module(s) in eval mode at the start of training": frozen trunk stages (``train.tune``, the
  default ``auto`` included) keep their BatchNorm statistics by staying in eval mode, on purpose; the run's
  first line says which stages are frozen.
"""

from __future__ import annotations

import logging
import warnings

NOISY_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r".*is called with Trainer configured with multiple `ModelCheckpoint` callbacks",
    r"Found \d+ module\(s\) in eval mode at the start of training",
)
NOISY_LOG_PREFIXES = ("💡 Tip: For seamless cloud",)  # logging (litlogger) and uploads (litmodels) adverts
LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                     "lightning.pytorch.utilities.rank_zero")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISY_LOG_PREFIXES)


def quiet_known_noise() -> None:
    """Install the filters (idempotent)."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
