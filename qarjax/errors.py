"""User-facing errors: one line that names the problem, a non-zero exit, no traceback.

Library code raises `QarjaxError` (or a subclass) for anything a user can fix: a bad config
value, a missing or corrupt file, a NaN loss. The CLI prints `qarjax: error: <message>` and
exits with status 2; notebooks see an ordinary exception.
"""


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
    """`value`'s repr, cut to `limit` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
