"""Names people use: ``name -> versions`` (latest last) for heads and featuresets, in ``names/<kind>.json``."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Collection, Iterable
from pathlib import Path

from imgfeat.core.errors import ConfigError, ImgfeatError, unknown_value
from imgfeat.core.storage import FileLock, write_json_atomic
from imgfeat.core.workspace import Workspace, check_name

HEADS, FEATURESETS = "heads", "featuresets"
KINDS = (HEADS, FEATURESETS)
PIN = "@"  # photos-logreg@photos-logreg-1a2b3c4d (or @1a2b3c4d) pins one version
ID, RECORDED_AT = "id", "recorded_at"

Versions = dict[str, list[dict[str, str]]]  # name -> [{"id", "recorded_at"}], oldest first


def _singular(kind: str) -> str:
    return {HEADS: "head", FEATURESETS: "featureset"}[kind]


def index_path(ws: Workspace, kind: str) -> Path:
    return ws.root / "names" / f"{kind}.json"


def _lock(ws: Workspace, kind: str) -> FileLock:
    return FileLock(ws.locks_dir / f"names-{kind}.lock", f"the {kind} name index", wait=30.0)


def check_ref(kind: str, ref: str) -> str:
    """A reference is ``ID``, ``NAME`` or ``NAME@ID``: each part a valid name."""
    if not isinstance(ref, str):
        raise ConfigError(f"invalid {_singular(kind)} {ref!r}: expected a name or an id")
    for part in ref.split(PIN, 1):
        check_name(_singular(kind), part)
    return ref


def read_index(ws: Workspace, kind: str) -> Versions:
    """The committed index ({} when nothing was named yet); a damaged one is an error naming the file."""
    path = index_path(ws, kind)
    if not path.exists() and not path.is_symlink():
        return {}
    if not path.is_file():  # a folder (or a FIFO, which would block the read) where the file belongs
        raise damaged_index(path, kind, "not a regular file")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise damaged_index(path, kind, exc) from None
    why = index_problem(index, kind)
    if why:
        raise damaged_index(path, kind, why)
    return {k: list(v) for k, v in index.items()}


def index_problem(index: object, kind: str) -> str | None:
    """Pure: what is wrong with a parsed index (None when it is ``{name: [{"id", "recorded_at"}, ...]}``)."""
    if not isinstance(index, dict):
        return f"expected a JSON object of names, got {type(index).__name__}"
    for name, entries in index.items():
        if not isinstance(entries, list):
            return f"name {name!r}: expected a list of versions, got {type(entries).__name__}"
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get(ID), str) and isinstance(e.get(RECORDED_AT, ""), str)):
                return f"name {name!r}: expected versions like {{'id': ..., 'recorded_at': ...}}, got {e!r:.80}"
        try:  # ids become folder names: one that is not a valid name is damage, never a path
            for part in (name, *(e[ID] for e in entries)):
                check_name(_singular(kind), part)
        except ConfigError as exc:
            return f"name {name!r}: {exc}"
    return None


def damaged_index(path: Path, kind: str, why: object) -> ImgfeatError:
    """The error for an unreadable name index (exit 1, like every damaged file): what to do about it."""
    way_out = {
        HEADS: "each head then goes by the name in its head.json",
        FEATURESETS: "featuresets then go by their ids until a run names them again",
    }[kind]
    return ImgfeatError(
        f"cannot read {path}: {str(why).rstrip('.')}; the {_singular(kind)} name index is "
        f"damaged: delete it ({way_out}; 'imgfeat ls' lists them)"
    )


def record(ws: Workspace, kind: str, name: str, version: str) -> None:
    """Make ``version`` the latest of ``name`` (moved to the end if it was there already).

    Written under a lock with the commit protocol, so two runs never lose each other's entry
    and a crash leaves the old or the new index, never half of one. When ``version`` already
    is the latest, nothing is written: a rerun with nothing new changes no file.
    """
    check_name(_singular(kind), name)
    check_name(_singular(kind), version)
    with _lock(ws, kind):
        index = read_index(ws, kind)
        if index.get(name) and index[name][-1][ID] == version:
            return
        entries = [e for e in index.get(name, []) if e[ID] != version]
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        index[name] = [*entries, {ID: version, RECORDED_AT: now}]
        write_json_atomic(index, index_path(ws, kind))


def forget(ws: Workspace, kind: str, versions: Iterable[str]) -> None:
    """Drop versions (after prune deleted them); names left without versions disappear."""
    gone = set(versions)
    with _lock(ws, kind):
        index = read_index(ws, kind)
        kept = {n: [e for e in es if e[ID] not in gone] for n, es in index.items()}
        write_json_atomic({n: es for n, es in kept.items() if es}, index_path(ws, kind))


def latest(index: Versions) -> dict[str, str]:
    """name -> its latest version."""
    return {name: entries[-1][ID] for name, entries in index.items() if entries}


def resolve(index: Versions, kind: str, ref: str, existing: Collection[str]) -> str:
    """``ID`` -> itself, ``NAME`` -> its latest version, ``NAME@ID`` -> that version of the name."""
    check_ref(kind, ref)
    what = _singular(kind)
    name, _, pinned = ref.partition(PIN)
    if pinned:
        ids = [e[ID] for e in index.get(name, [])]
        if not ids:
            raise unknown_value(f"{what} name", name, index)
        match = [i for i in ids if i == pinned or i.endswith(f"-{pinned}")]
        if len(match) != 1:
            raise unknown_value(f"version of {what} {name!r}", pinned, ids)
        return match[0]
    if ref in existing:
        return ref
    if index.get(ref):
        return index[ref][-1][ID]
    allowed = sorted({*index, *existing})
    if not allowed:
        raise unknown_value(what, ref, allowed, hint=f"there are no {kind} yet")
    listing = f"allowed: {', '.join(allowed)}; " if len(allowed) <= 12 else ""
    raise unknown_value(what, ref, allowed, hint=f"{listing}'imgfeat ls' shows them with names and dates")
