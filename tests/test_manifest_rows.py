"""A manifest read a row group at a time (scan/rows.py): the same images, rows and counts as the
whole table, whatever the row groups."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgfeat.core import schemas as S
from imgfeat.core.keys import keys_to_arrow
from imgfeat.heads.data import MANIFEST_COLUMNS, repeated_files, unique_table
from imgfeat.scan.rows import ManifestRows, unique_positions

pytestmark = pytest.mark.quick


def _manifest(tmp_path, n: int, sort: bool = True, group: int = 37, odd_from: int | None = None):
    """``odd_from``: from that row on, every 11th id is no content id (an id of another shape)."""
    rng = np.random.default_rng(5)
    rows = []
    for k in range(n):
        image = f"{int(rng.integers(0, n * 2 // 3)):032x}"  # repeats
        if odd_from is not None and k >= odd_from and k % 11 == 0:
            image = f"legacy-{int(rng.integers(0, n // 20))}"
        label = ["cat", "dog", None][int(rng.integers(0, 3))]
        status = "ok" if k % 13 else "unreadable"
        rows.append(
            {
                S.IMAGE_ID: image if k % 29 else None,
                S.PATH: f"d{k % 7}/{k:05d}.jpg",
                S.LABEL: label,
                S.SPLIT: "train",
                S.STATUS: status,
            }
        )
    table = pa.Table.from_pylist(rows, schema=S.MANIFEST_SCHEMA)
    if sort:
        table = table.sort_by(S.PATH)
    path = tmp_path / "manifest.parquet"
    pq.write_table(table, path, row_group_size=group)
    return path, table


@pytest.mark.parametrize("odd_from", [None, 0, 300], ids=["content-ids", "mixed", "mixed-midway"])
def test_unique_positions_are_unique_table_read_a_group_at_a_time(tmp_path, odd_from) -> None:
    """Content ids are sorted as packed records, other ids apart; an id of another shape halfway
    through the manifest switches from the one to the other without losing a row."""
    path, table = _manifest(tmp_path, 600, odd_from=odd_from)
    rows = ManifestRows(path, MANIFEST_COLUMNS)
    assert rows.num_row_groups > 10
    found = unique_positions(rows)
    want, want_counts, want_files = unique_table(table)
    assert found is not None
    assert found.keys.dtype.itemsize == (16 if odd_from is None else 32)  # packed, or plain
    assert keys_to_arrow(found.keys).to_pylist() == sorted(want[S.IMAGE_ID].to_pylist())  # in id order
    in_path_order = np.argsort(found.positions)
    got = rows.take(found.positions[in_path_order])
    assert got.equals(want.combine_chunks())
    assert keys_to_arrow(found.keys[in_path_order]).to_pylist() == want[S.IMAGE_ID].to_pylist()
    files, conflicting = repeated_files(found.repeated)
    assert {**found.counts, "conflicting_labels": len(conflicting)} == want_counts
    assert want_counts["duplicates"] > 50 and want_counts["not_readable"] > 40
    key = [S.PATH, S.REASON]
    assert files.sort_values(key).reset_index(drop=True).equals(want_files.sort_values(key).reset_index(drop=True))
    rows.close()


def test_rows_come_back_in_the_order_asked_across_groups(tmp_path) -> None:
    path, table = _manifest(tmp_path, 300, group=16)
    rows = ManifestRows(path, [S.PATH, S.STATUS])
    at = np.random.default_rng(0).permutation(300)[:120]
    assert rows.take(at)[S.PATH].to_pylist() == [table[S.PATH][int(k)].as_py() for k in at]
    assert rows.take(np.zeros(0, np.int64)).num_rows == 0


def test_a_manifest_not_in_path_order_is_left_to_the_whole_table(tmp_path) -> None:
    path, _ = _manifest(tmp_path, 200, sort=False)
    assert unique_positions(ManifestRows(path, MANIFEST_COLUMNS)) is None
