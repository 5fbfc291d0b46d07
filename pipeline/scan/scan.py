"""The scan stage: an image folder -> ``datasets/<name>/manifest.parquet``, re-reading only changed files."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import posixpath
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.hashing import file_sha256
from imgfeat.core.options import opt
from imgfeat.core.progress import bars_enabled, progress
from imgfeat.core.ranges import check_fields
from imgfeat.core.results import JsonObject, JsonResult
from imgfeat.core.storage import WAIT_HINT, FileLock, remove_stale_tmp
from imgfeat.core.stores import Location, check_root, is_uri, parse_location
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.scan import walk as walk_module
from imgfeat.scan.listing import bucket_segments
from imgfeat.scan.manifest import ROW_GROUP_ROWS, make_info, manifest_writer, rows_to_table
from imgfeat.scan.probe import Probe, over_limit_message, probe_file
from imgfeat.scan.rescan import SETTLED, OldRows, Previous, classify, load_previous
from imgfeat.scan.walk import FileEntry, WalkOptions, WalkStats, walk_segments

log = logging.getLogger(__name__)

# Split folder names (compared lower-case) and what they mean.
SPLIT_FOLDERS = {
    "train": S.SPLIT_TRAIN,
    "test": S.SPLIT_TEST,
    "val": S.SPLIT_VAL,
    "validation": S.SPLIT_VAL,
}
BATCH_FILES = 512  # files handed to the thread pool at once; two batches are in flight
LABEL_CSV_COLUMNS = ("path", "label")


@dataclass(frozen=True)
class ScanConfig:
    """What to scan and how; see ``imgfeat scan --help`` for each option."""

    root: str | os.PathLike[str]
    dataset: str = opt(metavar="NAME", help="dataset name (letters, digits, '.', '_', '-')")
    labels_csv: str | os.PathLike[str] | None = opt(
        None, flag="--labels", metavar="FILE.csv", help="CSV with columns path,label that overrides folder labels"
    )
    test_fraction: float | None = opt(
        None,
        metavar="F",
        help="without split folders: put this fraction (0..1) of images in 'test', "
        "the rest in 'train', chosen by content hash",
    )
    follow_links: bool = opt(False, help="follow symlinks whose target is outside ROOT (loops are always cut)")
    keep_non_images: bool = opt(
        False,
        help="probe files without an image extension too; unidentified ones "
        "become not_an_image rows instead of being skipped",
    )
    max_pixels: int = opt(
        Image.MAX_IMAGE_PIXELS,
        metavar="N",
        help="width*height above this is status too_large (default: Pillow's "
        f"decompression-bomb limit, {Image.MAX_IMAGE_PIXELS}; Pillow itself refuses twice that)",
    )
    workers: int | None = opt(None, metavar="N", help="reader threads (default: CPU count + 4, at most 16)")
    wait: float | None = opt(
        None, metavar="SECONDS", help="wait this long for another scan of the same dataset instead of failing"
    )

    def __post_init__(self) -> None:
        check_name("dataset", self.dataset)
        if self.test_fraction is not None and not 0.0 <= float(self.test_fraction) <= 1.0:
            raise ConfigError(f"test_fraction must be from 0 to 1, got {self.test_fraction!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels <= 0:
            raise ConfigError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers <= 0):
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}")
        check_fields(self)  # the ranges its flags and job-file keys have (core/ranges.py)


@dataclass(frozen=True)
class Labeller:
    """Label and split of one file from its path, the labels CSV and its image_id (pure)."""

    csv_labels: Mapping[str, str | None] = field(default_factory=dict)
    test_fraction: float | None = None

    def assign(self, rel: str, image_id: str | None) -> tuple[str | None, str | None]:
        labels, splits = self.assign_many([rel], [image_id])
        return labels[0], splits[0]

    def assign_many(self, paths: list[str], ids: list[str | None]) -> tuple[list[str | None], list[str | None]]:
        """``assign`` over a batch; folder labels are worked out once per folder."""
        folders: dict[str, tuple[str | None, str | None]] = {}
        labels: list[str | None] = []
        splits: list[str | None] = []
        for rel, image_id in zip(paths, ids):
            folder = rel.rpartition("/")[0]
            found = folders.get(folder)
            if found is None:
                found = folders[folder] = folder_label_split(rel)
            label, split = found
            if rel in self.csv_labels:
                label = self.csv_labels[rel]
            if split is None and self.test_fraction is not None and image_id:
                split = fraction_split(image_id, self.test_fraction)
            labels.append(label)
            splits.append(split)
        return labels, splits


def folder_label_split(rel: str) -> tuple[str | None, str | None]:
    """``label/..``, ``split/label/..`` or a flat file; deeper folders keep the top label."""
    folders = rel.split("/")[:-1]
    split = SPLIT_FOLDERS.get(folders[0].lower()) if folders else None
    if split is not None:
        folders = folders[1:]
    return (folders[0] if folders else None), split


def fraction_split(image_id: str, test_fraction: float) -> str:
    """Deterministic from the content: a file keeps its split across rescans, duplicates share it."""
    return S.SPLIT_TEST if int(image_id[:8], 16) / 2**32 < test_fraction else S.SPLIT_TRAIN


@dataclass
class ScanTally:
    """Counts gathered while scanning; they end up in the ScanSummary."""

    added: int = 0
    changed: int = 0
    unchanged: int = 0
    retried: int = 0
    status: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)
    labels: set[str] = field(default_factory=set)
    csv_matched: int = 0
    csv_missing: int = 0


@dataclass(frozen=True)
class ScanSummary(JsonResult):
    """What a scan did: counts by kind of change and by status, skips, timing, the manifest path."""

    dataset: str
    root: str
    manifest: str
    files: int
    added: int
    changed: int
    unchanged: int
    removed: int
    retried: int
    hashed: int
    ok: int
    errors: int
    status: dict[str, int]
    labels: int
    splits: dict[str, int]
    skipped: dict[str, int]
    skipped_total: int
    labels_csv_missing: int
    seconds: float
    files_per_s: float | None


@dataclass(frozen=True)
class ScanPlan(JsonResult):
    """What a scan would do (``--dry-run``): files new, changed, unchanged, removed; skips."""

    dataset: str
    root: str
    new: int
    changed: int
    unchanged: int
    removed: int
    skipped: dict[str, int]


# ---------------------------------------------------------------- checks at the edge


def resolve_root(root: str | os.PathLike[str]) -> Path | Location:
    """The absolute root (symlinks in it kept as given); ConfigError when it is not a folder.

    An object-store URI (``s3://bucket/prefix``) is a Location, checked by listing it once:
    wrong credentials, a missing bucket or an unreachable endpoint fail here, before any work."""
    if is_uri(root):
        loc = parse_location(str(root), "scan root")
        check_root(loc, "scan root")
        return loc
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    if not path.exists():
        raise ConfigError(f"scan root {str(root)!r} does not exist")
    if not path.is_dir():
        raise ConfigError(f"scan root {str(root)!r} is not a directory")
    return path


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, str | None]:
    """``path,label`` rows (paths relative to the root) -> {POSIX path: label}."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise ConfigError(f"labels CSV {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"labels CSV {str(path)!r} cannot be read: {exc}") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if not set(LABEL_CSV_COLUMNS) <= set(header):
        raise ConfigError(f"labels CSV {str(path)!r} must have a header with columns 'path,label', got {header}")
    ip, il = header.index("path"), header.index("label")
    out: dict[str, str | None] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header) or not row[ip].strip():
            raise ConfigError(f"labels CSV {str(path)!r} line {lineno}: expected {len(header)} fields, got {row}")
        rel = posixpath.normpath(row[ip].strip().replace("\\", "/")).lstrip("/")
        out[rel] = row[il].strip() or None
    return out


# Options that decide labels and splits: when one changes, carried-over rows are relabelled.
LABEL_OPTIONS = ("labels_csv", "labels_csv_sha256", "test_fraction")


def scan_options(cfg: ScanConfig) -> JsonObject:
    """The options stored in the manifest's metadata (paths absolute, the CSV's content hash)."""
    opts = {k: v for k, v in asdict(cfg).items() if k not in ("root", "dataset", "workers", "wait")}
    opts["labels_csv_sha256"] = None
    if cfg.labels_csv is not None:
        opts["labels_csv"] = os.path.abspath(os.fspath(cfg.labels_csv))
        with contextlib.suppress(OSError):  # a missing CSV is reported when it is read
            opts["labels_csv_sha256"] = file_sha256(cfg.labels_csv)
    return opts


def _labeller(cfg: ScanConfig) -> Labeller:
    labels = read_labels_csv(cfg.labels_csv) if cfg.labels_csv is not None else {}
    return Labeller(labels, None if cfg.test_fraction is None else float(cfg.test_fraction))


def _walk_options(cfg: ScanConfig) -> WalkOptions:
    return WalkOptions(follow_links=cfg.follow_links, keep_non_images=cfg.keep_non_images)


# ---------------------------------------------------------------- the mapper: files -> rows


def probe_entry(entry: FileEntry, max_pixels: int) -> Probe:
    if entry.stat_error is not None:
        return Probe(None, S.STATUS_UNREADABLE, entry.stat_error)
    return probe_file(entry.abs, max_pixels)


def probed_row(entry: FileEntry, probe: Probe, labeller: Labeller) -> dict[str, Any]:
    label, split = labeller.assign(entry.rel, probe.image_id)
    return {
        S.IMAGE_ID: probe.image_id,
        S.PATH: entry.rel,
        S.LABEL: label,
        S.SPLIT: split,
        S.BYTES: entry.size,
        S.MTIME_NS: entry.mtime_ns,
        S.WIDTH: probe.width,
        S.HEIGHT: probe.height,
        S.FORMAT: probe.format,
        S.MODE: probe.mode,
        S.STATUS: probe.status,
        S.ERROR: probe.error,
        S.ETAG: entry.etag,
    }


def repixel(rows: list[dict[str, Any]], max_pixels: int) -> list[dict[str, Any]]:
    """Re-apply a changed pixel limit to carried-over rows (ok rows over it become too_large)."""
    out = []
    for row in rows:
        w, h = row[S.WIDTH], row[S.HEIGHT]
        if row[S.STATUS] == S.STATUS_OK and w is not None and h is not None and w * h > max_pixels:
            row = {**row, S.STATUS: S.STATUS_TOO_LARGE, S.ERROR: over_limit_message(w, h, max_pixels)}
        out.append(row)
    return out


def relabel(table: pa.Table, labeller: Labeller) -> pa.Table:
    """Re-derive the label and split columns of carried-over rows (the label options changed)."""
    labels, splits = labeller.assign_many(table.column(S.PATH).to_pylist(), table.column(S.IMAGE_ID).to_pylist())
    for name, values in ((S.LABEL, labels), (S.SPLIT, splits)):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, S.MANIFEST_SCHEMA.field(name), pa.array(values, pa.string()))
    return table


def count_table(table: pa.Table, labeller: Labeller, tally: ScanTally) -> None:
    """Add a finished batch to the summary's counts."""
    tally.status.update(table.column(S.STATUS).to_pylist())
    tally.splits.update(table.column(S.SPLIT).to_pylist())
    tally.labels.update(x for x in set(table.column(S.LABEL).to_pylist()) if x is not None)
    if labeller.csv_labels:
        tally.csv_matched += sum(p in labeller.csv_labels for p in table.column(S.PATH).to_pylist())


# ---------------------------------------------------------------- the reader: walk + probe in threads


def _batches(segments: Iterator[list[FileEntry]], size: int) -> Iterator[list[FileEntry]]:
    batch: list[FileEntry] = []
    for segment in segments:
        batch.extend(segment)
        while len(batch) >= size:
            yield batch[:size]
            batch = batch[size:]
    if batch:
        yield batch


class _BatchReader:
    """Turns walked files into manifest rows: probes changed ones in a pool, carries the rest over."""

    def __init__(
        self,
        cfg: ScanConfig,
        prev: Previous | None,
        labeller: Labeller,
        options: dict[str, Any],
        pool: ThreadPoolExecutor,
        tally: ScanTally,
    ):
        self.cfg, self.prev, self.labeller, self.pool, self.tally = cfg, prev, labeller, pool, tally
        self.old: OldRows | None = prev.cursor() if prev else None
        self._relabel = prev is not None and any(prev.options.get(k) != options[k] for k in LABEL_OPTIONS)
        self._repixel = prev is not None and prev.max_pixels != cfg.max_pixels

    def submit(self, batch: list[FileEntry]) -> tuple[list[FileEntry], list[Any]]:
        """Per file: a Future of its Probe, or the row number of its old row."""
        slots: list[Any] = []
        counts: Counter[str] = Counter()
        find = self.old.find if self.old else lambda rel: None
        for entry in batch:
            old = find(entry.rel)
            # A rescan's common case, tested inline: same size and mtime, a settled status.
            if (
                old is not None
                and old[1] == entry.size
                and old[2] == entry.mtime_ns
                and old[3] in SETTLED
                and old.etag == entry.etag  # an object rewritten within its last-modified second
            ):
                slots.append(old[0])
                continue
            kind = classify(entry, old, self.cfg.max_pixels)
            if (
                kind == "unchanged" and old is not None
            ):  # e.g. still over the pixel limit: nothing to learn by reading it
                slots.append(old[0])
                continue
            counts[kind] += 1
            slots.append(self.pool.submit(probe_entry, entry, self.cfg.max_pixels))
        counts["unchanged"] = len(batch) - sum(counts.values())
        for kind, n in counts.items():
            setattr(self.tally, kind, getattr(self.tally, kind) + n)
        return batch, slots

    def table(self, batch: list[FileEntry], slots: list[Any]) -> pa.Table:
        """The batch in walk order; runs of carried rows are zero-copy slices of the old manifest."""
        segments: list[pa.Table] = []
        probed: list[dict[str, Any]] = []
        run: list[int] = []  # [first old row, count] of the current run of carried rows
        for entry, slot in zip(batch, slots):
            if isinstance(slot, Future):
                self._flush_run(run, segments)
                probed.append(probed_row(entry, slot.result(), self.labeller))
                continue
            if probed:
                segments.append(rows_to_table(probed))
                probed = []
            if run and slot == run[0] + run[1]:
                run[1] += 1
            else:
                self._flush_run(run, segments)
                run[:] = [slot, 1]
        self._flush_run(run, segments)
        if probed:
            segments.append(rows_to_table(probed))
        return pa.concat_tables(segments) if len(segments) != 1 else segments[0]

    def _flush_run(self, run: list[int], segments: list[pa.Table]) -> None:
        if not run or self.old is None:  # (a run of carried rows has an old manifest)
            return
        for part in self.old.rows(run[0], run[1]):
            if self._repixel:
                part = rows_to_table(repixel(part.to_pylist(), self.cfg.max_pixels))
            if self._relabel:
                part = relabel(part, self.labeller)
            segments.append(part)
        run.clear()

    def release(self, pending: deque[tuple[list[FileEntry], list[Any]]]) -> None:
        """Let go of old row groups that neither the batches in flight nor later files can use."""
        if self.old is None:
            return
        carried = [s for _, slots in pending for s in slots if not isinstance(s, Future)]
        self.old.release_before(min(carried, default=self.old.position))


def root_segments(root: Path | Location, opts: WalkOptions, stats: WalkStats) -> Iterator[list[FileEntry]]:
    """The files under ``root`` in runs: a folder walked, or a bucket prefix listed."""
    if isinstance(root, Location):
        return bucket_segments(root, opts, stats)
    return walk_segments(str(root), opts, stats)


def _scan_tables(reader: _BatchReader, root: Path | Location, stats: WalkStats) -> Iterator[pa.Table]:
    """Yield the manifest in walk order, a batch at a time, with at most two batches in flight."""
    pending: deque[tuple[list[FileEntry], list[Any]]] = deque()
    try:
        segments = root_segments(root, _walk_options(reader.cfg), stats)
        for batch in _batches(segments, BATCH_FILES):
            pending.append(reader.submit(batch))
            if len(pending) > 1:
                yield reader.table(*pending.popleft())
                reader.release(pending)
        while pending:
            yield reader.table(*pending.popleft())
    finally:
        for _, slots in pending:
            for s in slots:
                if isinstance(s, Future):
                    s.cancel()
        if reader.old is not None:
            reader.old.close()


# ---------------------------------------------------------------- the writer and the stage


def _write_manifest(
    ws: Workspace,
    cfg: ScanConfig,
    root: Path | Location,
    prev: Previous | None,
    run_id: str,
    tally: ScanTally,
    labeller: Labeller,
) -> WalkStats:
    stats = WalkStats()
    options = scan_options(cfg)
    info = make_info(root, cfg.dataset, options, run_id)
    workers = cfg.workers or min(16, (os.cpu_count() or 1) + 4)
    with (
        manifest_writer(ws.manifest_path(cfg.dataset), info) as writer,
        ThreadPoolExecutor(workers, thread_name_prefix="scan") as pool,
        progress(total=_expected_files(cfg, root, prev), desc=f"scan {cfg.dataset}", unit="file") as bar,
        warnings.catch_warnings(),
    ):
        # Pillow warns between its limit and twice it; the scan records too_large itself.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        reader = _BatchReader(cfg, prev, labeller, options, pool, tally)
        buffered: list[pa.Table] = []  # batches are small; row groups of ROW_GROUP_ROWS read better
        for table in _scan_tables(reader, root, stats):
            count_table(table, labeller, tally)
            buffered.append(table)
            bar.update(table.num_rows)
            if sum(t.num_rows for t in buffered) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(buffered))
                buffered = []
        if buffered:
            writer.write_table(pa.concat_tables(buffered))
    tally.csv_missing = len(labeller.csv_labels) - tally.csv_matched
    if tally.csv_missing:
        log.warning("%d rows of the labels CSV name files that are not in the scan", tally.csv_missing)
    return stats


def _expected_files(cfg: ScanConfig, root: Path | Location, prev: Previous | None) -> int | None:
    """The progress bar's total, so that it shows an ETA; None (no count) when no bar is shown.

    A rescan expects the previous manifest's rows; a first scan counts the files by the same walk
    first (stat only: about a twentieth of a first scan's time), quietly: the walk itself warns.
    """
    if not bars_enabled():
        return None
    if prev is not None:
        return prev.rows
    if isinstance(root, Location):
        return None  # listing a bucket twice costs as much as the listing itself: a bar without an ETA
    walk_log = logging.getLogger(walk_module.__name__)
    was, walk_log.disabled = walk_log.disabled, True
    try:
        return sum(len(seg) for seg in walk_segments(str(root), _walk_options(cfg), WalkStats()))
    finally:
        walk_log.disabled = was


def run_scan(ws: Workspace, cfg: ScanConfig, run_id: str) -> ScanSummary:
    """Scan ``cfg.root`` into the dataset's manifest; returns the summary (counts, timings, path)."""
    t0 = time.perf_counter()
    root = resolve_root(cfg.root)
    labeller = _labeller(cfg)  # a bad labels CSV fails here, before the lock file exists
    path = ws.manifest_path(cfg.dataset)
    lock = FileLock(ws.locks_dir / f"dataset-{cfg.dataset}.lock", f"dataset {cfg.dataset!r}", cfg.wait, hint=WAIT_HINT)
    tally = ScanTally()
    with lock:
        remove_stale_tmp(path.parent)
        prev = load_previous(path, root)
        stats = _write_manifest(ws, cfg, root, prev, run_id, tally, labeller)
    removed = (prev.rows if prev else 0) - tally.changed - tally.unchanged - tally.retried
    summary = _summary(cfg, root, path, tally, stats, removed, time.perf_counter() - t0)
    log.info(
        "scanned %s: %d files (%d added, %d changed, %d unchanged, %d removed), %d ok, %d errors, %d skipped in %.1fs",
        cfg.dataset,
        summary.files,
        tally.added,
        tally.changed,
        tally.unchanged,
        removed,
        summary.ok,
        summary.errors,
        summary.skipped_total,
        summary.seconds,
    )
    return summary


def _summary(
    cfg: ScanConfig,
    root: Path | Location,
    path: Path,
    tally: ScanTally,
    stats: WalkStats,
    removed: int,
    seconds: float,
) -> ScanSummary:
    files = sum(tally.status.values())
    skipped = {k: v for k, v in sorted(stats.skipped.items()) if v}
    return ScanSummary(
        dataset=cfg.dataset,
        root=root.as_posix(),
        manifest=str(path),
        files=files,
        added=tally.added,
        changed=tally.changed,
        unchanged=tally.unchanged,
        removed=removed,
        retried=tally.retried,
        hashed=tally.added + tally.changed + tally.retried,
        ok=tally.status[S.STATUS_OK],
        errors=files - tally.status[S.STATUS_OK],
        status=dict(sorted(tally.status.items())),
        labels=len(tally.labels),
        splits={(k or "none"): v for k, v in sorted(tally.splits.items(), key=lambda kv: kv[0] or "")},
        skipped=skipped,
        skipped_total=sum(skipped.values()),
        labels_csv_missing=tally.csv_missing,
        seconds=round(seconds, 3),
        files_per_s=round(files / seconds, 1) if seconds > 0 else None,
    )


def plan_scan(ws: Workspace, cfg: ScanConfig) -> ScanPlan:
    """A stat-only dry run: how many files are new, changed, removed or unchanged (nothing is read)."""
    root = resolve_root(cfg.root)
    prev = load_previous(ws.manifest_path(cfg.dataset), root)
    old = prev.cursor(keep=False) if prev else None
    stats = WalkStats()
    counts: Counter[str] = Counter()
    try:
        for entry in (e for seg in root_segments(root, _walk_options(cfg), stats) for e in seg):
            kind = classify(entry, old.find(entry.rel) if old else None, cfg.max_pixels)
            counts[PLAN_KINDS[kind]] += 1
    finally:
        if old is not None:
            old.close()
    return ScanPlan(
        dataset=cfg.dataset,
        root=root.as_posix(),
        new=counts["new"],
        changed=counts["changed"],
        unchanged=counts["unchanged"],
        removed=(prev.rows if prev else 0) - (old.matched if old else 0),
        skipped={k: v for k, v in sorted(stats.skipped.items()) if v},
    )


# What a dry run calls each kind of file (a retried file will be read again, like a changed one).
PLAN_KINDS = {"added": "new", "changed": "changed", "retried": "changed", "unchanged": "unchanged"}
