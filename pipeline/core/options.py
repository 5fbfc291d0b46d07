"""Each stage option's help, flag and choices, kept on its config dataclass field (``opt``).

A stage config's field is the one place an option's default lives; ``opt`` adds what the command
line says about it, so ``jobs/`` derives every flag (name, type, default, help, choices) from the
config instead of declaring it again. A field made with plain ``dataclasses.field`` or a bare
default is no flag (set by job files or the API only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import MISSING
from typing import Any

HELP, FLAG, METAVAR, CHOICES, SHORT = "help", "flag", "metavar", "choices", "short"


def opt(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    short: str | None = None,
) -> Any:
    """A config field that is also a flag: ``flag`` defaults to ``--<name-with-dashes>``;
    ``choices`` are checked by the parser (exit 2); no ``default``: the flag is required."""
    meta = {HELP: help, FLAG: flag, METAVAR: metavar, CHOICES: tuple(choices) if choices else None, SHORT: short}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Option:
    """What the command line needs to know about one config field."""

    name: str  # the field
    flag: str  # --batch-size
    default: Any  # MISSING: required
    help: str
    metavar: str | None
    choices: tuple[str, ...] | None
    short: str | None
    is_bool: bool

    @property
    def dest(self) -> str:
        """The argparse attribute: the flag's name, as argparse derives it."""
        return self.flag.lstrip("-").replace("-", "_")


def options(config: type) -> dict[str, Option]:
    """The flag options of a config dataclass (fields made with ``opt``), by field name, in order."""
    out = {}
    for f in dataclasses.fields(config):
        meta = f.metadata
        if HELP not in meta:
            continue
        out[f.name] = Option(
            name=f.name,
            flag=meta[FLAG] or "--" + f.name.replace("_", "-"),
            default=f.default,
            help=meta[HELP],
            metavar=meta[METAVAR],
            choices=meta[CHOICES],
            short=meta[SHORT],
            is_bool=f.default is False,
        )
    return out
