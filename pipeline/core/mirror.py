"""A workspace in a bucket (``--workspace s3://bucket/prefix``): a local mirror that every stage
reads and writes as it does any workspace folder, kept in step with the bucket.

- **The bucket is the workspace; the mirror is a cache.** Each machine (each Ray worker) keeps
  its own mirror under ``$IMGFEAT_CACHE/workspaces/<scheme>/<bucket>/<prefix>`` (default
  ``~/.cache/imgfeat``); nothing but the bucket is shared.
- **Pull** when a command starts and again when a stage takes a lock: the objects that are new or
  changed in the bucket (ETag) are downloaded; those deleted from the bucket are deleted here.
- **Push as it is committed, shard first.** A shard is one PUT under its unique final name, made
  before the local commit record is written; every file written atomically (records, manifest,
  provenance, heads, names, runs) is pushed as soon as it is in place. So the bucket never holds
  a record without its shard and always holds at least what this mirror has committed. When a
  stage's lock is released and when the command ends, whatever is left is pushed, and what this
  mirror deleted (set-aside shards, pruned tables) is deleted from the bucket.
  Staging files, temporary files and this module's own state never leave the machine.
- **Locks** are objects under ``.locks/`` created with a conditional write (If-None-Match),
  holding the holder and a lease that the live holder renews; a second writer is refused naming
  the holder (or waits, ``--wait``); a dead holder's lease is taken over once it has expired, by
  a conditional write on the lock's ETag, so two takers cannot both win.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgfeat.core.errors import ConfigError, ImgfeatError, LockBusyError
from imgfeat.core.stores import (
    Location,
    StorageUnavailable,
    cache_dir,
    check_root,
    explain,
    list_objects,
    open_store,
)

log = logging.getLogger(__name__)

STATE_DIR = ".mirror"  # in the mirror root: never pushed
LOCKS_PREFIX = ".locks/"
# A lock's lease, renewed every third of it while its holder lives; a dead holder's lock is free
# this long after its last renewal. IMGFEAT_LOCK_LEASE_S sets it (seconds, 2 to 600).
DEFAULT_LEASE_SECONDS = 30.0
LEASE_ENV = "IMGFEAT_LOCK_LEASE_S"


def lease_seconds() -> float:
    """The lock lease: IMGFEAT_LOCK_LEASE_S, else 30 s; ConfigError naming the variable when bad."""
    text = os.environ.get(LEASE_ENV, "").strip()
    if not text:
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 2 <= value <= 600:
        raise ConfigError(f"{LEASE_ENV}={text!r}: a lock lease is a number of seconds from 2 to 600")
    return value


TRANSFERS = 16  # concurrent PUTs / GETs of one sync
_NEVER_PUSHED = (".staging", STATE_DIR, ".locks")

_registry: dict[Path, Mirror] = {}
_registry_lock = threading.Lock()


def mirror_root(loc: Location) -> Path:
    """This machine's mirror of the workspace at ``loc``."""
    base = cache_dir().parent / "workspaces" / loc.scheme / loc.bucket
    return base.joinpath(*loc.prefix.split("/")) if loc.prefix else base / "_bucket"


def open_mirror(loc: Location, root: Path | None = None) -> Mirror:
    """The mirror of the workspace at ``loc`` (one per process; ``root``: a working folder of its
    own, e.g. a Ray worker's), registered so that locks and commits under its root know their bucket."""
    root = mirror_root(loc) if root is None else Path(root)
    with _registry_lock:
        found = _registry.get(root)
        if found is None:
            found = _registry[root] = Mirror(loc, root)
        return found


def mirror_of(path: Path) -> Mirror | None:
    """The mirror whose root holds ``path``, if it is in one."""
    if not _registry:
        return None
    path = Path(path)
    with _registry_lock:
        for root, mirror in _registry.items():
            if path == root or root in path.parents:
                return mirror
    return None


def forget_mirrors() -> None:
    """Tests: a fresh registry."""
    with _registry_lock:
        _registry.clear()


@dataclass
class _Entry:
    size: int
    mtime_ns: int
    etag: str | None


@dataclass
class Mirror:
    remote: Location
    root: Path
    _checked: bool = field(default=False, repr=False)

    # ------------------------------------------------------------------ state

    @property
    def state_file(self) -> Path:
        return self.root / STATE_DIR / "state.json"

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, _Entry]]:
        """The sync state (rel -> what was last synced), under a lock shared by this machine's
        processes; saved atomically on leaving."""
        (self.root / STATE_DIR).mkdir(parents=True, exist_ok=True)
        with open(self.root / STATE_DIR / "sync.lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                state = self._load()
                yield state
                self._save(state)
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _load(self) -> dict[str, _Entry]:
        try:
            raw = json.loads(self.state_file.read_text())
            return {k: _Entry(int(v[0]), int(v[1]), v[2]) for k, v in raw.items()}
        except (OSError, ValueError, TypeError, IndexError):
            return {}

    def _save(self, state: dict[str, _Entry]) -> None:
        tmp = self.state_file.with_name(f"state.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(json.dumps({k: [e.size, e.mtime_ns, e.etag] for k, e in sorted(state.items())}))
        os.replace(tmp, self.state_file)

    def store(self) -> Any:
        """The obstore store of the workspace's bucket (keys below are full keys, prefix included)."""
        return open_store(Location(self.remote.scheme, self.remote.bucket, ""))

    # ------------------------------------------------------------------ paths

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def key(self, rel: str) -> str:
        return self.remote.key(rel)

    @staticmethod
    def pushable(rel: str) -> bool:
        parts = rel.split("/")
        return not any(p in _NEVER_PUSHED for p in parts) and not parts[-1].endswith(".tmp")

    # ------------------------------------------------------------------ sync

    def check(self) -> None:
        """Fail fast (ConfigError, one line) when the bucket cannot be listed."""
        if not self._checked:
            check_root(self.remote, "workspace")
            self._checked = True

    def pull(self) -> int:
        """``_pull``; the local disk's failures (full, read-only, missing) said in one line."""
        with self._local_disk():
            return self._pull()

    def push(self, paths: Iterable[Path] | None = None) -> int:
        """``_push``; the local disk's failures said in one line."""
        with self._local_disk():
            return self._push(paths)

    @contextlib.contextmanager
    def _local_disk(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only"}.get(
                exc.errno or 0, exc.strerror or str(exc)
            )
            raise ImgfeatError(
                f"cannot use this machine's mirror of {self.remote.uri} at {self.root}: {reason} "
                f"({exc.filename or self.root}); set IMGFEAT_CACHE to a writable folder with room"
            ) from None

    def _pull(self) -> int:
        """Download what is new or changed in the bucket; delete here what the bucket no longer has
        (unless changed here since). Returns the files downloaded."""
        self.check()
        self.root.mkdir(parents=True, exist_ok=True)
        remote: dict[str, tuple[int, str | None]] = {}
        for page in list_objects(self.remote):
            for obj in page:
                if obj.rel.startswith(LOCKS_PREFIX) or not self.pushable(obj.rel):
                    continue
                remote[obj.rel] = (obj.size, obj.etag)
        with self._state() as state:
            todo = []
            for rel, (_size, etag) in remote.items():
                entry = state.get(rel)
                if entry is not None and entry.etag == etag and _same(self.root / rel, entry):
                    continue
                todo.append(rel)
            with ThreadPoolExecutor(TRANSFERS, thread_name_prefix="imgfeat-pull") as pool:
                for rel, entry in zip(todo, pool.map(self._download, todo)):
                    state[rel] = entry
            for rel in [r for r in state if r not in remote]:
                entry = state.pop(rel)
                local = self.root / rel
                if _same(local, entry):  # deleted in the bucket, unchanged here: delete here too
                    local.unlink(missing_ok=True)
        if todo:
            log.debug("pulled %d file(s) of %s", len(todo), self.remote.uri)
        return len(todo)

    def _download(self, rel: str) -> _Entry:
        import obstore

        store = self.store()
        key = self.key(rel)
        local = self.root / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.pull.tmp")
        try:
            result = obstore.get(store, key)
            etag = result.meta.get("e_tag")
            with open(tmp, "wb") as fh:
                for chunk in result.stream(min_chunk_size=8 << 20):
                    fh.write(chunk)
            os.replace(tmp, local)
        except OSError:  # the local disk (full, read-only): said as it is
            raise
        except Exception as exc:  # noqa: BLE001 - obstore's errors
            raise StorageUnavailable(f"cannot pull the workspace: {explain(exc, self.remote / rel)}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        st = local.stat()
        return _Entry(st.st_size, st.st_mtime_ns, etag)

    def _push(self, paths: Iterable[Path] | None = None) -> int:
        """Upload what changed here since the last sync (``paths``: only those, in order); delete
        from the bucket what this mirror deleted. Returns the files uploaded."""
        if not self.root.is_dir():
            return 0
        with self._state() as state:
            if paths is None:
                rels = sorted((r for r in _walk(self.root) if self.pushable(r)), key=_push_order)
                gone = [r for r in state if not (self.root / r).exists()]
            else:
                rels, gone = [self.rel(p) for p in paths], []
            todo = [r for r in rels if self.pushable(r) and not _same(self.root / r, state.get(r))]
            # data first, then commit records, then names and run records: in waves, so a reader
            # of the bucket never finds a record before its shard
            for wave in _waves(todo):
                with ThreadPoolExecutor(TRANSFERS, thread_name_prefix="imgfeat-push") as pool:
                    for rel, entry in zip(wave, pool.map(self._upload, wave)):
                        if entry is not None:
                            state[rel] = entry
            for rel in gone:
                self._delete(rel)
                state.pop(rel, None)
        return len(todo)

    def _upload(self, rel: str) -> _Entry | None:
        import obstore

        local = self.root / rel
        try:
            st = local.stat()
            data = local.read_bytes()
        except FileNotFoundError:
            return None  # removed meanwhile (a later push deletes it)
        store = self.store()
        try:
            result = obstore.put(store, self.key(rel), data)
        except Exception as exc:  # noqa: BLE001
            raise StorageUnavailable(f"cannot push to the workspace: {explain(exc, self.remote / rel)}") from None
        return _Entry(st.st_size, st.st_mtime_ns, result.get("e_tag"))

    def _delete(self, rel: str) -> None:
        import obstore

        store = self.store()
        try:
            obstore.delete(store, self.key(rel))
        except Exception as exc:  # noqa: BLE001
            raise StorageUnavailable(f"cannot delete from the workspace: {explain(exc, self.remote / rel)}") from None

    # ------------------------------------------------------------------ counters

    def count(self, rel_prefix: str) -> int:
        """One more mark under ``rel_prefix`` (an object of its own: no read-modify-write race
        between machines); returns how many marks there are now."""
        import obstore

        store = self.store()
        prefix = self.key(rel_prefix.rstrip("/"))
        try:
            obstore.put(store, f"{prefix}/{uuid.uuid4().hex}", b".")
            return sum(len(page) for page in obstore.list(store, prefix=prefix + "/"))
        except Exception as exc:  # noqa: BLE001
            raise StorageUnavailable(f"cannot count attempts: {explain(exc, self.remote / rel_prefix)}") from None

    def remove_prefix(self, rel_prefix: str) -> None:
        import obstore

        store = self.store()
        prefix = self.key(rel_prefix.rstrip("/")) + "/"
        with contextlib.suppress(Exception):
            for page in obstore.list(store, prefix=prefix):
                obstore.delete(store, [m["path"] for m in page])

    # ------------------------------------------------------------------ locks

    def lock(self, path: Path, what: str, wait: float | None) -> RemoteLock:
        return RemoteLock(self, LOCKS_PREFIX + Path(path).name, what, wait)


def _same(path: Path, entry: _Entry | None) -> bool:
    if entry is None:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns


def _walk(root: Path) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _NEVER_PUSHED]
        base = Path(folder).relative_to(root)
        for name in files:
            yield (base / name).as_posix()


def _push_order(rel: str) -> tuple[int, str]:
    return (_wave_of(rel), rel)


def _wave_of(rel: str) -> int:
    if "/.commits/" in f"/{rel}":
        return 1
    if rel.startswith(("names/", "runs/")):
        return 2
    return 0


def _waves(rels: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[], [], []]
    for r in rels:
        out[_wave_of(r)].append(r)
    return [w for w in out if w]


# ---------------------------------------------------------------------- locks


class RemoteLock:
    """A lock object in the bucket: created only if absent (If-None-Match), holding its holder and
    a lease; renewed by a thread every third of the lease with a write conditional on its ETag;
    taken over, by the same conditional write, once the lease has expired."""

    def __init__(self, mirror: Mirror, rel: str, what: str, wait: float | None) -> None:
        self.mirror, self.rel, self.what, self.wait = mirror, rel, what, wait
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.lease = lease_seconds()

    def _store(self) -> Any:
        return self.mirror.store()

    def _body(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "what": self.what, "expires": time.time() + self.lease, "lease_s": self.lease}
        ).encode()

    def acquire(self) -> RemoteLock:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        key = self.mirror.key(self.rel)
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while True:
            try:
                self._etag = obstore.put(self._store(), key, self._body(), mode="create").get("e_tag")
                break
            except AlreadyExistsError:
                pass
            except Exception as exc:  # noqa: BLE001
                raise StorageUnavailable(
                    f"cannot take the lock: {explain(exc, self.mirror.remote / self.rel)}"
                ) from None
            holder, expires, etag = self._read(key)
            if etag is not None and expires is not None and expires < time.time():
                try:  # an expired lease: take it over, unless someone else just did
                    self._etag = obstore.put(self._store(), key, self._body(), mode={"e_tag": etag}).get("e_tag")
                    log.warning("took over the lock on %s: %s's lease had expired", self.what, holder)
                    break
                except (PreconditionError, AlreadyExistsError):
                    continue
                except Exception as exc:  # noqa: BLE001
                    raise StorageUnavailable(
                        f"cannot take the lock: {explain(exc, self.mirror.remote / self.rel)}"
                    ) from None
            if etag is None:  # released meanwhile
                continue
            if deadline is None or time.monotonic() >= deadline:
                left = "" if expires is None else f", its lease ends in {max(0.0, expires - time.time()):.0f} s"
                waited = f" (waited {self.wait:g} s)" if self.wait else ""
                raise LockBusyError(
                    f"{self.what} is being written by {holder or 'another process'}{left}{waited}; "
                    f"try again when it has finished, or pass --wait SECONDS. Lock: {self.mirror.remote / self.rel}"
                )
            time.sleep(min(1.0, self.lease / 10))
        self._thread = threading.Thread(target=self._renew, name="imgfeat-lease", daemon=True)
        self._thread.start()
        return self

    def _read(self, key: str) -> tuple[str | None, float | None, str | None]:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            got = obstore.get(self._store(), key)
            body = json.loads(bytes(got.bytes()) or b"{}")
            return str(body.get("holder")), float(body.get("expires", 0)), got.meta.get("e_tag")
        except NotFoundError:
            return None, None, None
        except (ValueError, TypeError):
            return "an unreadable lock", 0.0, None
        except Exception as exc:  # noqa: BLE001
            raise StorageUnavailable(f"cannot read the lock: {explain(exc, self.mirror.remote / self.rel)}") from None

    def _renew(self) -> None:
        import obstore

        key = self.mirror.key(self.rel)
        while not self._stop.wait(self.lease / 3):
            try:
                self._etag = obstore.put(self._store(), key, self._body(), mode={"e_tag": self._etag}).get("e_tag")
            except Exception as exc:  # noqa: BLE001 - a lost lease is said, the work goes on
                self.lost = True
                log.error("lost the lock on %s (%s): another writer may have taken it over", self.what, exc)
                return

    def release(self) -> None:
        import obstore

        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._etag is not None and not self.lost:
            with contextlib.suppress(Exception):
                obstore.delete(self._store(), self.mirror.key(self.rel))
        self._etag = None
