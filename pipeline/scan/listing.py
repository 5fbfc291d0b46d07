"""Listing a bucket prefix as the scan's files: the walk's rules for keys instead of folders.

A listing is paginated and streamed (a page of at most a thousand keys at a time), in key
order. Keys are skipped by the walk's rules: a hidden part (a name starting with '.') anywhere
below the root, a name without an image extension (unless non-images are kept), and folder
markers (keys ending with '/'). Labels and splits then come from the key's parts exactly as
from folders. The change signal of a rescan is size + last-modified + ETag.
"""

from __future__ import annotations

from collections.abc import Iterator

from imgfeat.core.stores import Location, list_objects
from imgfeat.scan.probe import IMAGE_EXTENSIONS
from imgfeat.scan.walk import SKIP_HIDDEN, SKIP_NON_IMAGE, FileEntry, WalkOptions, WalkStats

SKIP_FOLDER_MARKER = "folder_marker"  # a zero-byte key ending with '/' that consoles make for folders


def bucket_segments(loc: Location, opts: WalkOptions, stats: WalkStats) -> Iterator[list[FileEntry]]:
    """The objects under ``loc`` that a scan reads, a listing page at a time (``walk_segments``' twin)."""
    folders: set[str] = set()
    for page in list_objects(loc):
        files: list[FileEntry] = []
        for obj in page:
            rel = obj.rel
            reason = skip_reason(rel, opts)
            if reason is not None:
                stats.skipped[reason] += 1
                continue
            folder = rel.rpartition("/")[0]
            if folder not in folders:  # counted as the walk counts folders (once each), in a bounded set
                folders.add(folder)
                stats.dirs += 1
                if len(folders) > 4096:
                    folders.clear()
            files.append(FileEntry(rel, loc / rel, obj.size, obj.mtime_ns, None, obj.etag))
        if files:
            yield files


def skip_reason(rel: str, opts: WalkOptions) -> str | None:
    """Why the key ``rel`` (relative to the root) is not a manifest row, or None (pure)."""
    if not rel or rel.endswith("/"):
        return SKIP_FOLDER_MARKER
    parts = rel.split("/")
    if any(p.startswith(".") for p in parts) or any(p == "" for p in parts):
        return SKIP_HIDDEN
    name = parts[-1]
    dot = name.rfind(".")
    if not opts.keep_non_images and not (dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS):
        return SKIP_NON_IMAGE
    return None
