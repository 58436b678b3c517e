"""Experiment tracking: W&B runs that work without an account, one per training job.

The life of a run: :func:`wandb_logger` builds the Lightning logger (offline unless W&B is configured;
checkpoints are uploaded only online); :func:`run_identity` gives it a name and group from the launching
job (a Hydra multirun's jobs share one group) and, when training resumes from a checkpoint, the id of the
W&B run that wrote it; :func:`start_runs` records the resolved config and the run id
(``wandb_id.txt`` in the run folder); :func:`finish_runs` writes the best score into the summary and
finishes the run, so the next job of a multirun opens its own run instead of logging into this one.

Plain arguments only: the Hydra side (which job is running) is read in :mod:`cbir.training.factory`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger

from cbir.io import atomic_write_text

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_id.txt"
NAME_MAX_CHARS = 128
# overrides that say where things are or how they are logged, not what is trained: left out of run names
_NAME_SKIPPED_KEYS = ("hydra", "paths", "logger", "ckpt_path", "hparams_search")
_RUN_FOLDER = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>[A-Za-z0-9]+)$")


def wandb_mode(mode: str = "auto") -> str:
    """``auto`` → ``online`` when the user configured W&B (``WANDB_API_KEY`` or a ``wandb login`` entry in
    ``~/.netrc``), else ``offline``: runs are written locally and can be synced later with ``wandb sync``.
    ``$WANDB_MODE`` wins over the guess (``dryrun``, which Lightning sets for offline runs, is ``offline``)."""
    if mode != "auto":
        return _canonical_mode(mode)
    if os.environ.get("WANDB_MODE"):
        return _canonical_mode(os.environ["WANDB_MODE"])
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def _canonical_mode(mode: str) -> str:
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


def wandb_logger(mode: str = "auto", log_model: bool | str = False, **kwargs) -> WandbLogger:
    """A Lightning ``WandbLogger`` in the mode chosen by :func:`wandb_mode`. ``log_model`` (upload the
    checkpoints as a W&B artifact, the best one tagged ``best``) applies online only: offline there is
    nowhere to upload to, so it is dropped rather than refused."""
    resolved = wandb_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    if kwargs.get("save_dir"):
        Path(kwargs["save_dir"]).mkdir(parents=True, exist_ok=True)
    if resolved == "disabled":
        kwargs["mode"] = "disabled"
    online = resolved == "online"
    logger = WandbLogger(offline=resolved == "offline", log_model=log_model if online else False, **kwargs)
    # Lightning always passes wandb.init(anonymous=None), which wandb >= 0.19 answers at every start with "The
    # anonymous setting has no effect and will be removed": the setting is dead, so it is not passed at all
    init_args = getattr(logger, "_wandb_init", None)
    if isinstance(init_args, dict) and init_args.get("anonymous") is None:
        init_args.pop("anonymous", None)
    return logger


@dataclass(frozen=True)
class JobInfo:
    """What naming a run needs to know about the job that launched it (from Hydra, as plain values)."""

    overrides: Sequence[str] = ()   # the job's command-line (or sweeper-chosen) overrides
    num: int | None = None          # job number within a multirun; None for a single run
    sweep_dir: str | None = None    # the multirun's folder; None for a single run


def default_run_name(job: JobInfo | None) -> str | None:
    """``job3 loss=triplet,head=gem`` for a multirun job, ``loss=triplet,head=gem`` for a single run with
    overrides; None (W&B picks a name) otherwise. Path-valued and logging overrides are left out."""
    if job is None:
        return None
    shown = ",".join(o for o in job.overrides if _names_the_model(o))
    prefix = f"job{job.num}" if job.num is not None else ""
    name = " ".join(part for part in (prefix, shown) if part)
    return name[:NAME_MAX_CHARS] or None


def _names_the_model(override: str) -> bool:
    key, _, value = override.lstrip("+~").partition("=")
    return not (key.split(".")[0].split("/")[0] in _NAME_SKIPPED_KEYS or "/" in value or "\\" in value)


def default_group(job: JobInfo | None) -> str | None:
    """A multirun's jobs share one group, named after its folder (``train/2026-01-31/12-00-00``)."""
    if job is None or not job.sweep_dir:
        return None
    return "/".join(Path(job.sweep_dir).parts[-3:])[-NAME_MAX_CHARS:]


def read_run_id(run_dir: str | Path) -> str | None:
    """The W&B run id a training run folder recorded: its ``wandb_id.txt``, else the newest run W&B
    wrote under ``<run_dir>/wandb`` (``latest-run`` → ``[offline-]run-<date>_<time>-<id>``)."""
    run_dir = Path(run_dir)
    try:
        recorded = (run_dir / RUN_ID_FILE).read_text().strip()
    except OSError:
        recorded = ""
    if recorded:
        return recorded
    latest = run_dir / "wandb" / "latest-run"
    if latest.exists():
        match = _RUN_FOLDER.match(latest.resolve().name)
        if match:
            return match.group("id")
    return None


def write_run_id(run_dir: str | Path, run_id: str) -> Path:
    """Record ``run_id`` in ``<run_dir>/wandb_id.txt`` (temp file + rename)."""
    return atomic_write_text(Path(run_dir) / RUN_ID_FILE, run_id + "\n")


def resumed_run_id(ckpt_path: str | Path | None, run_dir: str | Path) -> str | None:
    """The W&B id of the run that wrote the checkpoint training resumes from: ``ckpt_path=last`` resumes
    in ``run_dir`` itself; a checkpoint file lies in ``<run folder>/checkpoints/`` (or the run folder)."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        candidates = [Path(run_dir)]
    else:
        path = Path(ckpt_path)
        candidates = [path] if path.is_dir() else [path.parent, path.parent.parent]
    for folder in candidates:
        found = read_run_id(folder)
        if found:
            return found
    return None


def run_identity(job: JobInfo | None, *, name: str | None = None, group: str | None = None,
                 run_id: str | None = None, resume: str | None = "allow",
                 ckpt_path: str | Path | None = None, run_dir: str | Path = ".") -> dict[str, Any]:
    """``name``/``group``/``id`` for the W&B run: the configured ones, else the job's defaults, and, when
    resuming from a checkpoint (and ``resume`` is not ``never``), the id of the run that wrote it."""
    if run_id is None and resume != "never":
        run_id = resumed_run_id(ckpt_path, run_dir)
        if run_id:
            log.info("W&B: continuing run %s (recorded next to the resumed checkpoint)", run_id)
    return {"name": name or default_run_name(job), "group": group or default_group(job), "id": run_id}


def best_metric_name(monitor: str) -> str:
    """The run-summary key holding a run's best ``monitor`` value (``val/map_at_r_best``): what W&B sweeps
    optimise (the summary's plain ``monitor`` key holds the last epoch's value, not the best)."""
    return f"{monitor}_best"


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def start_runs(loggers: Iterable[Logger], config: Mapping[str, Any], run_dir: str | Path) -> list[str]:
    """Log the whole resolved ``config`` as every logger's hyperparameters (CSV ``hparams.yaml``, TensorBoard,
    W&B: data, loss, optimiser and schedule, not only the model's settings), and record each W&B run's id in
    ``run_dir`` (so a resumed training finds it). Call on the main process only. Returns the W&B run ids."""
    loggers = list(loggers)
    for logger in loggers:
        logger.log_hyperparams(dict(config))
    ids = []
    for logger in wandb_loggers(loggers):
        run_id = getattr(logger.experiment, "id", None)
        if isinstance(run_id, str) and run_id:
            write_run_id(run_dir, run_id)
            ids.append(run_id)
    return ids


def finish_runs(loggers: Iterable[Logger], summary: Mapping[str, float | None] | None = None,
                failed: bool = False) -> None:
    """Write ``summary`` (finite values only) into each open W&B run and finish it (exit code 1 when the
    job failed). Without this a multirun's next job would log into this job's run."""
    for logger in wandb_loggers(loggers):
        run = getattr(logger, "_experiment", None)  # not .experiment: that would open a run just to close it
        if run is None or not hasattr(run, "finish"):
            continue
        try:
            for key, value in (summary or {}).items():
                if value is not None and math.isfinite(value):
                    run.summary[key] = float(value)
        finally:
            run.finish(exit_code=1 if failed else 0)
