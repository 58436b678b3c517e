"""Command-line arguments without Hydra: ``key=value`` overrides over a shipped config, presets named by
group option, and one-line errors. Imported by every command, so it stays light (OmegaConf only)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cbir.configs import config_dir
from cbir.errors import CbirError, ConfigError


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line. Errors re-raised by DataLoader workers carry the worker's
    traceback in their message; keep only the original error's own line."""
    message = str(exc).strip()
    if "Original Traceback" in message:
        last = message.splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(message.split())


def exit_with_error(exc: CbirError) -> None:
    print(f"error: {one_line(exc)}", file=sys.stderr)
    raise SystemExit(exc.exit_code)


def key_value_config(config_name: str, argv: Sequence[str], command: str,
                     aliases: dict[str, str] | None = None, base: DictConfig | None = None) -> DictConfig:
    """``conf/<config_name>.yaml`` (or ``base``) with ``key=value`` overrides applied (``--key=value`` also
    works; ``aliases`` maps flags such as ``--json`` to ``json=true``): the same ``key=value`` overrides as
    the Hydra commands, for the commands that must start fast and write no output folder (search, serve,
    index), and where ``index=<path>`` must stay a path rather than name a config group. Unknown keys are
    a ConfigError."""
    from omegaconf import OmegaConf

    base = base if base is not None else OmegaConf.load(config_dir() / f"{config_name}.yaml")
    known = list(base.keys())  # not `in base`: OmegaConf says a ??? (missing) key is not in it
    items = []
    for arg in argv:
        arg = (aliases or {}).get(arg, arg)
        arg = arg.removeprefix("--")
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


def guarded(main: Callable[[Sequence[str]], int], usage: str | None = None) -> Callable[[Sequence[str]], int]:
    """A ``main(argv)`` that prints ``usage`` for -h/--help and turns a CbirError into one line on stderr."""
    def run(argv: Sequence[str]) -> int:
        import logging

        if usage and any(a in ("-h", "--help") for a in argv):
            print(usage)
            return 0
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        try:
            return main(argv) or 0
        except CbirError as exc:
            exit_with_error(exc)
        return 0

    return run
