"""Commit records: which shards of a table folder count. Each committed shard has a record (its name,
rows, bytes, sha256 of its footer and of its whole file) written after the shard, under a hidden
side folder that raw readers never see; our readers trust only recorded shards that still match.

Layout: the record of ``<table>/<folder>/part-X.parquet`` is ``<table>/.commits/<folder>/part-X.parquet.json``
(beside ``<table>/.staging/``). A folder without a ``.commits`` folder was written before records
existed (legacy): it reads as before, with one warning, until a writer records it (``reconcile``).

Two checks, by what the reader reads anyway: listing (``list_committed``) compares each shard's size
and Parquet footer (a few KB) with its record, so a reader of id columns pays no data I/O;
``open_verified`` reads a whole shard once into memory and compares its checksum before parsing it,
so a reader of features pays the hash, not a second read.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import stat
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.core import logs
from imgfeat.core.hashing import sha256_bytes
from imgfeat.core.mirror import mirror_of
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import (
    SHARD_PREFIX,
    TMP_SUFFIX,
    disk_error,
    list_shards,
    publish_new,
    shard_name,
    staging_dir,
    write_json_atomic,
)

log = logging.getLogger(__name__)

COMMITS_DIR = ".commits"
REJECTED_DIR = ".rejected"  # shards a writer set aside: out of the folder, never deleted
RECORD_SUFFIX = ".json"
RECORD_FORMAT = 1
_PARQUET_MAGIC = b"PAR1"


def commits_dir(folder: Path) -> Path:
    """``<parent>/.commits/<folder>``: where a table folder's commit records live."""
    return Path(folder).parent / COMMITS_DIR / Path(folder).name


def rejected_dir(folder: Path) -> Path:
    return Path(folder).parent / REJECTED_DIR / Path(folder).name


def record_path(shard: Path) -> Path:
    return commits_dir(Path(shard).parent) / (Path(shard).name + RECORD_SUFFIX)


@dataclass(frozen=True)
class ShardRecord:
    """What a committed shard was: ``footer_sha256`` and ``sha256`` digest its Parquet footer and the
    whole file; ``nonfinite`` counts feature rows holding NaN or inf (only shards written
    before extract refused them can have any)."""

    name: str
    rows: int
    bytes: int
    footer_sha256: str
    sha256: str
    nonfinite: int = 0
    format: int = field(default=RECORD_FORMAT)

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> ShardRecord | None:
        """None for anything that is not a record of this format (a damaged record trusts nothing)."""
        if not isinstance(obj, dict) or obj.get("format") != RECORD_FORMAT:
            return None
        types = {"name": str, "rows": int, "bytes": int, "footer_sha256": str, "sha256": str, "nonfinite": int}
        if set(obj) != set(types) | {"format"} or not all(
            type(obj[k]) is t for k, t in types.items()
        ):  # type(), not isinstance: bool is not an int here
            return None
        return cls(**obj)


def describe(data: memoryview | bytes, name: str, rows: int, nonfinite: int = 0) -> ShardRecord:
    """The record of a shard whose bytes are ``data``."""
    return ShardRecord(name, rows, len(data), sha256_bytes(footer_bytes(data)), sha256_bytes(data), nonfinite)


def footer_bytes(data: memoryview | bytes) -> bytes:
    """A Parquet file's footer (its FileMetaData: schema, row groups, column chunk sizes and
    statistics, key-value metadata); ValueError when ``data`` is not a Parquet file."""
    n = len(data)
    if n < 12 or bytes(data[n - 4 :]) != _PARQUET_MAGIC:
        raise ValueError("not a Parquet file")
    length = int.from_bytes(bytes(data[n - 8 : n - 4]), "little")
    if length + 12 > n:
        raise ValueError("footer length out of range")
    return bytes(data[n - 8 - length : n - 8])


def _file_footer(path: Path) -> tuple[int, bytes]:
    # Never through a link, never blocking: a FIFO or a link named like a shard is not one of ours.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        size = st.st_size
        fh.seek(max(0, size - 8))
        tail = fh.read(8)
        if len(tail) < 8 or tail[4:] != _PARQUET_MAGIC:
            raise ValueError("not a Parquet file")
        length = int.from_bytes(tail[:4], "little")
        if length + 12 > size:
            raise ValueError("footer length out of range")
        fh.seek(size - 8 - length)
        return size, fh.read(length)


# ------------------------------------------------------------------------------- writing


class ShardWriter:
    """The one writer of sharded tables (features, error rows, predictions): commits
    ``part-<tag>-<seq>.parquet`` shards of one folder, each followed by its commit record.

    One overwrite rule: a committed shard is never replaced. A name already taken (another call's
    shard, a dead writer's unrecorded one) moves on to the next ``seq``; the file is published with
    a hard link, so not even a concurrent writer that chose the same name can replace it. With
    ``idempotent`` a name whose shard is already recorded counts as this shard, written before:
    an executor that names a unit of work's shard by the work (Ray's retried batches) writes it once.

    ``add`` buffers tables and commits shards of ``shard_rows`` rows (the last one by ``flush``);
    ``commit`` writes one shard now.
    """

    def __init__(
        self,
        folder: Path,
        tag: str,
        shard_rows: int | None = None,
        start_seq: int = 0,
        idempotent: bool = False,
        **parquet_options: Any,
    ) -> None:
        self.folder, self.tag, self.shard_rows = Path(folder), tag, shard_rows
        self.idempotent = idempotent
        self._seq = start_seq
        self._buf: list[pa.Table] = []
        self._rows = 0
        self.written = 0  # rows in the shards this writer committed (or found committed, idempotent)
        self.shards: list[Path] = []
        parquet_options.setdefault("compression", "zstd")
        self._options = parquet_options

    def add(self, table: pa.Table) -> None:
        self._buf.append(table)
        self._rows += table.num_rows
        while self.shard_rows and self._rows >= self.shard_rows:
            self._commit_buffered(self.shard_rows)

    def flush(self) -> None:
        """Commit whatever is buffered."""
        if self._rows:
            self._commit_buffered(self._rows)

    def _commit_buffered(self, n: int) -> None:
        table = pa.concat_tables(self._buf)
        rest = table.slice(n)
        self._buf, self._rows = ([rest] if rest.num_rows else []), rest.num_rows
        self.commit(table.slice(0, n))

    def commit(self, table: pa.Table, nonfinite: int = 0, after: Callable[[Path], None] | None = None) -> Path:
        """One shard: the Parquet file (staged, fsynced, published under a free name), then
        ``after(shard)`` (e.g. its sidecar), then its record, last. A crash before the record leaves
        an unrecorded shard, which readers ignore and the next writer adopts or sets aside (``reconcile``)."""
        first = self.folder / shard_name(self.tag, self._seq)
        if self.idempotent and matches(first, read_record(first)):
            self._seq += 1
            return self._done(first, table.num_rows, "found committed already")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **self._options)
        data = memoryview(sink.getvalue())  # hashed from memory below: no read-back
        commits_dir(self.folder).mkdir(parents=True, exist_ok=True)  # from the first shard on, only recorded ones count
        names = (shard_name(self.tag, seq) for seq in itertools.count(self._seq))
        final = publish_new(_staged(data, first), self.folder, names)
        self._seq = _seq_of(final.name, self.tag) + 1
        if after is not None:
            after(final)
        mirror = mirror_of(final)
        if mirror is not None:  # a workspace in a bucket: the shard is one PUT before any record names it
            mirror.push([final])
        write_record(final, describe(data, final.name, table.num_rows, nonfinite))  # pushed as it is written
        return self._done(final, table.num_rows, "committed")

    def _done(self, shard: Path, rows: int, how: str) -> Path:
        self.shards.append(shard)
        self.written += rows
        log.debug("%s %s (%d rows)", how, shard.name, rows)
        return shard


def _staged(data: memoryview, first: Path) -> Path:
    """``data`` written and fsynced under the folder's staging folder, under a name no other writer
    uses (two writers may aim at the same shard name; only one publishes it)."""
    tmp = staging_dir(first.parent) / f"{first.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise disk_error(first, exc) from exc
    return tmp


def _seq_of(name: str, tag: str) -> int:
    return int(name[len(SHARD_PREFIX) + len(tag) + 1 :].split(".", 1)[0])


def write_record(shard: Path, record: ShardRecord) -> None:
    write_json_atomic(record.to_json(), record_path(shard))


def read_record(shard: Path) -> ShardRecord | None:
    try:
        return ShardRecord.from_json(json.loads(record_path(shard).read_bytes()))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Committed:
    """A folder's shards as readers see them: ``trusted`` (path, record; record None in a legacy
    folder), ``untrusted`` (unrecorded, or not matching their record), and whether it is legacy."""

    trusted: list[tuple[Path, ShardRecord | None]]
    untrusted: list[Path]
    legacy: bool

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.trusted]


def matches(shard: Path, record: ShardRecord | None) -> bool:
    """The cheap check: the file's size and footer are the recorded ones (no data read)."""
    if record is None or record.name != shard.name:
        return False
    try:
        size, footer = _file_footer(shard)
    except (OSError, ValueError):
        return False
    return size == record.bytes and sha256_bytes(footer) == record.footer_sha256


def list_committed(folder: Path, what: str = "") -> Committed:
    """The one place readers learn which shards of ``folder`` count; warns (once per run) naming
    the shards it leaves out, and once when the folder has no records at all (legacy)."""
    folder = Path(folder)
    shards = list_shards(folder)
    if not commits_dir(folder).is_dir():
        if shards:
            warn_once(
                f"{what or folder} was written before commit records existed: reading its "
                f"{len(shards)} shard(s) unchecked; the next writer records them"
            )
        return Committed([(p, None) for p in shards], [], legacy=True)
    trusted, untrusted = [], []
    for p in shards:
        rec = read_record(p)
        (trusted.append((p, rec)) if matches(p, rec) else untrusted.append(p))
    if untrusted:
        names = ", ".join(p.name for p in untrusted)
        warn_once(
            f"ignoring {len(untrusted)} shard(s) of {what or folder} that are not recorded as "
            f"committed or no longer match their record: {names}"
        )
    return Committed(trusted, untrusted, legacy=False)


def open_verified(shard: Path, what: str = "") -> pq.ParquetFile | None:
    """The shard read once into memory, its checksum compared with its record, then parsed; None
    (with a warning) when it no longer matches. A legacy folder's shards are not checked."""
    shard = Path(shard)
    data = shard.read_bytes()
    if commits_dir(shard.parent).is_dir():
        rec = read_record(shard)
        if rec is None or len(data) != rec.bytes or sha256_bytes(data) != rec.sha256:
            warn_once(
                f"ignoring {shard.name} of {what or shard.parent}: its data no longer matches its "
                "commit record (changed after it was committed)"
            )
            return None
    return pq.ParquetFile(pa.BufferReader(pa.py_buffer(data)))


def warn_once(message: str) -> None:
    """One warning per process for the same shards (``core.logs.warn_once``)."""
    logs.warn_once(log, "%s", message)


# ------------------------------------------------------------------------------- the writer's side


@dataclass(frozen=True)
class Adoptable:
    """What ``inspect`` found in an unrecorded shard that parses and carries the right identity:
    its row keys (image ids, or whole error rows) and its non-finite feature rows."""

    keys: pa.Array
    rows: int
    nonfinite: int = 0


@dataclass
class Reconciled:
    recorded: list[str] = field(default_factory=list)  # legacy shards given a record
    adopted: list[str] = field(default_factory=list)  # a dead writer's complete shards
    set_aside: list[str] = field(default_factory=list)  # moved to .rejected/

    def __bool__(self) -> bool:
        return bool(self.recorded or self.adopted or self.set_aside)


def reconcile(
    folder: Path,
    inspect: Callable[[Path], Adoptable | str],
    keys_of: Callable[[Path, ShardRecord], pa.Array],
    what: str = "",
) -> Reconciled:
    """Make every shard of ``folder`` recorded and matching (call with the folder's lock held).

    A legacy folder (no records yet): each shard that ``inspect`` accepts is recorded, as it is.
    Otherwise an unrecorded shard (a writer died between shard and record) is adopted when
    ``inspect`` accepts it and none of its keys is already in a recorded shard (a dead writer only
    wrote rows that were missing; a copy of a committed shard is not that). Every other shard, and one
    that no longer matches its record, is moved to ``<parent>/.rejected/<folder>/`` (never deleted),
    so the folder holds exactly its committed rows for raw readers too.
    """
    folder = Path(folder)
    out = Reconciled()
    cdir = commits_dir(folder)
    legacy = not cdir.is_dir()
    cdir.mkdir(parents=True, exist_ok=True)  # from now on, only recorded shards count
    for p in cdir.glob("*" + TMP_SUFFIX):
        p.unlink(missing_ok=True)
    shards = list_shards(folder)
    pending = []
    for p in shards:
        rec = read_record(p)
        if not legacy and rec is not None and matches(p, rec):
            continue
        if not legacy and rec is not None:  # recorded, but changed since
            _set_aside(p, out, what, "it no longer matches its commit record")
            continue
        pending.append(p)
    known: set[str] | None = None
    for p in pending:
        found = _inspect(p, inspect) if _regular(p) else "it is not a regular file"
        if isinstance(found, str):
            _set_aside(p, out, what, found)
            continue
        if not legacy:
            if known is None:
                known = set()
                for q in shards:
                    rec = read_record(q)
                    if q not in pending and rec is not None and q.exists():
                        known.update(keys_of(q, rec).to_pylist())
            if any(k in known for k in found.keys.to_pylist()):
                _set_aside(p, out, what, "it repeats rows of committed shards")
                continue
            known.update(found.keys.to_pylist())
        write_record(p, describe(memoryview(p.read_bytes()), p.name, found.rows, found.nonfinite))
        (out.recorded if legacy else out.adopted).append(p.name)
    for rec_file in cdir.glob("*" + RECORD_SUFFIX):  # records of shards that are gone
        if not (folder / rec_file.name[: -len(RECORD_SUFFIX)]).exists():
            rec_file.unlink(missing_ok=True)
    if out.recorded:
        log.info("recorded %d shard(s) of %s written before commit records existed", len(out.recorded), what or folder)
    if out.adopted:
        log.info(
            "adopted %d complete shard(s) of %s that an interrupted run left unrecorded: %s",
            len(out.adopted),
            what or folder,
            ", ".join(out.adopted),
        )
    return out


def _regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        return False


def _inspect(p: Path, inspect: Callable[[Path], Adoptable | str]) -> Adoptable | str:
    try:
        return inspect(p)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return f"it cannot be read ({exc})"


def _set_aside(p: Path, out: Reconciled, what: str, why: str) -> None:
    dest_dir = rejected_dir(p.parent)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / p.name
    k = 1
    while dest.exists():
        dest, k = dest_dir / f"{p.name}.{k}", k + 1
    os.replace(p, dest)
    with contextlib.suppress(OSError):
        record_path(p).unlink()
    out.set_aside.append(p.name)
    log.warning("moved %s out of %s to %s: %s", p.name, what or p.parent, dest, why)
