"""Core pieces, called directly: schemas, name checks, the commit protocol, locks, run records, manifests."""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, LockBusyError
from imgfeat.core.runs import RunRecord, new_run_id
from imgfeat.core.storage import (
    WAIT_HINT,
    FileLock,
    column_values,
    list_shards,
    read_shards,
    shard_name,
    write_bytes_atomic,
    write_table_atomic,
)
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.scan.manifest import manifest_info, read_manifest, rows_to_table, write_manifest

pytestmark = pytest.mark.quick


# ---------------------------------------------------------------- schemas


def test_every_schema_uses_the_column_constants():
    names = {v for k, v in vars(S).items() if k.isupper() and isinstance(v, str)}
    for schema in (S.MANIFEST_SCHEMA, S.ERRORS_SCHEMA, S.PREDICTIONS_SCHEMA, S.features_schema(4)):
        assert set(schema.names) <= names, schema.names


def test_an_error_row_has_exactly_the_errors_tables_columns():
    assert [f.name for f in dataclasses.fields(S.ErrorRow)] == S.ERRORS_SCHEMA.names


def test_error_rows_round_trip_through_json_and_become_the_errors_table():
    rows = [
        S.ErrorRow("a" * 32, "/img/a.jpg", S.STAGE_DECODE, "truncated", "cut short", "run-1"),
        S.ErrorRow(None, "/img/b.jpg", "read", "unreadable", None, "run-1"),
    ]
    assert [S.ErrorRow.from_json(json.loads(json.dumps(r.to_json()))) for r in rows] == rows
    table = S.errors_table(rows)
    assert table.schema == S.ERRORS_SCHEMA
    assert [S.ErrorRow(**r) for r in table.to_pylist()] == rows


@pytest.mark.parametrize("dtype, arrow", [("float16", pa.float16()), ("float32", pa.float32())])
def test_features_schema_is_a_fixed_size_list(dtype, arrow):
    field = S.features_schema(7, dtype).field(S.FEATURE)
    assert field.type == pa.list_(arrow, 7) and not field.nullable


def test_status_codes_are_unique_and_ok_comes_first():
    assert S.STATUS_CODES[0] == S.STATUS_OK and len(set(S.STATUS_CODES)) == len(S.STATUS_CODES)


# ---------------------------------------------------------------- workspace names


@pytest.mark.parametrize("name", ["photos", "a", "x.y_z-1", "A" * 128])
def test_good_names_pass(name):
    assert check_name("dataset", name) == name


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden", "-dash", "sp ace", "A" * 129, "part-*", None, 5])
def test_bad_names_are_config_errors_naming_the_kind(name):
    with pytest.raises(ConfigError, match=r"invalid dataset name"):
        check_name("dataset", name)


def test_workspace_paths_follow_the_layout(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.manifest_path("d") == tmp_path / "datasets" / "d" / "manifest.parquet"
    assert ws.featureset_dir("fs").parent == tmp_path / "features"
    assert ws.head_dir("h").parent == tmp_path / "heads"


def test_workspace_resolves_flag_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGFEAT_WORKSPACE", str(tmp_path / "env"))
    assert Workspace.resolve(None).root == (tmp_path / "env").absolute()
    assert Workspace.resolve(tmp_path / "flag").root == (tmp_path / "flag").absolute()


# ---------------------------------------------------------------- the commit protocol


def test_shard_names_sort_by_run_then_sequence():
    names = [shard_name("20260101T000000Z-aaaaaa", i) for i in (0, 1, 10)]
    assert names == sorted(names) and all(n.startswith("part-") and n.endswith(".parquet") for n in names)


def test_committed_shards_read_back_in_order_and_tmp_files_never(tmp_path):
    for i in range(3):
        write_table_atomic(pa.table({S.IMAGE_ID: [f"id{i}"]}), tmp_path / shard_name("r", i))
    (tmp_path / (shard_name("r", 3) + ".tmp")).write_bytes(b"half a file")
    shards = list_shards(tmp_path)
    assert len(shards) == 3
    assert column_values(shards, S.IMAGE_ID) == ["id0", "id1", "id2"]
    assert read_shards(shards).num_rows == 3


def test_bytes_are_replaced_whole(tmp_path):
    target = tmp_path / "blob.bin"
    write_bytes_atomic(b"first", target)
    write_bytes_atomic(b"second", target)
    assert target.read_bytes() == b"second" and os.listdir(tmp_path) == ["blob.bin"]


def test_a_second_lock_in_this_process_fails_fast_and_names_the_holder(tmp_path):
    path = tmp_path / "locks" / "x.lock"
    with FileLock(path, "featureset x"):
        with pytest.raises(LockBusyError, match=rf"featureset x .*pid {os.getpid()}.*--wait"):
            FileLock(path, "featureset x", hint=WAIT_HINT).acquire()
    with FileLock(path, "featureset x"):  # released on exit: free again
        pass


def test_a_lock_waits_until_its_deadline(tmp_path):
    path = tmp_path / "x.lock"
    with FileLock(path, "x"):
        with pytest.raises(LockBusyError):
            FileLock(path, "x", wait=0.3).acquire()


# ---------------------------------------------------------------- run records


def test_run_ids_sort_by_time_and_are_unique():
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == len("20261124T120501Z-3fa9c2") for i in ids)


def test_run_record_writes_the_summary_it_returns(tmp_path):
    ws = Workspace(tmp_path)
    record = RunRecord("scan")
    record.summary.update({"files": 3})
    obj = record.finish(ws, exit_code=2, error="bad flag")
    assert obj["status"] == "failed" and obj["files"] == 3 and obj["error"] == "bad flag"
    assert json.loads((ws.runs_dir / f"{record.run_id}.json").read_text()) == obj


# ---------------------------------------------------------------- manifest files


ROWS = [
    {S.IMAGE_ID: "a" * 32, S.PATH: "cat/1.jpg", S.LABEL: "cat", S.STATUS: S.STATUS_OK, S.WIDTH: 4, S.HEIGHT: 3},
    {S.IMAGE_ID: None, S.PATH: "cat/2.jpg", S.LABEL: "cat", S.STATUS: S.STATUS_UNREADABLE, S.ERROR: "gone"},
]


def test_manifest_round_trip_keeps_rows_types_and_footer(tmp_path):
    ws = Workspace(tmp_path / "ws")
    write_manifest(ws, "d", ROWS, root=tmp_path / "images", options={"test_fraction": None}, run_id="r1")
    table = read_manifest(ws, "d")
    assert table.schema.equals(S.MANIFEST_SCHEMA, check_metadata=False)
    assert table.column(S.PATH).to_pylist() == ["cat/1.jpg", "cat/2.jpg"]
    assert table.column(S.WIDTH).to_pylist() == [4, None]
    info = manifest_info(ws, "d")
    assert info["root"] == (tmp_path / "images").as_posix() and info["run_id"] == "r1"
    assert read_manifest(ws, "d", columns=[S.STATUS]).column_names == [S.STATUS]
    assert pq.read_table(ws.manifest_path("d")).num_rows == 2  # any reader opens it


def test_rows_missing_a_column_get_nulls():
    table = rows_to_table([{S.PATH: "x.jpg", S.STATUS: S.STATUS_OK}])
    assert table.column(S.IMAGE_ID).to_pylist() == [None] and table.schema == S.MANIFEST_SCHEMA


def test_an_unknown_dataset_is_a_config_error_with_a_hint(tmp_path):
    ws = Workspace(tmp_path)
    write_manifest(ws, "photos", ROWS, root=tmp_path)
    with pytest.raises(ConfigError, match="photos"):
        read_manifest(ws, "photo")


def test_one_vocabulary_other_modules_alias_it():
    from imgfeat.extract import decode
    from imgfeat.heads import artifacts

    assert decode.ERROR_CODES is S.DECODE_ERROR_CODES
    assert set(S.DECODE_ERROR_CODES) - set(S.STATUS_CODES) == {S.ERROR_UNSUPPORTED_MODE}
    assert artifacts.ROWS_SCHEMA is S.HEAD_ROWS_SCHEMA and artifacts.ROLE == S.ROLE
    assert set(S.HEAD_ROWS_SCHEMA.names) == {S.IMAGE_ID, S.LABEL, S.ROLE}


# ---------------------------------------------------------------- the one shard writer


def test_the_shard_writer_never_replaces_a_shard_and_records_each_one(tmp_path):
    """Two writers under one tag (two calls of a run, a stray shard of the same name): each shard
    gets the next free name and a record; nothing already there is replaced."""
    from imgfeat.core.commits import ShardWriter, list_committed, read_record

    folder = tmp_path / "table"
    folder.mkdir()
    write_table_atomic(pa.table({S.IMAGE_ID: ["stray"]}), folder / shard_name("r", 0))
    first, second = ShardWriter(folder, "r", shard_rows=2), ShardWriter(folder, "r", shard_rows=2)
    first.add(pa.table({S.IMAGE_ID: ["a", "b", "c"]}))  # one full shard now, one at flush
    second.add(pa.table({S.IMAGE_ID: ["d"]}))
    second.flush()
    first.flush()
    assert column_values([folder / shard_name("r", 0)], S.IMAGE_ID) == ["stray"]  # kept as it was
    names = [p.name for p in first.shards + second.shards]
    assert len(set(names)) == len(names) == 3 and shard_name("r", 0) not in names
    assert (first.written, second.written) == (3, 1)
    committed = list_committed(folder)
    assert sorted(p.name for p in committed.paths) == sorted(names)  # the stray is not recorded
    assert sorted(column_values(committed.paths, S.IMAGE_ID)) == ["a", "b", "c", "d"]
    assert all(read_record(p).rows == len(column_values([p], S.IMAGE_ID)) for p in committed.paths)


def test_an_idempotent_writer_finds_its_committed_shard_instead_of_writing_it_twice(tmp_path):
    """A unit of work retried after its shard was committed (Ray) names the same shard: it is not
    written again, and a retry that died before the record writes a new name, never over it."""
    from imgfeat.core.commits import ShardWriter, list_committed

    folder = tmp_path / "table"
    done = ShardWriter(folder, "r-ray", start_seq=32, idempotent=True)
    done.commit(pa.table({S.IMAGE_ID: ["a"]}))
    again = ShardWriter(folder, "r-ray", start_seq=32, idempotent=True)
    assert again.commit(pa.table({S.IMAGE_ID: ["a"]})) == done.shards[0] and again.written == 1
    assert list_shards(folder) == done.shards
    plain = ShardWriter(folder, "r-ray", start_seq=32)  # the default: a taken name is never reused
    assert plain.commit(pa.table({S.IMAGE_ID: ["b"]})).name == shard_name("r-ray", 33)
    assert len(list_committed(folder).paths) == 2
