"""``cbir data fetch fashion_mnist|emoji|icons [root=DIR]``: check for, or download, a benchmark dataset and
print what it holds."""

from __future__ import annotations

from collections.abc import Sequence

from cbir.commands.args import guarded
from cbir.errors import ConfigError

DATASETS = ("fashion_mnist", "emoji", "icons")
USAGE = "usage: cbir data fetch fashion_mnist|emoji|icons [root=DIR]"


def _main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[0] != "fetch" or argv[1] not in DATASETS:
        raise ConfigError(f"cbir data: {USAGE.removeprefix('usage: ')}")
    options = dict(arg.removeprefix("--").split("=", 1) for arg in argv[2:] if "=" in arg)
    unknown = [arg for arg in argv[2:] if "=" not in arg] + sorted(set(options) - {"root"})
    if unknown:
        raise ConfigError(f"cbir data fetch: unknown argument {unknown[0]!r}; {USAGE}")
    root = options.get("root")
    if argv[1] == "emoji":
        from cbir.data.readers.emoji import DEFAULT_ROOT, read_emoji

        print(read_emoji(root or DEFAULT_ROOT).summary())
    elif argv[1] == "icons":
        from cbir.data.readers.icons import DEFAULT_ROOT, read_icons

        print(read_icons(root or DEFAULT_ROOT).summary())
    else:
        from cbir.data.readers.fashion_mnist import read_fashion_mnist

        print(read_fashion_mnist(root).summary())
    return 0


main = guarded(_main, USAGE)
