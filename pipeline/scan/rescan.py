"""The previous manifest during a rescan: matched to the new walk by a streamed merge in walk order."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.stores import Location
from imgfeat.scan.manifest import file_schema, read_info, with_etag
from imgfeat.scan.walk import FileEntry

log = logging.getLogger(__name__)

# Statuses a file keeps while its size and mtime stay the same (too_large depends on the limit).
SETTLED = frozenset(S.STATUS_CODES) - {S.STATUS_UNREADABLE, S.STATUS_TOO_LARGE}
_MATCH_COLUMNS = (S.PATH, S.BYTES, S.MTIME_NS, S.STATUS, S.WIDTH, S.HEIGHT, S.ETAG)


class OldRow(NamedTuple):
    """What the change check needs of a previous row; ``row`` is its row number in the file."""

    row: int  # (not ``index``: that is tuple.index)
    bytes: int | None
    mtime_ns: int | None
    status: str
    width: int | None
    height: int | None
    etag: str | None = None


def walk_key(rel: str) -> str:
    """A sort key equal to the walk's order (depth first, names sorted in each folder).

    Comparing paths component by component is comparing them with '/' as the smallest
    character, and NUL is the one character no file name contains.
    """
    return rel.replace("/", "\x00")


def key_order(rel: str) -> str:
    """A bucket listing's order: keys compared as strings (code points sort as UTF-8 bytes do)."""
    return rel


@dataclass(frozen=True)
class Previous:
    """The last committed manifest of a dataset (only its footer has been read)."""

    path: Path
    options: dict[str, Any]  # the scan options its rows were made with
    rows: int
    in_bucket: bool = False  # listed in key order, not walked

    @property
    def max_pixels(self) -> int | None:
        return self.options.get("max_pixels")

    def cursor(self, keep: bool = True) -> OldRows:
        return OldRows(self.path, keep, key_order if self.in_bucket else walk_key)


def load_previous(path: Path, root: Path | Location) -> Previous | None:
    """The previous manifest if a rescan can carry rows over from it (same root and schema)."""
    if not path.is_file():
        return None
    try:
        info = read_info(path)
        schema = file_schema(path)
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError, ConfigError, pa.ArrowException) as exc:
        log.warning("the previous manifest %s is unreadable (%s): rebuilding it, every file is read again", path, exc)
        return None
    if info.get("root") != root.as_posix():
        log.info("the dataset's root changed; every file is read again")
        return None
    if schema.remove_metadata() not in (S.MANIFEST_SCHEMA, S.MANIFEST_SCHEMA_V1):
        log.info("the previous manifest has another schema; every file is read again")
        return None
    options = info.get("options", {})
    if not isinstance(options, dict):  # a footer imgfeat did not write
        log.info("the previous manifest's options are unreadable; every file is read again")
        return None
    return Previous(path, options, rows, isinstance(root, Location))


def classify(entry: FileEntry, old: OldRow | None, max_pixels: int) -> str:
    """``added``, ``changed``, ``unchanged`` or ``retried`` (same on disk, but worth reading again)."""
    if old is None:
        return "added"
    if (old.bytes, old.mtime_ns) != (entry.size, entry.mtime_ns):
        return "changed"
    if entry.etag is not None and old.etag != entry.etag:  # an object rewritten within its mtime's second
        return "changed"
    if old.status == S.STATUS_UNREADABLE:
        return "retried"
    # A file over the old pixel limit was never checked for truncation: read it if now allowed.
    if old.status == S.STATUS_TOO_LARGE and (
        old.width is None or old.height is None or old.width * old.height <= max_pixels
    ):
        return "retried"
    return "unchanged"


class OldRows:
    """Reads the previous manifest a row group at a time, in step with the walk.

    Both are in walk order, so matching is a merge: memory holds a few row groups, never
    the whole manifest. Row groups stay in memory (``keep``) until ``release_before`` says no
    carried row still needs them. An old manifest in another order is still correct, only
    slower: a file it cannot match in order is read again.
    """

    def __init__(self, path: Path, keep: bool = True, order: Callable[[str], str] = walk_key) -> None:
        self._file = pq.ParquetFile(path)
        self._order = order
        self._keep = keep
        self._next_group = 0
        self._start = 0  # row number of the current group's first row
        self._cols: dict[str, list] = {c: [] for c in _MATCH_COLUMNS}
        self._pos = 0
        self._kept: deque[tuple[int, pa.Table]] = deque()
        self.matched = 0

    @property
    def position(self) -> int:
        """Row number of the next old row not yet matched or passed."""
        return self._start + self._pos

    def find(self, rel: str) -> OldRow | None:
        """The old row for ``rel``, passing over old rows that sort before it (removed files)."""
        paths = self._cols[S.PATH]
        while True:
            if self._pos >= len(paths):
                if not self._load_next():
                    return None
                paths = self._cols[S.PATH]
            old = paths[self._pos]
            if old == rel:
                i = self._pos
                self._pos += 1
                self.matched += 1
                c = self._cols
                return OldRow(
                    self._start + i,
                    c[S.BYTES][i],
                    c[S.MTIME_NS][i],
                    c[S.STATUS][i],
                    c[S.WIDTH][i],
                    c[S.HEIGHT][i],
                    c[S.ETAG][i],
                )
            if self._order(old) > self._order(rel):
                return None  # a new file: the old row may still match a later one
            self._pos += 1

    def _load_next(self) -> bool:
        if self._next_group >= self._file.num_row_groups:
            return False
        self._start += len(self._cols[S.PATH])
        group = with_etag(self._file.read_row_group(self._next_group))
        self._next_group += 1
        self._cols = {c: group.column(c).to_pylist() for c in _MATCH_COLUMNS}
        self._pos = 0
        if self._keep:
            self._kept.append((self._start, group))
        return True

    def rows(self, first: int, count: int) -> list[pa.Table]:
        """Old rows ``first .. first+count-1`` as zero-copy slices of the row groups kept."""
        out = []
        for start, group in self._kept:
            lo, hi = max(first, start), min(first + count, start + group.num_rows)
            if lo < hi:
                out.append(group.slice(lo - start, hi - lo))
        return out

    def release_before(self, row: int) -> None:
        """Forget row groups that end before ``row``: no carried row will need them again."""
        while self._kept and self._kept[0][0] + self._kept[0][1].num_rows <= row:
            self._kept.popleft()

    def close(self) -> None:
        self._kept.clear()
        self._file.close()
