"""The configs shipped inside the package (``cbir/conf``), found without Hydra.

Entry points compose them with Hydra (:mod:`cbir.commands.runner`); library code that needs one group
option at run time (a data config behind a collection spec, a query preset) reads it here with OmegaConf
alone, so the search and serving path never imports Hydra. ``$CBIR_CONFIG_DIR`` replaces the shipped
folder; a user's extra config folder is added with Hydra's ``hydra.searchpath=[file:///path/to/conf]``.
"""

from __future__ import annotations

import functools
import importlib
import os
from importlib import resources
from pathlib import Path

from cbir.errors import ConfigError


def config_dir() -> Path:
    """``$CBIR_CONFIG_DIR`` when set, else the package's own ``cbir/conf``."""
    override = os.environ.get("CBIR_CONFIG_DIR")
    folder = Path(override) if override else Path(str(resources.files("cbir") / "conf"))
    if not (folder / "train.yaml").is_file():
        where = f"CBIR_CONFIG_DIR={override}" if override else f"the installed package ({folder})"
        raise ConfigError(f"cannot find the cbir configs (train.yaml) in {where}; "
                          + ("point it at a folder holding train.yaml" if override else "reinstall cbir"))
    return folder.resolve()


def group_options(group: str, folder: str | os.PathLike | None = None) -> list[str]:
    """The option names of a config group (``data`` → cub200, emoji, ...)."""
    return sorted(p.stem for p in (Path(folder or config_dir()) / group).glob("*.yaml"))


def load_option(group: str, name: str, what: str | None = None, folder: str | os.PathLike | None = None):
    """``conf/<group>/<name>.yaml`` (of ``folder``, default the shipped configs) as an OmegaConf node; an
    unknown name is a ConfigError listing the options (``what`` names the setting, default ``group=name``)."""
    from omegaconf import OmegaConf

    path = Path(folder or config_dir()) / group / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise ConfigError(f"{what or f'{group}={name}'}: no such option; choose from: "
                          f"{', '.join(group_options(group, folder))}")
    return OmegaConf.load(path)


def instantiate(spec: dict, *args, **kwargs):
    """A plain dict with a ``_target_`` (and ``_partial_``) → the object, like ``hydra.utils.instantiate``
    for the flat specs the configs store (heads, readers), without importing Hydra."""
    spec = dict(spec)
    target = spec.pop("_target_", None)
    partial = bool(spec.pop("_partial_", False))
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"config {spec}: _target_ must name a callable as module.name, got {target!r}")
    module_name, _, attribute = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        raise ConfigError(f"config _target_ {target}: no such callable") from None
    spec.update(kwargs)
    return functools.partial(factory, *args, **spec) if partial else factory(*args, **spec)


def preset(group: str, name_or_spec):
    """A config group option named on the command line (``preprocess=clahe``) as a plain spec; a dict or
    list is a spec as it is; None stays None."""
    from omegaconf import OmegaConf

    if name_or_spec is None:
        return None
    if isinstance(name_or_spec, str):
        return OmegaConf.to_container(load_option(group, name_or_spec), resolve=True)
    return OmegaConf.to_container(name_or_spec, resolve=True) if OmegaConf.is_config(name_or_spec) else name_or_spec
