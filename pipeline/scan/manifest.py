"""The manifest table: reading it, its footer metadata, and writing it under the commit protocol."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat import __version__
from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ImgfeatError, unknown_value
from imgfeat.core.results import JsonObject, json_str
from imgfeat.core.storage import atomic_path
from imgfeat.core.stores import Location, is_uri, parse_location
from imgfeat.core.workspace import Workspace

# Row groups of this many rows: small enough to stream, big enough to compress well.
ROW_GROUP_ROWS = 8192


def _missing(ws: Workspace, dataset: str) -> ConfigError:
    names = [n for n in ws.list_names("datasets") if ws.manifest_path(n).is_file()]
    hint = "" if names else f"none under {ws.root / 'datasets'}; run 'imgfeat scan ROOT --dataset NAME' first"
    return unknown_value("dataset", dataset, names, hint=hint)


def manifest_file(ws: Workspace, dataset: str) -> Path:
    """The committed manifest path; ConfigError (with did-you-mean) when it does not exist."""
    path = ws.manifest_path(dataset)
    if not path.is_file():
        raise _missing(ws, dataset)
    return path


def read_manifest(ws: Workspace, dataset: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The whole manifest (or only ``columns``) with MANIFEST_SCHEMA's types."""
    path = manifest_file(ws, dataset)
    try:
        table = read_table(path, columns)
    except (OSError, pa.ArrowException) as exc:
        raise corrupt_manifest(path, dataset, exc) from None
    schema = S.MANIFEST_SCHEMA if columns is None else pa.schema([S.MANIFEST_SCHEMA.field(c) for c in columns])
    table = with_etag(table, schema)
    if table.schema.equals(schema, check_metadata=False):
        return table  # the usual case; a cast would import pyarrow.compute for nothing
    return table.cast(schema.with_metadata(table.schema.metadata))


def with_etag(table: pa.Table, schema: pa.Schema = S.MANIFEST_SCHEMA) -> pa.Table:
    """A manifest table written before the etag column, with it (all null) where ``schema`` has it."""
    if S.ETAG in schema.names and S.ETAG not in table.column_names:
        return table.append_column(S.MANIFEST_SCHEMA.field(S.ETAG), pa.nulls(table.num_rows, pa.string()))
    return table


def read_table(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A manifest file's table as stored (no schema cast; an etag column asked of a manifest
    written before it is left out)."""
    # ParquetFile.read, not pq.read_table: the latter imports pyarrow.dataset and pandas (~1 s).
    with pq.ParquetFile(path) as f:
        if columns is not None and S.ETAG in columns and S.ETAG not in f.schema_arrow.names:
            columns = [c for c in columns if c != S.ETAG]
        return f.read(columns=list(columns) if columns is not None else None)


def manifest_info(ws: Workspace, dataset: str) -> JsonObject:
    """The footer's JSON metadata: ``root``, ``dataset``, ``options``, ``created_at``, ``run_id``, ..."""
    path = manifest_file(ws, dataset)
    try:
        return read_info(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise corrupt_manifest(path, dataset, exc) from None


def corrupt_manifest(path: Path, dataset: str, exc: object) -> ImgfeatError:
    """The error for an unreadable manifest: a rescan rebuilds it (nothing else is lost)."""
    return ImgfeatError(
        f"cannot read the manifest {path}: {str(exc).rstrip('.')}; scanning the folder "
        f"again rebuilds it: imgfeat scan ROOT --dataset {dataset}"
    )


def file_schema(path: Path) -> pa.Schema:
    """A Parquet file's Arrow schema, with its key-value metadata (reads only the footer)."""
    with pq.ParquetFile(path) as f:
        return f.schema_arrow


def read_info(path: Path) -> JsonObject:
    """Footer metadata of a manifest file (reads only the footer)."""
    meta = file_schema(path).metadata or {}
    raw = meta.get(S.META_MANIFEST)
    if raw is None:
        raise ConfigError(f"{path} is not an imgfeat manifest (no {S.META_MANIFEST.decode()} metadata)")
    info = json.loads(raw)
    if not isinstance(info, dict):
        raise ValueError(f"its {S.META_MANIFEST.decode()} metadata is not a JSON object")
    return info


def dataset_root(ws: Workspace, dataset: str) -> Path | Location:
    """The absolute root the manifest's relative paths are under: a folder, or a bucket prefix
    (``root / path`` is then the object's URI)."""
    return root_of(json_str(manifest_info(ws, dataset), "root"))


def root_of(recorded: str) -> Path | Location:
    """A root as the manifest records it -> a Path, or a Location for an object-store URI."""
    return parse_location(recorded) if is_uri(recorded) else Path(recorded)


def make_info(root: Path | Location, dataset: str, options: Mapping[str, Any], run_id: str | None) -> JsonObject:
    """The metadata object stored in the footer (root as an absolute POSIX path)."""
    return {
        "root": root.as_posix() if isinstance(root, Location) else Path(os.path.abspath(root)).as_posix(),
        "dataset": dataset,
        "options": dict(options),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "imgfeat_version": __version__,
    }


def manifest_schema(info: Mapping[str, Any]) -> pa.Schema:
    return S.MANIFEST_SCHEMA.with_metadata({S.META_MANIFEST: json.dumps(dict(info), sort_keys=True)})


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema = S.MANIFEST_SCHEMA) -> pa.Table:
    """Rows as dicts keyed by the schema's column names; missing keys become nulls."""
    return pa.Table.from_pylist(list(rows), schema=schema)


@contextlib.contextmanager
def manifest_writer(path: Path, info: Mapping[str, Any]) -> Iterator[pq.ParquetWriter]:
    """Stream row groups into ``<path>.tmp``; on a clean exit it replaces ``path`` atomically.

    Call ``writer.write_table(table)`` with tables of MANIFEST_SCHEMA (any metadata). If the
    block raises, the old manifest stays as it was and no temporary file is left behind. When
    the new manifest holds the same rows, root and options as the old one, the old file stays
    (its footer names the scan that last changed it): a rescan that found nothing new writes nothing.
    """
    schema = manifest_schema(info)
    with contextlib.suppress(_Unchanged), atomic_path(Path(path)) as tmp:
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        try:
            yield _SchemaWriter(writer, schema)
        finally:
            writer.close()
        if _same_manifest(tmp, Path(path), info):
            raise _Unchanged  # atomic_path removes the temporary file and leaves the old one


class _Unchanged(Exception):
    """The manifest just written equals the committed one: keep the committed file."""


# Footer keys that describe the scan rather than the dataset (they differ on every rescan).
_SCAN_KEYS = ("created_at", "run_id")


def _same_manifest(new: Path, old: Path, info: Mapping[str, Any]) -> bool:
    if not old.is_file():
        return False
    try:
        before = pq.read_table(old)
        old_info = json.loads(before.schema.metadata[S.META_MANIFEST])
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError):
        return False  # a damaged manifest is always replaced
    new_info = json.loads(json.dumps(dict(info), sort_keys=True))  # as the footer stores it
    if {k: v for k, v in old_info.items() if k not in _SCAN_KEYS} != {
        k: v for k, v in new_info.items() if k not in _SCAN_KEYS
    }:
        return False
    after = pq.read_table(new)
    return before.num_rows == after.num_rows and before.equals(after)


class _SchemaWriter:
    """Casts each table to the manifest schema (with its metadata) before writing it."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema) -> None:
        self._writer = writer
        self._schema = schema
        self.rows = 0

    def write_table(self, table: pa.Table) -> None:
        if table.num_rows:
            if not table.schema.equals(self._schema, check_metadata=False):
                table = table.select(self._schema.names).cast(self._schema)
            self._writer.write_table(table.replace_schema_metadata(self._schema.metadata), ROW_GROUP_ROWS)
            self.rows += table.num_rows


def write_manifest(
    ws: Workspace,
    dataset: str,
    rows: pa.Table | Iterable[Mapping[str, Any]],
    root: Path,
    options: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Path:
    """Write a whole manifest at once (tests and small tools; the scan stage streams instead)."""
    table = rows if isinstance(rows, pa.Table) else rows_to_table(list(rows))
    path = ws.manifest_path(dataset)
    with manifest_writer(path, make_info(root, dataset, options or {}, run_id)) as writer:
        writer.write_table(table)
    return path
