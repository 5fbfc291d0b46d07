"""The manifest module: reading, footer metadata, did-you-mean, and the atomic streaming writer."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.scan.manifest import (
    dataset_root,
    make_info,
    manifest_info,
    manifest_writer,
    read_manifest,
    rows_to_table,
    write_manifest,
)

pytestmark = pytest.mark.quick

ROWS = [
    {S.IMAGE_ID: "ab" * 16, S.PATH: "cat/a.jpg", S.LABEL: "cat", S.STATUS: S.STATUS_OK, S.WIDTH: 4, S.HEIGHT: 3},
    {
        S.IMAGE_ID: None,
        S.PATH: "dog/ünï code.jpg",
        S.LABEL: "dog",
        S.STATUS: S.STATUS_UNREADABLE,
        S.ERROR: "cannot read the file: permission denied",
    },
]


def test_round_trip_keeps_schema_rows_and_metadata(ws, tmp_path):
    write_manifest(ws, "pets", ROWS, root=tmp_path / "photos" / ".." / "photos", options={"test_fraction": 0.2})
    table = read_manifest(ws, "pets")
    assert table.schema.remove_metadata() == S.MANIFEST_SCHEMA
    got = table.to_pylist()
    assert [r[S.PATH] for r in got] == ["cat/a.jpg", "dog/ünï code.jpg"]
    assert got[1][S.IMAGE_ID] is None and got[0][S.SPLIT] is None
    info = manifest_info(ws, "pets")
    assert info["root"] == (tmp_path / "photos").as_posix()  # absolute and normalised
    assert info["options"] == {"test_fraction": 0.2} and info["dataset"] == "pets"
    assert dataset_root(ws, "pets") == tmp_path / "photos"


def test_reading_only_some_columns(ws, tmp_path):
    write_manifest(ws, "pets", ROWS, root=tmp_path)
    table = read_manifest(ws, "pets", columns=[S.IMAGE_ID, S.STATUS])
    assert table.column_names == [S.IMAGE_ID, S.STATUS]
    assert table.schema.field(S.STATUS).type == pa.string()


def test_unknown_dataset_says_did_you_mean(ws, tmp_path):
    with pytest.raises(ConfigError, match="imgfeat scan"):
        read_manifest(ws, "pets")
    write_manifest(ws, "pets", ROWS, root=tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'pets'"):
        manifest_info(ws, "pet")


def test_a_parquet_file_without_our_metadata_is_refused(ws):
    path = ws.manifest_path("pets")
    path.parent.mkdir(parents=True)
    pq.write_table(rows_to_table(ROWS), path)
    with pytest.raises(ConfigError, match="not an imgfeat manifest"):
        dataset_root(ws, "pets")


def test_writer_failure_keeps_the_old_manifest(ws, tmp_path):
    path = write_manifest(ws, "pets", ROWS, root=tmp_path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with manifest_writer(path, make_info(tmp_path, "pets", {}, "r2")) as writer:
            writer.write_table(rows_to_table(ROWS[:1]))
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.parquet"]
