"""Walking an image folder: deterministic order, hidden files skipped, symlinks kept inside the root."""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple
from dataclasses import dataclass, field

from pipeline.probe import has_image_extension

# Reasons a directory entry is not a manifest row (keys of WalkStats.skipped).
SKIP_HIDDEN = "hidden"
SKIP_NON_IMAGE = "non_image"
SKIP_OUTSIDE_ROOT = "link_outside_root"
SKIP_LOOP = "link_loop"
SKIP_UNLISTABLE = "unlistable_dir"
SKIP_SPECIAL = "special_file"  # sockets, FIFOs, devices: reading one could block for ever


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


@dataclass
class WalkStats:
    skipped: Counter = field(default_factory=Counter)
    dirs: int = 0


def walk(root: str, opts: WalkOptions, stats: WalkStats) -> Iterator[FileEntry]:
    """Yield files under ``root`` depth-first, each directory's entries sorted by name.

    A directory is entered at most once by real path, so symlink loops end; links whose target
    leaves the root are skipped (counted) unless ``follow_links``.
    """
    real_root = os.path.realpath(root)
    seen = {real_root}
    yield from _walk_dir(root, "", real_root, opts, stats, seen)


def _walk_dir(
    folder: str, prefix: str, real_root: str, opts: WalkOptions, stats: WalkStats, seen: set[str]
) -> Iterator[FileEntry]:
    stats.dirs += 1
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        # An unlistable folder: its files cannot even be named, so it is logged as one skip.
        stats.skipped[SKIP_UNLISTABLE] += 1
        return
    for entry in entries:
        if entry.name[0] == ".":
            stats.skipped[SKIP_HIDDEN] += 1
            continue
        rel = prefix + entry.name
        skip = _link_skip(entry, real_root, opts) if entry.is_symlink() else None
        if skip:
            stats.skipped[skip] += 1
        elif _is_dir(entry):
            real = os.path.realpath(entry.path)
            if real in seen:
                stats.skipped[SKIP_LOOP] += 1
                continue
            seen.add(real)
            yield from _walk_dir(entry.path, rel + "/", real_root, opts, stats, seen)
        elif not (opts.keep_non_images or has_image_extension(entry.name)):
            stats.skipped[SKIP_NON_IMAGE] += 1
        else:
            item = _file_entry(entry, rel)
            if item is None:
                stats.skipped[SKIP_SPECIAL] += 1
            else:
                yield item


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _link_skip(entry: os.DirEntry, real_root: str, opts: WalkOptions) -> str | None:
    """Why a symlink is not followed, or None. Broken links are not skipped: they become rows."""
    if opts.follow_links:
        return None
    target = os.path.realpath(entry.path)
    if not os.path.exists(target):
        return None
    inside = target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)
    return None if inside else SKIP_OUTSIDE_ROOT


def _file_entry(entry: os.DirEntry, rel: str) -> FileEntry | None:
    try:
        st = entry.stat(follow_symlinks=True)
    except OSError as exc:
        reason = "a broken symbolic link" if entry.is_symlink() else (exc.strerror or str(exc))
        return FileEntry(rel, entry.path, None, None, f"cannot stat the file: {reason}")
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileEntry(rel, entry.path, st.st_size, st.st_mtime_ns)
