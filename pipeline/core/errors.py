"""Exception types that map a failed run to the exit codes the README names (2 usage, 3 error rate, 1 other)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ImgfeatError(Exception):
    """A per-run failure: the run stops and the command exits non-zero."""

    exit_code = 1


class ConfigError(ImgfeatError):
    """Bad usage or configuration (exit 2): the message names the bad value."""

    exit_code = 2


class LockBusyError(ImgfeatError):
    """Another writer holds the lock on the same featureset or workspace stage."""

    exit_code = 1


class ErrorRateExceeded(ImgfeatError):
    """The run finished and wrote everything, but too many images ended as errors."""

    exit_code = 3


def unknown_value(kind: str, value: str, allowed: Iterable[str], hint: str = "") -> ConfigError:
    """Build the standard 'unknown X; did you mean Y? (allowed: ...)' error."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(value, allowed, n=1)
    msg = f"unknown {kind} {value!r}"
    if close:
        msg += f"; did you mean {close[0]!r}?"
    if hint:
        msg += f" ({hint})"
    elif len(allowed) <= 12:
        msg += f" (allowed: {', '.join(allowed)})"
    return ConfigError(msg)
