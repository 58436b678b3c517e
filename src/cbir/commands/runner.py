"""How every command starts: arguments → config → task, and a user mistake → one line and a non-zero exit.

``train.py``, ``eval.py``, ``export.py`` and ``cbir train|eval|export`` go through :func:`run_hydra`: it checks the
command-line overrides first (so an unknown key or option is one clear line, not Hydra's multi-line
report), then hands over to ``@hydra.main`` (so multirun, sweepers and output folders work as usual),
and turns a :class:`CbirError` or a missing config value raised by the job into one line on stderr and
a non-zero exit.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cbir.commands.args import exit_with_error
from cbir.commands.quiet import quiet_known_noise
from cbir.configs import config_dir
from cbir.errors import CbirError, ConfigError

_NO_PRECHECK_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c",
                      "--resolve", "--package", "-p", "--shell-completion", "-sc", "--version",
                      "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                      "--experimental-rerun"}


def describe_config_error(exc: Exception) -> str:
    """Hydra/OmegaConf's multi-line composition errors, as one line that says what to change."""
    text, cause = str(exc), exc.__cause__
    while cause is not None:
        text, cause = text + "\n" + str(cause), cause.__cause__
    if match := re.search(r"Key '([^']+)' is not in struct", text):
        key = match.group(1)
        over = re.search(r"Could not override '([^']+)'", text)
        full = over.group(1) if over else key
        return f"unknown config key '{full}' (check the spelling, or write +{full}=... to add a new key)"
    if match := re.search(r"Could not find '([^']+)'", text):
        group, _, option = match.group(1).rpartition("/")
        listing = re.search(r"Available options in '[^']*':\n((?:\t\S+\n?)+)", text)
        options = listing.group(1).split() if listing else []
        choices = f"; choose from: {', '.join(options)}" if options else ""
        return f"unknown option '{option}' for config group '{group}'{choices}"
    if match := re.search(r"Missing mandatory value: (\S+)", text):
        return f"config value {match.group(1)} is required (set it on the command line: {match.group(1)}=...)"
    return " ".join(str(exc).split())


def check_overrides(config_name: str, overrides: Sequence[str]) -> None:
    """Compose the config with ``overrides`` and raise ConfigError on any composition problem."""
    compose_container(config_name, overrides)


def compose_container(config_name: str, overrides: Sequence[str]) -> dict:
    """The config composed with ``overrides``, unresolved, as plain containers (outside ``@hydra.main``);
    a composition problem is a ConfigError."""
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return OmegaConf.to_container(compose(config_name=config_name, overrides=list(overrides)), resolve=False)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
        raise ConfigError(describe_config_error(exc)) from None


def has_hydra_flags(argv: Sequence[str]) -> bool:
    """Hydra's own flags (multirun, --cfg, ...) are not overrides to check or rewrite."""
    return any(a in _NO_PRECHECK_FLAGS or a.startswith(("hydra/", "--")) for a in argv)


def run_hydra(config_name: str, task: Callable[[DictConfig], Any], argv: Sequence[str] | None = None) -> Any:
    """Run ``task`` under ``@hydra.main`` with ``argv`` (default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_noise()
    try:
        if not has_hydra_flags(argv):
            check_overrides(config_name, argv)
        conf = config_dir()
    except CbirError as exc:
        exit_with_error(exc)

    @hydra.main(config_path=str(conf), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except CbirError as exc:
            exit_with_error(exc)
        except InstantiationException as exc:
            # hydra.utils.instantiate wraps what the target raised; a CbirError inside is the user's error
            cause = _cbir_cause(exc)
            if cause is None and os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            exit_with_error(cause or ConfigError(describe_config_error(exc) +
                                                 " (HYDRA_FULL_ERROR=1 shows the traceback)"))
        except OmegaConfBaseException as exc:
            exit_with_error(ConfigError(describe_config_error(exc)))

    saved_argv = sys.argv
    sys.argv = [saved_argv[0], *argv]
    try:
        return _main()
    finally:
        sys.argv = saved_argv


def _cbir_cause(exc: BaseException) -> CbirError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CbirError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
