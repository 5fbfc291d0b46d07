"""What every stage result shares: the JSON value types, `to_json`/`from_json` for frozen result dataclasses,
and typed reads of a JSON object's values (``json_str(meta, "name")``)."""

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


# Typed reads of one key of a JSON object our own code wrote (a meta file, a run record): the value
# as its type, a missing key a KeyError as with obj[key], a value of another type a TypeError.


def _wrong(key: str, want: str, value: object) -> TypeError:
    return TypeError(f"{key!r} holds {type(value).__name__} {value!r:.60}, expected {want}")


def json_str(obj: Mapping[str, JsonValue], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _wrong(key, "a string", value)
    return value


def json_int(obj: Mapping[str, JsonValue], key: str) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong(key, "an integer", value)
    return value


def json_number(obj: Mapping[str, JsonValue], key: str) -> float:
    """An int or a float, as it is (a float annotation takes an int)."""
    value = obj[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _wrong(key, "a number", value)
    return value


def json_list(obj: Mapping[str, JsonValue], key: str) -> list[JsonValue]:
    value = obj[key]
    if not isinstance(value, list):
        raise _wrong(key, "a list", value)
    return value


def json_object(obj: Mapping[str, JsonValue], key: str) -> JsonObject:
    value = obj[key]
    if not isinstance(value, dict):
        raise _wrong(key, "an object", value)
    return value


def json_numbers(obj: Mapping[str, JsonValue], key: str) -> list[float]:
    """A list of numbers (the same list object)."""
    value = json_list(obj, key)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _wrong(key, "a list of numbers", value)
    return cast("list[float]", value)  # checked item by item just above
