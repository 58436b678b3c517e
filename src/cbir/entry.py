"""Hydra entry points with one-line errors.

``train.py``, ``eval.py`` and ``cbir train|eval`` all go through :func:`run_hydra`: it checks the
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
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cbir.errors import CbirError, ConfigError

_NO_PRECHECK_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c",
                      "--resolve", "--package", "-p", "--shell-completion", "-sc", "--version",
                      "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                      "--experimental-rerun"}


def config_dir() -> Path:
    """``$CBIR_CONFIG_DIR``, else the repository's ``conf/`` (src layout), else ``./conf``."""
    candidates = [Path(os.environ["CBIR_CONFIG_DIR"])] if os.environ.get("CBIR_CONFIG_DIR") else []
    candidates += [Path(__file__).resolve().parents[2] / "conf", Path.cwd() / "conf"]
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return candidate.resolve()
    raise ConfigError("cannot find the cbir config folder (conf/ with train.yaml); set CBIR_CONFIG_DIR")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line. Errors re-raised by DataLoader workers carry the worker's
    traceback in their message; keep only the original error's own line."""
    message = str(exc).strip()
    if "Original Traceback" in message:
        last = message.splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(message.split())


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
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
        raise ConfigError(describe_config_error(exc)) from None


def run_hydra(config_name: str, task: Callable[[DictConfig], Any], argv: Sequence[str] | None = None) -> Any:
    """Run ``task`` under ``@hydra.main`` with ``argv`` (default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not any(a in _NO_PRECHECK_FLAGS or a.startswith(("hydra/", "--")) for a in argv):
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


def exit_with_error(exc: CbirError) -> None:
    print(f"error: {one_line(exc)}", file=sys.stderr)
    raise SystemExit(exc.exit_code)


def key_value_config(config_name: str, argv: Sequence[str], command: str,
                     aliases: dict[str, str] | None = None) -> DictConfig:
    """``conf/<config_name>.yaml`` with plain ``key=value`` arguments applied (``--key=value`` also works;
    ``aliases`` maps flags such as ``--json`` to ``json=true``): for the entry points that are not Hydra apps
    (search, serve), which must start fast and write no output folder. Unknown keys are a ConfigError."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(config_dir() / f"{config_name}.yaml")
    known = list(base.keys())  # not `in base`: OmegaConf says a ??? (missing) key is not in it
    items = []
    for arg in argv:
        arg = (aliases or {}).get(arg, arg)
        arg = arg[2:] if arg.startswith("--") else arg
        if "=" not in arg:
            raise ConfigError(f"argument '{arg}': write key=value; keys: {', '.join(known)}")
        items.append(arg)
    try:
        given = OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse arguments: {' '.join(str(exc).split())}") from None
    unknown = [key for key in given.keys() if key not in known]
    if unknown:
        raise ConfigError(f"unknown {command} option '{unknown[0]}'; choose from: {', '.join(known)}")
    return OmegaConf.merge(base, given)
