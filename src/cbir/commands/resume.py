"""What ``train.py ckpt_path=<a run's checkpoint> ...`` means: continue *that* run.

A checkpoint holds weights and optimiser state, not the data and model they belong to; those live in the
run folder (Hydra's ``.hydra/overrides.yaml``, the command line the run was started with). Resuming
recomposes the config from the run's own overrides with the new command line's on top (``trainer.max_epochs=20``
extends the run), and refuses — one line naming both — when that would train the weights on other data or
with another model, unless ``resume.allow_changes=true`` says it is meant (e.g. fine-tuning a finished run
on new data).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from cbir.errors import ConfigError

CHECKED_SECTIONS = ("data", "model")


def override_key(override: str) -> str:
    """``+a.b=1`` → ``a.b``; ``data=emoji`` → ``data``."""
    return override.split("=", 1)[0].lstrip("+~")


def run_folder_overrides(ckpt_path: str, argv: Sequence[str]) -> tuple[Path, list[str]] | None:
    """The run folder a checkpoint belongs to and its command-line overrides (``<run>/.hydra/overrides.yaml``);
    None when the checkpoint is not inside a run folder that recorded them. ``ckpt_path=last`` names the run
    folder through ``hydra.run.dir=...``."""
    if ckpt_path == "last":
        run_dirs = [o.split("=", 1)[1] for o in argv if o.startswith("hydra.run.dir=")]
        run = Path(run_dirs[-1]) if run_dirs else None
    else:
        checkpoint = Path(ckpt_path)
        run = checkpoint.resolve().parent.parent if checkpoint.parent.name == "checkpoints" else None
    recorded = run / ".hydra" / "overrides.yaml" if run is not None else None
    if recorded is None or not recorded.is_file():
        return None
    overrides = yaml.safe_load(recorded.read_text()) or []
    return run, [str(o) for o in overrides if override_key(str(o)) != "ckpt_path"]


def merge_overrides(run: Sequence[str], new: Sequence[str]) -> list[str]:
    """The run's overrides, each replaced by the new command line's override of the same key, then the rest of
    the new ones."""
    new_keys = {override_key(o) for o in new}
    return [o for o in run if override_key(o) not in new_keys] + list(new)


def resumed_argv(argv: Sequence[str], compose) -> list[str]:
    """``argv`` for a resumed run (unchanged when it resumes nothing, or from outside a run folder).
    ``compose(overrides)`` composes the train config (unresolved); it is given so this module does not start
    Hydra itself."""
    argv = list(argv)
    ckpt = next((o.split("=", 1)[1] for o in reversed(argv) if override_key(o) == "ckpt_path" and "=" in o), None)
    if ckpt in (None, "", "null"):
        return argv
    found = run_folder_overrides(ckpt, argv)
    if found is None:
        return argv
    run, run_overrides = found
    merged = merge_overrides(run_overrides, argv)
    allow = _allows_changes(merged)
    before, after = compose(run_overrides), compose(merged)
    changed = [section for section in CHECKED_SECTIONS if before.get(section) != after.get(section)]
    if changed and not allow:
        details = "; ".join(_describe_change(section, before.get(section), after.get(section)) for section in changed)
        raise ConfigError(f"ckpt_path={ckpt}: this command line would continue run {run} with other "
                          f"{' and '.join(changed)} than it was trained with ({details}). Drop those overrides to "
                          "resume the run as it was, or add resume.allow_changes=true to train the checkpoint on purpose")
    mine = [o for o in merged if o in run_overrides and o not in argv]
    if mine:
        print(f"resuming run {run}: its settings {' '.join(mine)} + this command line's", file=sys.stderr)
    return merged


def _allows_changes(overrides: Sequence[str]) -> bool:
    values = [o.split("=", 1)[1] for o in overrides if override_key(o) == "resume.allow_changes" and "=" in o]
    return bool(values) and values[-1].strip().lower() in ("true", "1", "yes")


def _describe_change(section: str, before, after) -> str:
    """The first few keys that differ: ``data.name: folder → fashion_mnist``."""
    before, after = before or {}, after or {}
    if not isinstance(before, dict) or not isinstance(after, dict):
        return f"{section}: {before} → {after}"
    keys = [k for k in sorted(set(before) | set(after), key=lambda k: (k != "name" and k != "backbone", k))
            if before.get(k) != after.get(k)]
    shown = ", ".join(f"{section}.{k}: {before.get(k)} → {after.get(k)}" for k in keys[:3])
    return shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
