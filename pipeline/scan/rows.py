"""A manifest read a row group at a time: its unique images and their rows by position, not held.

Predict at millions of images joins feature rows to manifest rows (path, label, split). Holding
the manifest as a table costs ~200 bytes of memory an image (its strings and the decoder's
buffers); ``unique_positions`` instead keeps one compact key and one position per image
(``core/keys.py``), and ``ManifestRows.take`` reads the rows a batch of features needs from the
row groups that hold them, keeping the last few decoded. Feature rows are written in manifest
order by extract, so a batch touches one or two row groups; in any other order the answer is the
same, only slower.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.keys import HEX_WIDTH, PACKED, argsort_keys, first_of_runs, is_packed, keys_of, room_for, unpack
from imgfeat.core.workspace import Workspace
from imgfeat.scan.manifest import corrupt_manifest, manifest_file

CACHED_GROUPS = 4  # decoded row groups kept (a manifest row group is ~8k rows, ~1 MB)


class ManifestRows:
    """Rows of a manifest file by position (0-based, file order), a row group decoded at a time."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.columns = columns
        self._schema = pa.schema([S.MANIFEST_SCHEMA.field(c) for c in columns])
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    @property
    def num_row_groups(self) -> int:
        return len(self.starts) - 1

    def group(self, g: int) -> pa.Table:
        """Row group ``g``'s columns, decoded once while it stays among the last CACHED_GROUPS used."""
        t = self._cache.get(g)
        if t is None:
            t = self._file.read_row_group(g, columns=self.columns).cast(self._schema)
            self._cache[g] = t
            while len(self._cache) > CACHED_GROUPS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        return t

    def take(self, positions: np.ndarray) -> pa.Table:
        """The rows at ``positions``, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        if not len(positions):
            return self._schema.empty_table()
        groups = np.searchsorted(self.starts, positions, side="right") - 1
        order = np.argsort(groups, kind="stable")
        parts = []
        for g in np.unique(groups):
            rows = positions[order][groups[order] == g] - self.starts[g]
            parts.append(self.group(int(g)).take(pa.array(rows, pa.int64())))
        table = pa.concat_tables(parts).combine_chunks()
        back = np.empty(len(order), dtype=np.int64)
        back[order] = np.arange(len(order))  # from group order back to the order asked for
        return table.take(pa.array(back, pa.int64()))

    def close(self) -> None:
        self._cache.clear()
        self._file.close()


@dataclass(frozen=True)
class UniquePositions:
    """Each readable image's first row (by path) as a manifest position, in id order, with what was dropped."""

    positions: np.ndarray  # int32 (int64 past 2**31 rows), aligned with keys
    keys: np.ndarray  # the ids as compact keys, sorted and distinct: the order a join looks them up in
    counts: dict[str, int]  # not_readable, duplicates, conflicting_labels (as unique_images)
    repeated: pd.DataFrame  # MANIFEST_COLUMNS of every readable row of a repeated id, in path order


def unique_positions(rows: ManifestRows) -> UniquePositions | None:
    """``heads.data.unique_images``' answer as positions, reading the ids and paths a row group at a
    time; None when the manifest's readable rows are not in path order (written by hand or by an
    older version), where the caller sorts a whole table instead.

    Memory at N rows of content ids: 28 bytes an image for a moment (``KeysAndPositions``), then the
    sorted keys and a position each (20 bytes an image)."""
    collected = KeysAndPositions(rows.num_rows)
    unreadable = 0
    last_path: str | None = None
    for g in range(rows.num_row_groups):
        t = rows.group(g)
        at = np.flatnonzero(np.asarray(readable(t), dtype=bool))
        unreadable += t.num_rows - len(at)
        if not len(at):
            continue
        paths = t[S.PATH].take(pa.array(at, pa.int64()))
        if not paths_ascending(paths, last_path):
            return None
        last_path = paths[-1].as_py()
        collected.add(keys_of(t[S.IMAGE_ID].take(pa.array(at, pa.int64()))), at + rows.starts[g])
    keys, positions = collected.sorted()  # by key, then position: of an id's rows, the first path first
    first = first_of_runs(keys)
    repeated = pd.DataFrame(columns=rows.columns)
    if not first.all():  # the rows of repeated ids, usually few, for the files table
        twice = ~first
        twice[:-1] |= ~first[1:]  # the first row of a repeated id too
        repeated = rows.take(np.sort(positions[twice])).to_pandas()
        keys, positions = keys[first], positions[first]
    return UniquePositions(positions, keys, _counts(unreadable, int((~first).sum()), 0), repeated)


KEY_BYTES = PACKED.itemsize
RECORD = KEY_BYTES + 8  # a packed key, then its position as a big-endian int64


class KeysAndPositions:
    """Up to ``n`` (key, position) pairs, added a batch at a time, then sorted by key and position.

    Content ids (packed keys) go into one buffer of 24-byte records, sorted in place (memcmp order
    is key order, then position order, the position being big-endian) and then split: the
    positions copied out, the keys moved to the buffer's front and the rest of it handed back,
    so sorting N pairs holds 28 bytes a pair at most (an argsort and two gathers held 48). Other
    ids are kept as two arrays and sorted by argsort."""

    def __init__(self, n: int) -> None:
        self._n, self._filled = n, 0
        self._pos_type = np.dtype(np.int32 if n < 2**31 else np.int64)  # positions: 4 bytes where they fit
        self._buf: np.ndarray | None = None  # records: n x RECORD bytes, flat (it owns its memory)
        self._keys: np.ndarray | None = None  # or keys and positions apart
        self._pos: np.ndarray | None = None

    def add(self, keys: np.ndarray, positions: np.ndarray) -> None:
        k, lo = len(keys), self._filled
        if self._keys is None and is_packed(keys):
            if self._buf is None:
                self._buf = np.empty(self._n * RECORD, np.uint8)
            rec = self._buf.reshape(self._n, RECORD)[lo : lo + k]
            rec[:, :KEY_BYTES] = np.ascontiguousarray(keys).view(np.uint8).reshape(k, KEY_BYTES)
            rec[:, KEY_BYTES:] = np.asarray(positions, ">i8").view(np.uint8).reshape(k, 8)
        else:
            if self._keys is None:  # plain keys from here on (those so far unpacked)
                packed, self._pos = self._split_records(lo, np.empty(self._n, self._pos_type))
                self._keys = np.empty(self._n, unpack(keys[:0]).dtype if not lo else f"S{HEX_WIDTH}")
                self._keys[:lo] = unpack(packed)
            assert self._pos is not None
            self._keys = room_for(self._keys, keys)  # filled in place: copied only for a longer or a plain id
            self._keys[lo : lo + k] = keys if keys.dtype == self._keys.dtype else unpack(keys)
            self._pos[lo : lo + k] = positions
        self._filled += k

    def sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """The keys sorted (ties by position) and their positions (int32 below 2**31 rows, else
        int64); what was added goes."""
        f = self._filled
        if self._keys is None:
            if self._buf is None:
                return np.zeros(0, PACKED), np.zeros(0, self._pos_type)
            self._buf[: f * RECORD].view(f"S{RECORD}").sort()  # in place; no ties
            return self._split_records(f, np.empty(f, self._pos_type))
        assert self._pos is not None
        keys, pos = self._keys[:f], self._pos[:f]
        self._keys = self._pos = None
        order = argsort_keys(keys)  # stable: of an id's rows, the first position comes first
        keys = keys[order]
        return keys, pos[order]

    def _split_records(self, f: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first ``f`` records as packed keys (in the buffer's own memory, the rest of it
        freed) and their positions written into ``pos``."""
        buf, self._buf = self._buf, None
        if buf is None:
            return np.zeros(0, PACKED), pos
        rec = buf.reshape(self._n, RECORD)[:f]
        width = pos.dtype.itemsize  # the position's low bytes: it is below 2**31 when pos is int32
        step = 1 << 16
        for lo in range(0, f, step):
            hi = min(f, lo + step)
            # this part's positions first (big-endian bytes, converted), then each key to the front:
            # a part's keys land before the records of the parts after it
            pos[lo:hi] = rec[lo:hi, RECORD - width :].copy().view(f">i{width}").reshape(-1)
            buf[lo * KEY_BYTES : hi * KEY_BYTES] = rec[lo:hi, :KEY_BYTES].reshape(-1)
        del rec
        buf.resize(f * KEY_BYTES, refcheck=False)  # the records' tails go back to the allocator
        return buf.view(PACKED), pos


def _counts(not_readable: int, duplicates: int, conflicting: int) -> dict[str, int]:
    return {"not_readable": int(not_readable), "duplicates": int(duplicates), "conflicting_labels": int(conflicting)}


def readable(t: pa.Table) -> pa.Array | pa.ChunkedArray:
    """Which manifest rows are readable images: status ok and an id (a null counts as no)."""
    return pc.fill_null(pc.and_(pc.equal(t[S.STATUS], S.STATUS_OK), pc.is_valid(t[S.IMAGE_ID])), False)


def paths_ascending(paths: pa.Array | pa.ChunkedArray, after: str | None = None) -> bool:
    """Whether the paths (none null) are in ascending order, as a stable sort would leave them, and
    not before ``after`` (the last path of the row group before)."""
    n = len(paths)
    if paths.null_count:
        return False
    if n and after is not None and paths[0].as_py() < after:
        return False
    return n < 2 or bool(pc.all(pc.less_equal(paths.slice(0, n - 1), paths.slice(1))).as_py())


def manifest_rows(ws: Workspace, dataset: str) -> int:
    """How many rows a dataset's manifest has (its footer's count; no row is read)."""
    path = manifest_file(ws, dataset)
    try:
        with pq.ParquetFile(path) as f:
            return int(f.metadata.num_rows)
    except (OSError, pa.ArrowException) as exc:
        raise corrupt_manifest(path, dataset, exc) from None


def manifest_groups(ws: Workspace, dataset: str, columns: Sequence[str], ok_only: bool = True) -> Iterator[pa.Table]:
    """A dataset's manifest a row group at a time (its ``columns``), only readable rows when
    ``ok_only``: memory holds one row group, not the manifest. A file that cannot be read is
    ``corrupt_manifest``'s error."""
    path = manifest_file(ws, dataset)
    need = list(dict.fromkeys([*columns, S.IMAGE_ID, S.STATUS])) if ok_only else list(columns)
    try:
        rows = ManifestRows(path, need)
        try:
            for g in range(rows.num_row_groups):
                t = rows.group(g)
                yield (t.filter(readable(t)) if ok_only else t).select(list(columns))
        finally:
            rows.close()
    except (OSError, pa.ArrowException) as exc:
        raise corrupt_manifest(path, dataset, exc) from None
