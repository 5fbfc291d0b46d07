"""The commit protocol: atomic file writes, advisory locks, shard names and listing, and deletion
that never follows a symbolic link."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.core.errors import ConfigError, ImgfeatError, LockBusyError
from imgfeat.core.mirror import RemoteLock, mirror_of

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
# Polars, DuckDB, pyarrow and Spark read every file of a folder they are given (Polars and DuckDB
# hidden files and subfolders too), so a Parquet file is written outside its table folder, in
# <folder's parent>/.staging/<folder>/, and renamed into it: a reader never meets a half-written file.
STAGING_DIR = ".staging"
SHARD_PREFIX = "part-"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def disk_error(path: Path, exc: OSError) -> ImgfeatError:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(exc.errno or 0, exc.strerror or str(exc))  # an OSError without an errno: none of these
    return ImgfeatError(f"cannot write {path}: {reason}")


def scratch_file(folder: Path | None) -> IO[bytes]:
    """An unnamed temporary file under ``folder`` (the system's temp folder when None), for data
    too big for memory: it has no name, so it is gone when closed, even after a crash. A disk that
    cannot hold it is ``disk_error``'s one line, as are the writes inside ``scratch_writes``."""
    where = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    with scratch_writes(where):
        where.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryFile(dir=where)


@contextlib.contextmanager
def scratch_writes(folder: Path) -> Iterator[None]:
    """Writes to a scratch file under ``folder``: a full or read-only disk becomes ``disk_error``."""
    try:
        yield
    except OSError as exc:
        raise disk_error(Path(folder) / "(scratch file)", exc) from exc


def temp_path(final: Path) -> Path:
    """Where ``final`` is written before its commit: ``<final>.tmp`` beside it, or for a Parquet
    file (one part of a table folder) the same name under the staging folder beside it."""
    final = Path(final)
    if final.suffix != ".parquet":
        return final.with_name(final.name + TMP_SUFFIX)
    return staging_dir(final.parent) / (final.name + TMP_SUFFIX)


def staging_dir(folder: Path) -> Path:
    return Path(folder).parent / STAGING_DIR / Path(folder).name


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path (``temp_path``) to write; on success fsync it and ``os.replace`` it into place.

    On any failure the temporary file is removed, so readers only ever see complete files.
    """
    final = Path(final)
    tmp = temp_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if tmp.is_symlink():  # planted: writing through it would write outside, renaming it would commit it
            tmp.unlink()
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise disk_error(final, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    mirror = mirror_of(final)
    if mirror is not None:  # a workspace in a bucket: a file counts once it is there too
        mirror.push([final])


def write_bytes_atomic(data: bytes, final: Path) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def write_json_atomic(obj: object, final: Path) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return write_bytes_atomic(text.encode("utf-8"), final)


def write_table_atomic(table: pa.Table, final: Path, **parquet_options: Any) -> Path:
    """Write a Parquet file under the commit protocol (zstd unless told otherwise)."""
    parquet_options.setdefault("compression", "zstd")
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, **parquet_options)
    return Path(final)


def write_parts_atomic(parts: Iterable[pa.Table], schema: pa.Schema, final: Path) -> Path:
    """``write_table_atomic`` for a table made a part at a time (each part cast to ``schema``, a
    row group or more each): only one part is in memory at once."""
    with atomic_path(final) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for part in parts:
            writer.write_table(part.cast(schema))
    return Path(final)


def publish_new(tmp: Path, folder: Path, names: Iterable[str]) -> Path:
    """Move a complete, fsynced temporary file into ``folder`` under the first of ``names`` that is not
    taken, and return its path: a hard link, which fails where ``os.replace`` would overwrite, so a
    committed file is never replaced, even by a concurrent writer choosing the same name."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            final = folder / name
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                    raise
                if final.exists() or final.is_symlink():  # no hard links here: check, then rename
                    continue
                os.replace(tmp, final)
            tmp.unlink(missing_ok=True)
            _fsync_dir(folder)
            return final
        raise ImgfeatError(f"no free shard name left in {folder}")
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise disk_error(folder, exc) from exc


def shard_name(tag: str, seq: int, suffix: str = ".parquet") -> str:
    """``part-<tag>-<seq>.parquet``: the tag (the run id; a featureset's adds the extract call,
    see ``next_shard_tag``) keeps concurrent or resumed runs, and one run's calls, apart."""
    return f"{SHARD_PREFIX}{tag}-{seq:05d}{suffix}"


def list_shards(folder: Path, suffix: str = ".parquet") -> list[Path]:
    """Committed shards in a folder, oldest run first; temporary files are never listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(SHARD_PREFIX) and p.name.endswith(suffix))


def recorded_file(folder: Path, name: object, record: Path) -> Path:
    """``folder/name`` for a file name that ``record`` (a JSON file we wrote) names: a plain name
    inside the folder (no separator, no '..'), a regular file and not a symbolic link; else an
    ImgfeatError naming the record. Never follows the record out of its folder, or into a FIFO."""
    if not (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")):
        raise ImgfeatError(f"{record} names the file {name!r}, which is not a plain file name in {folder}")
    if Path(folder).is_symlink():
        raise ImgfeatError(f"{folder} (where {record} names its files) is a symbolic link, not a folder")
    path = Path(folder) / name
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise ImgfeatError(f"{record} names {path}, which does not exist") from None
    except OSError as exc:
        raise ImgfeatError(f"cannot read {path} (named in {record}): {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise ImgfeatError(f"{record} names {path}, which is {what}")
    return path


def read_shards(
    paths: Iterable[Path], columns: list[str] | None = None, schema: pa.Schema | None = None
) -> pa.Table | None:
    """Concatenate committed shards (only ``columns`` when given); None when there are none.

    ``ParquetFile.read`` rather than ``pq.read_table``: the latter imports pyarrow.dataset and
    pandas (~0.8 s), a cost every no-op rerun would pay just to list what is done.
    """
    tables = [read_shard(p, columns) for p in paths]
    if schema is not None:
        tables = [t.cast(schema) for t in tables]
    return pa.concat_tables(tables) if tables else None


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One committed shard (only ``columns`` when given); ImgfeatError when it is damaged."""
    try:
        return pq.ParquetFile(path).read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise ImgfeatError(
            f"cannot read {path}: {str(exc).rstrip('.')}; the file is damaged: delete it and run the "
            "command that wrote it again (extract and predict write only what is missing)"
        ) from None


def column_values(paths: Iterable[Path], column: str) -> list[Any]:
    """One column of every shard, nulls left out (e.g. the ids a folder already holds)."""
    table = read_shards(paths, [column])
    return [] if table is None else [v for v in table.column(column).to_pylist() if v is not None]


def linked_folder(path: Path, root: Path) -> Path | None:
    """The first folder on the way from ``root`` (not itself checked) down to ``path``'s parent that
    is a symbolic link, or None: a file under such a folder lies outside ``root``'s tree."""
    path, root = Path(path), Path(root)
    try:
        parts = path.parent.relative_to(root).parts
    except ValueError:
        return path.parent
    here = root
    for part in parts:
        here = here / part
        if here.is_symlink():
            return here
    return None


def remove_file(path: Path, root: Path) -> bool:
    """Delete one file under ``root`` (a link: the link itself), unless a folder on its way is a
    link, which is never followed: True when something was deleted."""
    if linked_folder(path, root) is not None:
        log.warning("not deleting %s: a folder on its way is a symbolic link", path)  # see remove_tree
        return False
    try:
        Path(path).unlink()
        return True
    except FileNotFoundError:
        return False


def remove_tree(path: Path, root: Path) -> bool:
    """Delete a folder under ``root`` and everything in it; a symbolic link (to a folder or not)
    is removed itself, never what it points to. Nothing is deleted when a folder on the way from
    ``root`` is a link (what lies beyond it is not the workspace's to delete)."""
    path = Path(path)
    linked = linked_folder(path, root)
    if linked is not None:
        log.warning("not deleting %s: %s on its way is a symbolic link", path, linked)
        return False
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)  # rmtree unlinks links inside, never follows them
    else:
        return False
    return True


def remove_stale_tmp(folder: Path) -> int:
    """Delete ``*.tmp`` left by a crashed writer, in the folder and its staging folder; call only
    while holding the folder's lock. A folder that is a link is left alone (rglob follows no link
    below it)."""
    removed = 0
    for where in (Path(folder), staging_dir(folder)):
        if where.is_dir() and not where.is_symlink():
            for p in where.rglob("*" + TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
    return removed


def check_wait(wait: float | None, what: str = "wait") -> float | None:
    """A lock wait in seconds (None: fail fast): finite and 0 or more, else a ConfigError naming it.

    NaN would never reach the deadline (every comparison with it is false): a silent hang.
    """
    if wait is None:
        return None
    ok = isinstance(wait, (int, float)) and not isinstance(wait, bool) and math.isfinite(wait) and wait >= 0
    if not ok:
        raise ConfigError(f"{what} must be a finite number of seconds, 0 or more, got {wait!r}")
    return float(wait)


# What a stage's lock message suggests to commands that have a --wait flag.
WAIT_HINT = "or pass --wait SECONDS to wait for it"


class FileLock:
    """An advisory ``fcntl.flock`` lock on a file; released when the process dies.

    ``wait=None`` fails fast; ``wait=seconds`` (finite, 0 or more: ``check_wait``) polls until free.
    The lock file is opened without following a link (a link there is an error); one this lock
    created is removed again when the work under it is refused (a ConfigError).
    ``hint`` ends the busy message (e.g. WAIT_HINT, for commands that have ``--wait``).
    Disk-full, read-only and permission errors are ImgfeatErrors naming the lock file.
    """

    def __init__(self, path: Path, what: str, wait: float | None = None, hint: str = "") -> None:
        self.path = Path(path)
        self.what = what
        self.wait = check_wait(wait)
        self.hint = hint
        self._fd: int | None = None
        self.created = False
        self._remote: RemoteLock | None = None

    def acquire(self) -> FileLock:
        while True:
            fd, created = self._open()
            try:
                self._wait_for(fd)
                if self._still_the_file(fd):  # not unlinked by a refused run while we waited
                    os.ftruncate(fd, 0)
                    os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
                    break
            except BaseException as exc:
                os.close(fd)
                if isinstance(exc, OSError):
                    raise _lock_error(self.path, exc) from exc
                raise
            os.close(fd)
        self._fd, self.created = fd, created
        mirror = mirror_of(self.path)
        if mirror is not None:  # a workspace in a bucket: its lock object too, then what others committed
            try:
                self._remote = mirror.lock(self.path, self.what, self.wait).acquire()
                mirror.pull()
            except BaseException:
                self.release()
                raise
        return self

    def _open(self) -> tuple[int, bool]:
        """The lock file's descriptor, and whether this call created it."""
        # O_NOFOLLOW: a link planted where a lock file goes must not have us write through it.
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                return os.open(self.path, flags), False
        except FileNotFoundError:
            return self._open()  # removed between the two opens: create it again
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ImgfeatError(
                    f"cannot take the lock: {self.path} is a symbolic link; lock files are "
                    "never followed: remove the link and run again"
                ) from None
            raise _lock_error(self.path, exc) from exc

    def _still_the_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _wait_for(self, fd: int) -> None:
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if deadline is None or time.monotonic() >= deadline:
                    raise LockBusyError(self._busy_message()) from None
                time.sleep(0.2)

    def _busy_message(self) -> str:
        waited = f" (waited {self.wait:g} s)" if self.wait else ""
        then = f", {self.hint}" if self.hint and not self.wait else ""
        return (
            f"{self.what} is being written by another process{_read_holder(self.path)}{waited}; "
            f"try again when it has finished{then}. Lock file: {self.path}"
        )

    def release(self, remove: bool = False) -> None:
        """Unlock; ``remove``: delete the lock file first (safe: a waiter checks that the file it
        locked is still the one at the path, see ``acquire``)."""
        if self._remote is not None:
            remote, self._remote = self._remote, None
            try:
                mirror_of(self.path).push()  # type: ignore[union-attr]  # what the stage wrote, before others may
            finally:
                remote.release()
        if self._fd is not None:
            if remove:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # A run refused under a lock it created leaves no lock file behind: the workspace as it was.
        self.release(remove=self.created and exc_type is not None and issubclass(exc_type, ConfigError))


def _lock_error(path: Path, exc: OSError) -> ImgfeatError:
    err = disk_error(path, exc)
    return ImgfeatError(
        f"cannot take the lock: {err}"
        + (
            "; free some space and run again"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "; the workspace must be writable"
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            else ""
        )
    )


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f" (pid {info['pid']})" if "pid" in info else ""
    except (OSError, ValueError, KeyError):
        return ""
