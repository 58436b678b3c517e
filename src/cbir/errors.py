"""User-facing errors.

Every mistake a user can make (missing file, unreadable image, wrong config key, missing weights) raises a
subclass of :class:`CbirError` whose message names the thing and the fix. Entry points print the message
on one line, without a traceback, and exit non-zero.
"""


class CbirError(Exception):
    """Base class of all errors caused by user input or the environment, not by a bug."""

    exit_code = 2


class ConfigError(CbirError):
    """A configuration value or override is invalid."""


class DataError(CbirError):
    """A dataset is missing, malformed or inconsistent."""


class BadImageError(DataError):
    """An image file cannot be read or decoded."""


class WeightsUnavailableError(CbirError):
    """Pretrained weights are not cached and cannot be downloaded."""


class CheckpointError(CbirError):
    """A checkpoint is missing or does not match the requested model."""
