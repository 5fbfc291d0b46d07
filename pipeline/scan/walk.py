"""Walking an image folder: deterministic order, hidden files skipped, symlinks kept inside the root."""

from __future__ import annotations

import errno
import logging
import operator
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from imgfeat.scan.probe import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# Reasons a directory entry is not a manifest row (keys of WalkStats.skipped).
SKIP_HIDDEN = "hidden"
SKIP_NON_IMAGE = "non_image"
SKIP_OUTSIDE_ROOT = "link_outside_root"
SKIP_LOOP = "link_loop"
SKIP_LINKED_DIR = "link_to_scanned_dir"  # a folder link whose target is inside the root anyway
SKIP_UNLISTABLE = "unlistable_dir"
SKIP_SPECIAL = "special_file"  # sockets, FIFOs, devices: reading one could block for ever

_by_name = operator.attrgetter("name")


def _pseudo_devices() -> frozenset[int]:
    """Device ids of /proc and /sys: their 'regular' files (/proc/self/pagemap) are endless or
    change on every read, so a followed link to one is skipped like a FIFO, never opened."""
    out = set()
    for path in ("/proc", "/sys"):
        try:
            out.add(os.stat(path).st_dev)
        except OSError:
            pass
    return frozenset(out)


PSEUDO_DEVICES = _pseudo_devices()
GROUP_FILES = 512  # files handed on at once from a big folder


@dataclass(frozen=True)
class WalkOptions:
    follow_links: bool = False  # follow symlinks whose target is outside the root
    keep_non_images: bool = False  # probe files without an image extension too


class FileEntry(NamedTuple):
    """A file to put in the manifest: where it is and what ``stat`` said (or why it could not).

    A NamedTuple, not a dataclass: a rescan makes one per file and little else.
    """

    rel: str  # POSIX, relative to the root, names kept as they are
    abs: str
    size: int | None
    mtime_ns: int | None
    stat_error: str | None = None
    etag: str | None = None  # an object's ETag (a bucket's listing); None for a local file


@dataclass
class WalkStats:
    skipped: Counter = field(default_factory=Counter)
    dirs: int = 0


def walk(root: str, opts: WalkOptions, stats: WalkStats) -> Iterator[FileEntry]:
    """Yield files under ``root`` depth-first, each directory's entries sorted by name."""
    for segment in walk_segments(root, opts, stats):
        yield from segment


def walk_segments(root: str, opts: WalkOptions, stats: WalkStats) -> Iterator[list[FileEntry]]:
    """``walk`` in runs of consecutive files of one folder (cheaper than one yield per file).

    Links to folders inside the root are not entered (their files are scanned where they
    are), which also cuts every cycle; links leaving the root are skipped (counted) unless
    ``follow_links``, and then each target folder is entered once.
    """
    real_root = os.path.realpath(root)
    for prefix, entries in _walk_dir(root, "", _Walk(real_root, opts, stats, {real_root})):
        yield entries if prefix is None else _stat_group(prefix, entries, stats)


def _stat_group(prefix: str, entries: list[os.DirEntry], stats: WalkStats) -> list[FileEntry]:
    """A FileEntry for each candidate (one ``stat`` each); sockets, FIFOs and devices are skipped."""
    files: list[FileEntry] = []
    append, is_reg = files.append, stat.S_ISREG  # a rescan's hot loop: one pass per file
    pseudo = PSEUDO_DEVICES
    for entry in entries:
        if not (entry.name.isascii() and prefix.isascii()) and not _utf8(prefix + entry.name):
            append(_bad_name(prefix + entry.name, entry.path))
            continue
        try:
            st = entry.stat()
        except OSError as exc:
            reason = _stat_failure(entry, exc)
            append(FileEntry(prefix + entry.name, entry.path, None, None, f"cannot stat the file: {reason}"))
            continue
        if is_reg(st.st_mode) and st.st_dev not in pseudo:
            append(FileEntry(prefix + entry.name, entry.path, st.st_size, st.st_mtime_ns))
        else:
            stats.skipped[SKIP_SPECIAL] += 1
    return files


def _stat_failure(entry: os.DirEntry, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop (the link leads back to itself)"
    return "a broken symbolic link" if entry.is_symlink() else (exc.strerror or str(exc))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _bad_name(rel: str, path: str) -> FileEntry:
    """A name that is not UTF-8 cannot be a Parquet string: a row with the bytes escaped, unreadable."""
    shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return FileEntry(shown, path, None, None, "the file name is not valid UTF-8; rename the file to scan it")


@dataclass
class _Walk:
    real_root: str
    opts: WalkOptions
    stats: WalkStats
    seen: set[str]


def _walk_dir(folder: str, prefix: str, w: _Walk) -> Iterator[tuple[str | None, list]]:
    """(prefix, candidate files) groups in walk order, not yet stat'ed; (None, [row]) for a
    folder that cannot be listed.

    Iterative (a stack of open folders), so a tree nested thousands deep cannot reach
    Python's recursion limit.
    """
    stack = [_open_dir(folder, prefix, w)]
    while stack:
        top = stack[-1]
        if isinstance(top, FileEntry):  # an unlistable folder: one row saying so
            stack.pop()
            yield None, [top]
            continue
        prefix, entries = top
        files: list[os.DirEntry] = []
        keep_all, skipped = w.opts.keep_non_images, w.stats.skipped
        for entry in entries:
            name = entry.name
            if name[0] != "." and not entry.is_symlink() and not entry.is_dir():
                # The common case inline (a plain file): a rescan spends most of its time here.
                dot = name.rfind(".")
                if keep_all or (dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS):
                    files.append(entry)
                else:
                    skipped[SKIP_NON_IMAGE] += 1
            elif _classify(entry, w, files):
                if files:
                    yield prefix, files
                    files = []
                stack.append(_open_dir(entry.path, prefix + entry.name + "/", w))
                break
            elif len(files) >= GROUP_FILES:
                yield prefix, files
                files = []
        else:
            stack.pop()
        if files:
            yield prefix, files


def _open_dir(folder: str, prefix: str, w: _Walk) -> tuple[str, Iterator[os.DirEntry]] | FileEntry:
    """A folder's entries sorted by name, or the row that says it cannot be listed."""
    w.stats.dirs += 1
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=_by_name)
    except OSError as exc:
        # Its files cannot even be named: the folder itself becomes an unreadable row.
        reason = exc.strerror or str(exc)
        log.warning("cannot list folder %s: %s", folder, reason)
        w.stats.skipped[SKIP_UNLISTABLE] += 1
        rel = prefix.rstrip("/") or "."
        return FileEntry(rel, folder, None, None, f"cannot list the folder: {reason}; its files are not scanned")
    return prefix, iter(entries)


def _classify(entry: os.DirEntry, w: _Walk, files: list[os.DirEntry]) -> bool:
    """Append a candidate file to ``files`` or count a skip; True for a directory to enter."""
    if entry.name[0] == ".":
        w.stats.skipped[SKIP_HIDDEN] += 1
        return False
    if entry.is_symlink():
        return _classify_link(entry, w, files)
    if entry.is_dir():
        return True
    _append_if_image(entry, w, files)
    return False


def _classify_link(entry: os.DirEntry, w: _Walk, files: list[os.DirEntry]) -> bool:
    target = os.path.realpath(entry.path)
    inside = target == w.real_root or target.startswith(w.real_root.rstrip(os.sep) + os.sep)
    if not os.path.isdir(target):
        # A file link (a broken one becomes an unreadable row): kept when it stays inside.
        if inside or w.opts.follow_links or not os.path.exists(target):
            _append_if_image(entry, w, files)
        else:
            w.stats.skipped[SKIP_OUTSIDE_ROOT] += 1
        return False
    if inside:
        # Its files are scanned at their real path already; an ancestor would be a cycle.
        w.stats.skipped[SKIP_LOOP if _is_ancestor(target, entry.path) else SKIP_LINKED_DIR] += 1
        return False
    if not w.opts.follow_links:
        w.stats.skipped[SKIP_OUTSIDE_ROOT] += 1
        return False
    if target in w.seen:  # a cycle outside the root, or a second link to the same folder
        w.stats.skipped[SKIP_LOOP] += 1
        return False
    w.seen.add(target)
    return True


def _is_ancestor(target: str, link: str) -> bool:
    here = os.path.realpath(os.path.dirname(link))
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


def _append_if_image(entry: os.DirEntry, w: _Walk, files: list[os.DirEntry]) -> None:
    if not w.opts.keep_non_images:
        name = entry.name
        dot = name.rfind(".")
        if dot <= 0 or name[dot:].lower() not in IMAGE_EXTENSIONS:
            w.stats.skipped[SKIP_NON_IMAGE] += 1
            return
    files.append(entry)
