"""User-facing errors: one line that names the problem, a non-zero exit, no traceback.

Library code raises `QarjaxError` (or a subclass) for anything a user can fix: a bad config
value, a missing or corrupt file, a NaN loss. The CLI prints `qarjax: error: <message>` and
exits with status 2; notebooks see an ordinary exception.
"""

import math

import numpy as np


class QarjaxError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ConfigError(QarjaxError):
    """A config value is out of range, unknown or inconsistent."""


class DataError(QarjaxError):
    """A dataset path is missing, empty or holds a file that cannot be decoded."""


class NonFiniteLossError(QarjaxError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class ArtifactError(QarjaxError):
    """A compressed-model file is truncated, altered, or does not match the config."""


def check(condition: bool, message: str, kind: type[QarjaxError] = ConfigError) -> None:
    """Raises `kind(message)` unless `condition` holds."""
    if not condition:
        raise kind(message)


def short(value, limit: int = 60) -> str:
    """`value`'s repr on one line, cut to `limit` characters for a one-line message."""
    text = " ".join(repr(value)[: 4 * limit].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_number(v) -> bool:
    """A finite int or float (not a bool; numpy scalars included)."""
    kinds = int | float | np.integer | np.floating
    return isinstance(v, kinds) and not isinstance(v, bool | np.bool_) and math.isfinite(v)


def is_whole(v) -> bool:
    """An int (not a bool)."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def check_range(what: str, value, lo, hi, *, integer: bool = False) -> None:
    """`value` a number in [lo, hi] (finite: an infinite `hi` is open), a whole one if
    `integer`; anything else is one ConfigError naming `what`."""
    number = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool
    )
    if integer and not (number and float(value).is_integer()):
        raise ConfigError(f"{what} must be in [{lo}, {hi}], got {short(value)} (a whole number)")
    if not (number and math.isfinite(value) and lo <= value <= hi):
        raise ConfigError(f"{what} must be in [{lo}, {hi}], got {short(value)} (finite)")
