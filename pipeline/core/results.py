"""What every stage result shares: the JSON value types, `to_json`/`from_json` for frozen result dataclasses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeAlias, cast

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# A value `json.dumps` writes and `json.loads` gives back: what `--json` and runs/<id>.json hold.
JsonValue: TypeAlias = "str | int | float | bool | list[JsonValue] | dict[str, JsonValue] | None"
JsonObject: TypeAlias = "dict[str, JsonValue]"


class Result(Protocol):
    """A stage's outcome: ``to_json()`` is its ``--json`` object (and its part of runs/<id>.json)."""

    def to_json(self) -> JsonObject: ...


class JsonResult:
    """Mixin for a frozen result dataclass whose JSON object holds each field under its own name.

    ``to_json`` is the fields (a subclass may add derived keys or leave some out); ``from_json``
    takes every field it finds back from its key (a field left out takes its default), ignoring
    derived keys, so ``from_json(to_json())`` is the same result.
    """

    def to_json(self) -> JsonObject:
        return asdict(cast("DataclassInstance", self))  # the mixin's self is the dataclass that inherits it

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Self:
        names = [f.name for f in fields(cast("type[DataclassInstance]", cls)) if f.init]
        return cls(**{name: obj[name] for name in names if name in obj})
