"""Reading featuresets: provenance, the shards readers trust, committed ids, feature matrices; the layout migration."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.commits import (
    Adoptable,
    Reconciled,
    ShardRecord,
    list_committed,
    open_verified,
    reconcile,
    warn_once,
)
from imgfeat.core.errors import ImgfeatError, unknown_value
from imgfeat.core.keys import KeyIndex, KeySet, as_keyindex, concat_keys, keys_of, unique_keys
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import column_values, list_shards, read_shard, read_shards, remove_file, remove_tree
from imgfeat.core.workspace import Workspace
from imgfeat.extract.recipe import Provenance
from imgfeat.extract.shards import FeaturesetDirs, sidecar_name

log = logging.getLogger(__name__)

OLD_ERRORS_DIR = "errors"  # the first layouts kept side files inside the featureset folder
OLD_LOCK = ".lock"
OLD_PROVENANCE_FILE = "_featureset.json"  # Polars and Hugging Face datasets stop at it


def provenance_path(ws: Workspace, featureset: str) -> Path:
    """``features/_provenance/<fs>.json``; a folder of an older layout (not yet migrated by a
    writer) keeps its ``_featureset.json``, which is read where it is."""
    path = ws.featureset_provenance(featureset)
    old = ws.featureset_dir(featureset) / OLD_PROVENANCE_FILE
    return old if not path.is_file() and old.is_file() else path


def featureset_info(ws: Workspace, featureset: str) -> JsonObject:
    """The provenance written when the featureset was created; exit 2 if it does not exist."""
    path = provenance_path(ws, featureset)
    if not path.is_file():
        raise unknown_value(
            "featureset",
            featureset,
            ws.list_names("features"),
            hint=f"none under {ws.root / 'features'}; run 'imgfeat extract' first"
            if not ws.list_names("features")
            else "",
        )
    why: Exception | str
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        info, why = None, exc
    else:
        why = "not a JSON object"
    if not isinstance(info, dict):
        raise ImgfeatError(
            f"cannot read {path}: {why}; the featureset's provenance is damaged: delete it and "
            f"{ws.featureset_dir(featureset)}, and run 'imgfeat extract' again"
        )
    return info


def read_provenance(ws: Workspace, featureset: str) -> Provenance:
    """The typed provenance of a featureset; exit 2 if it does not exist."""
    return Provenance.from_json(featureset_info(ws, featureset))


def trusted_shards(ws: Workspace, featureset: str) -> list[tuple[Path, ShardRecord | None]]:
    """The one place every featureset reader learns which feature shards count: committed (recorded
    and still matching their record, ``core/commits.py``) and carrying this featureset's provenance;
    any other is left out, with a warning naming it. The record is None in a legacy folder."""
    committed = list_committed(ws.featureset_dir(featureset), f"featureset {featureset}")
    if not committed.trusted:
        return []
    info = featureset_info(ws, featureset)
    want = (info.get("featureset"), info.get("fingerprint"))
    ok = [(p, r) for p, r in committed.trusted if _shard_identity(p) == want]
    if len(ok) < len(committed.trusted):
        foreign = sorted(set(committed.paths) - {p for p, _ in ok})
        warn_once(
            f"ignoring {len(foreign)} shard(s) in {ws.featureset_dir(featureset)} that do not carry "
            f"its provenance: {', '.join(p.name for p in foreign)}"
        )
    return ok


def feature_shards(ws: Workspace, featureset: str) -> list[Path]:
    """Paths of the shards readers take (``trusted_shards``)."""
    return [p for p, _ in trusted_shards(ws, featureset)]


def open_shard(featureset: str, shard: Path) -> pq.ParquetFile | None:
    """A trusted shard read once and checked against its record's checksum (None, warned, when its
    data changed since its commit): what every reader of feature values opens."""
    return open_verified(shard, f"featureset {featureset}")


def finite_rows(feature: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean mask of the rows whose feature is all finite (vectorised, no Python loop)."""
    chunks = feature.chunks if isinstance(feature, pa.ChunkedArray) else [feature]
    masks = [_finite_chunk(c) for c in chunks if len(c)]  # per chunk: no copy of the values
    return np.concatenate(masks) if masks else np.ones(0, dtype=bool)


def _finite_chunk(arr: pa.FixedSizeListArray) -> np.ndarray:
    values = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1)
    # A row's float64 sum is finite exactly when every value is (NaN and inf propagate; float16/32
    # values cannot overflow a float64 sum): 2.4x faster than isfinite().all() and no n x dim mask.
    return np.isfinite(values.sum(axis=1, dtype=np.float64))


def warn_non_finite(featureset: str, n: int) -> None:
    """The one warning for feature rows left out because they hold NaN or inf."""
    if n:
        log.warning(
            "left out %d feature row(s) of featureset %s that hold NaN or inf (written before "
            "extract refused them; the next extract into it tries those images again)",
            n,
            featureset,
        )


def shard_rows(shard: Path, record: ShardRecord | None) -> tuple[pa.Array, np.ndarray]:
    """A trusted shard's image ids and which of its rows are finite: only the id column unless its
    record says it holds non-finite rows (or it has no record yet)."""
    if record is not None and record.nonfinite == 0:
        ids = read_shard(shard, [S.IMAGE_ID]).column(0).combine_chunks()
        return ids, np.ones(len(ids), dtype=bool)
    t = read_shard(shard, [S.IMAGE_ID, S.FEATURE])
    return t.column(0).combine_chunks(), finite_rows(t.column(S.FEATURE))


def shard_ids(shard: Path, record: ShardRecord | None) -> pa.Array:
    """The image ids of a trusted shard's finite rows (``shard_rows``)."""
    ids, finite = shard_rows(shard, record)
    return ids if finite.all() else ids.filter(pa.array(finite))


READ_BATCH_ROWS = 8192  # feature rows decoded at a time when picked rows are copied out


@dataclass(frozen=True)
class RowPicks:
    """The rows a reader takes: each wanted id once, its first finite row in trusted-shard order."""

    ids: list[str]
    shards: list[tuple[Path, list[int]]]  # per trusted shard: the row positions taken, ascending


def pick_rows(ws: Workspace, featureset: str, wanted: Iterable[str] | None = None) -> RowPicks:
    """Which rows of which trusted shards hold the wanted ids (all when None), from the id columns
    alone (``shard_rows``); rows holding NaN or inf are left out, with the one warning."""
    wanted_set = None if wanted is None else set(wanted)
    ids: list[str] = []
    seen: set[str] = set()
    shards: list[tuple[Path, list[int]]] = []
    dropped = 0
    for path, record in trusted_shards(ws, featureset):
        row_ids, finite = shard_rows(path, record)
        dropped += len(row_ids) - int(finite.sum())
        keep = []
        for r, i in enumerate(row_ids.to_pylist()):
            if finite[r] and i not in seen and (wanted_set is None or i in wanted_set):
                seen.add(i)
                ids.append(i)
                keep.append(r)
        shards.append((path, keep))
    warn_non_finite(featureset, dropped)
    return RowPicks(ids, shards)


def read_picked(
    ws: Workspace, featureset: str, picks: RowPicks, dtype: np.dtype | type = np.float32
) -> tuple[list[str], np.ndarray]:
    """``(ids, X)`` of picked rows, features streamed into one preallocated array: a shard with no
    picked row is never decoded, and the rows of a shard whose data changed since its commit
    (``open_shard``) are left out."""
    X = np.zeros((len(picks.ids), featureset_dim(ws, featureset)), dtype=dtype)
    good = np.ones(len(picks.ids), dtype=bool)
    start = 0
    for path, keep in picks.shards:
        if keep:
            if not _copy_rows(featureset, path, keep, X[start : start + len(keep)]):
                good[start : start + len(keep)] = False
            start += len(keep)
    if good.all():
        return picks.ids, X
    return [i for i, g in zip(picks.ids, good) if g], X[good]


def _copy_rows(featureset: str, path: Path, keep: list[int], out: np.ndarray) -> bool:
    """Copy rows ``keep`` (ascending positions) of one shard's features into ``out``; False when the
    shard's data no longer matches its commit record (nothing copied)."""
    positions = np.asarray(keep, dtype=np.int64)
    done, offset = 0, 0
    pf = open_shard(featureset, path)
    if pf is None:
        return False
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=[S.FEATURE]):
        lo, hi = np.searchsorted(positions, [offset, offset + batch.num_rows])
        if hi > lo:
            col = batch.column(0).take(pa.array(positions[lo:hi] - offset, pa.int64()))
            out[done : done + hi - lo] = feature_matrix(pa.chunked_array([col]), out.dtype)
            done += hi - lo
        offset += batch.num_rows
    return True


def provenance_dim(info: JsonObject) -> int:
    """A provenance's ``dim``: the feature width (0 when it is not known there)."""
    dim = info.get("dim")
    return dim if isinstance(dim, int) else 0


def featureset_dim(ws: Workspace, featureset: str) -> int:
    """The vector length a featureset stores (from its provenance, else its first trusted shard)."""
    dim = provenance_dim(featureset_info(ws, featureset))
    if dim:
        return dim
    shards = feature_shards(ws, featureset)
    if not shards:
        return 0
    return int(pq.ParquetFile(shards[0]).schema_arrow.field(S.FEATURE).type.list_size)


def read_feature_table(ws: Workspace, featureset: str) -> pa.Table | None:
    """``image_id, feature`` of every trusted shard, checksums checked, non-finite rows left out."""
    tables, dropped = [], 0
    for p in feature_shards(ws, featureset):
        pf = open_shard(featureset, p)
        if pf is None:
            continue
        t = pf.read(columns=[S.IMAGE_ID, S.FEATURE])
        ok = finite_rows(t.column(S.FEATURE))
        if not ok.all():
            dropped += int((~ok).sum())
            t = t.filter(pa.array(ok))
        tables.append(t)
    warn_non_finite(featureset, dropped)
    return pa.concat_tables(tables) if tables else None


def _shard_identity(path: Path) -> tuple[str | None, str | None]:
    try:
        meta = pq.read_metadata(path).metadata or {}
        prov = json.loads(meta.get(S.META_PROVENANCE, b"{}"))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ImgfeatError(
            f"cannot read the footer of {path} ({exc}): the shard is damaged; delete it (or move "
            "it away) and rerun imgfeat extract, which writes its rows again"
        ) from None
    return (prov.get("featureset"), prov.get("fingerprint")) if isinstance(prov, dict) else (None, None)


def sidecar_of(ws: Workspace, featureset: str, shard: Path) -> Path:
    """The ``--npy`` sidecar of a feature shard (same rows, same order)."""
    return ws.featureset_npy_dir(featureset) / sidecar_name(Path(shard).name)


def error_shards(ws: Workspace, featureset: str) -> list[Path]:
    """Committed error shards (``core/commits.py``); a folder of the first layout (not yet migrated by
    a writer) is read where it is."""
    old = ws.featureset_dir(featureset) / OLD_ERRORS_DIR
    committed = list_committed(ws.featureset_errors_dir(featureset), f"the error rows of featureset {featureset}")
    return committed.paths + list_shards(old)


def committed_ids(ws: Workspace, featureset: str) -> set[str]:
    """image_ids that already have a (finite) feature row; reads only the ``image_id`` column of shards
    whose record says they hold no non-finite row."""
    out: set[str] = set()
    for p, rec in trusted_shards(ws, featureset):
        out.update(shard_ids(p, rec).to_pylist())
    return out


def committed_keys(ws: Workspace, featureset: str) -> KeySet:
    """``committed_ids`` as compact keys (``core/keys.py``), read a shard's id column at a time."""
    parts = [keys_of(shard_ids(p, rec).drop_null()) for p, rec in trusted_shards(ws, featureset)]
    return KeySet(concat_keys(parts), owned=True) if parts else KeySet()


def committed_among(ws: Workspace, featureset: str, index: KeyIndex) -> np.ndarray:
    """Which of ``index``'s ids (a bool by rank) have a feature row, as ``committed_ids`` tells:
    a byte an id, read a shard's id column at a time."""
    have = np.zeros(len(index), dtype=bool)
    for p, rec in trusted_shards(ws, featureset):
        ranks = index.ranks(shard_ids(p, rec).drop_null())
        have[ranks[ranks >= 0]] = True
    return have


def errored_ids(ws: Workspace, featureset: str) -> set[str]:
    """image_ids that ended as an error row in this featureset and have no feature row (a read
    failure that a later run retried successfully is history, not an error)."""
    return set(column_values(error_shards(ws, featureset), S.IMAGE_ID)) - committed_ids(ws, featureset)


def migrate_layout(ws: Workspace, featureset: str) -> dict[str, int]:
    """Bring a featureset of an older layout up to date (call with its lock held): provenance from
    ``<fs>/_featureset.json``, error shards from ``<fs>/errors/`` and sidecars from ``<fs>/`` to their
    places beside the folder, the old lock file out; every shard recorded, adopted or set aside
    (``reconcile_commits``; returns how many of each); and drop sidecars whose shard is gone (a
    sidecar never survives without its shard)."""
    dirs = FeaturesetDirs.of(ws, featureset)
    if not dirs.features.is_dir():
        return {}
    moved = _move_provenance(ws, featureset)
    old = dirs.features / OLD_ERRORS_DIR
    moved += _move_all(list(old.iterdir()) if old.is_dir() else [], dirs.errors)
    moved += _move_all(list(dirs.features.glob("part-*.npy")), dirs.npy)
    if old.is_dir():
        remove_tree(old, ws.root)
    remove_file(dirs.features / OLD_LOCK, ws.root)
    if moved:
        log.info("moved %d side file(s) of featureset %s out of its folder", moved, featureset)
    repaired = reconcile_commits(ws, featureset)
    if dirs.npy.is_dir():
        shards = {sidecar_name(p.name) for p in list_shards(dirs.features)}
        for p in dirs.npy.glob("part-*.npy"):
            if p.name not in shards:
                log.warning("removing %s: its shard was never committed", p)
                remove_file(p, ws.root)
    return {k: sum(len(getattr(r, k)) for r in repaired) for k in ("recorded", "adopted", "set_aside")}


def reconcile_commits(ws: Workspace, featureset: str) -> tuple[Reconciled, Reconciled]:
    """Every feature and error shard recorded and matching (call with the lock held): legacy shards
    that carry the provenance are recorded, a dead run's unrecorded shards adopted when they verify,
    anything else moved to ``.rejected/`` (``core/commits.reconcile``)."""
    dirs = FeaturesetDirs.of(ws, featureset)
    if not provenance_path(ws, featureset).is_file():  # nothing can verify against it: the writer
        return Reconciled(), Reconciled()  # writes it first, then records as it goes
    info = featureset_info(ws, featureset)
    want = (info.get("featureset"), info.get("fingerprint"))

    def inspect_features(p: Path) -> Adoptable | str:
        try:
            if _shard_identity(p) != want:
                return "it does not carry the featureset's provenance"
        except ImgfeatError as exc:
            return str(exc)
        t = pq.ParquetFile(p).read()
        if t.schema.names != [S.IMAGE_ID, S.FEATURE] or not pa.types.is_fixed_size_list(t.schema.field(S.FEATURE).type):
            return "its columns are not a featureset's"
        if t.schema.field(S.FEATURE).type.list_size != provenance_dim(info):
            return "its features have another length"
        ok = finite_rows(t.column(S.FEATURE))
        return Adoptable(t.column(S.IMAGE_ID).combine_chunks(), t.num_rows, int((~ok).sum()))

    def inspect_errors(p: Path) -> Adoptable | str:
        t = pq.ParquetFile(p).read()
        if set(t.schema.names) != set(S.ERRORS_SCHEMA.names):
            return "its columns are not an errors table's"
        return Adoptable(_error_keys(t.select(S.ERRORS_SCHEMA.names).cast(S.ERRORS_SCHEMA)), t.num_rows)

    return (
        reconcile(
            dirs.features,
            inspect_features,
            lambda p, _: read_shard(p, [S.IMAGE_ID]).column(0).combine_chunks(),
            f"featureset {featureset}",
        ),
        reconcile(
            dirs.errors,
            inspect_errors,
            lambda p, _: _error_keys(read_shards([p], schema=S.ERRORS_SCHEMA)),
            f"the error rows of featureset {featureset}",
        ),
    )


def _error_keys(t: pa.Table) -> pa.Array:
    """One string per error row (all its columns): a copy of a committed error shard repeats them."""
    cols = [pc.cast(t.column(n), pa.string()) for n in S.ERRORS_SCHEMA.names]
    return pc.binary_join_element_wise(*cols, "\x1f", null_handling="replace", null_replacement="\x00").combine_chunks()


def _move_provenance(ws: Workspace, featureset: str) -> int:
    old = ws.featureset_dir(featureset) / OLD_PROVENANCE_FILE
    if not old.is_file():
        return 0
    new = ws.featureset_provenance(featureset)
    if new.is_file():  # both there (an old copy put back): the one under _provenance/ is in force
        remove_file(old, ws.root)
        return 0
    new.parent.mkdir(parents=True, exist_ok=True)
    old.replace(new)
    return 1


def _move_all(paths: list[Path], folder: Path) -> int:
    for p in paths:
        folder.mkdir(parents=True, exist_ok=True)
        p.replace(folder / p.name)
    return len(paths)


def read_errors(ws: Workspace, featureset: str) -> pa.Table:
    """Every committed error row (checksums checked)."""
    tables = []
    for p in error_shards(ws, featureset):
        pf = open_verified(p, f"the error rows of featureset {featureset}")
        if pf is not None:
            tables.append(pf.read().cast(S.ERRORS_SCHEMA))
    return pa.concat_tables(tables) if tables else S.ERRORS_SCHEMA.empty_table()


def feature_matrix(column: pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    """fixed_size_list<float>[dim] -> a dense (n, dim) array without a Python loop."""
    arr = column.combine_chunks()
    dim = arr.type.list_size
    if len(arr) == 0:
        return np.zeros((0, dim), dtype=dtype)
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(dtype, copy=False)


ITER_BATCH_ROWS = 8192  # rows per batch of iter_features: 40 MiB of 1,280-d float32


def iter_features(
    ws: Workspace,
    featureset: str,
    *,
    ids: Sequence[str] | KeySet | KeyIndex | pa.Array | pa.ChunkedArray | None = None,
    batch_rows: int = ITER_BATCH_ROWS,
    dtype: np.dtype | type = np.float32,
    shuffle: np.random.Generator | None = None,
    as_keys: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(image_ids, X)`` batches of at most ``batch_rows`` rows, the featureset streamed one row
    group at a time: memory holds one row group and one batch, whatever the featureset's size.

    The rows are ``load_features``' (trusted shards, checksums checked, non-finite rows left out
    with a warning, each id once: the first row wins), in shard order, not in the order of ``ids``;
    with ``ids`` only those rows, and a shard none of them is in is never decoded (its id column
    tells). ``shuffle`` visits the shards, and the row groups of each, in a random order (an SGD
    epoch over shards written in scan order, class by class). The wanted and yielded ids are held
    as compact keys (``core/keys.py``: 16 bytes a content id, not a Python string each);
    ``as_keys`` yields the ids as such keys too, instead of an array of Python strings.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows!r}")
    wanted = as_keyindex(ids)
    # ids already yielded (a duplicate row from concurrent runs is dropped): a bitmap over the
    # wanted ids' ranks, or a set of keys when every id is wanted
    seen: KeySet | np.ndarray = KeySet() if wanted is None else np.zeros(len(wanted), dtype=bool)
    dropped = [0]
    shards = feature_shards(ws, featureset)
    for path in shards if shuffle is None else [shards[k] for k in shuffle.permutation(len(shards))]:
        if wanted is not None and not _holds_any(path, wanted, seen):
            continue
        pf = open_shard(featureset, path)
        if pf is None:
            continue
        groups = range(pf.num_row_groups)
        for group in groups if shuffle is None else shuffle.permutation(len(groups)).tolist():
            t = pf.read_row_group(group, columns=[S.IMAGE_ID, S.FEATURE])
            yield from _batches(_new_rows(t, wanted, seen, dropped), batch_rows, np.dtype(dtype), as_keys)
    warn_non_finite(featureset, dropped[0])


@dataclass(frozen=True)
class RowPlan:
    """The rows ``iter_features(ids=wanted)`` would yield, decided from the id columns alone and
    kept as a bit per shard row: reading them back (``iter_planned``) needs no id at all, so a
    reader that plans first can drop its wanted ids before it reads a feature."""

    shards: list[tuple[Path, np.ndarray]]  # per trusted shard with a row taken: its rows, packed bits
    rows: int  # rows taken, over all shards


def plan_rows(
    ws: Workspace, featureset: str, wanted: KeyIndex, on_ranks: Callable[[np.ndarray], None] | None = None
) -> RowPlan:
    """Plan reading the rows of ``wanted`` as ``iter_features`` reads them (trusted shards in order,
    finite rows, each id once: its first row), from each shard's id column (``shard_rows``).

    ``on_ranks`` gets each shard's taken rows' ranks in ``wanted`` (int64, in row order): over all
    calls, the plan's rows in the order ``iter_planned`` reads them."""
    seen = np.zeros(len(wanted), dtype=bool)
    shards: list[tuple[Path, np.ndarray]] = []
    taken = dropped = 0
    for path, record in trusted_shards(ws, featureset):
        ids, finite = shard_rows(path, record)
        dropped += len(ids) - int(finite.sum())
        rows = np.flatnonzero(finite & np.asarray(ids.is_valid(), dtype=bool))
        r = wanted.ranks(ids.take(pa.array(rows, pa.int64()))) if len(rows) else np.zeros(0, np.int64)
        fresh = r >= 0
        fresh[fresh] = ~seen[r[fresh]]
        rows, r = rows[fresh], r[fresh]
        _, first = np.unique(r, return_index=True)  # an id twice in the shard: its first row
        first.sort()
        rows, r = rows[first], r[first]
        if not len(rows):
            continue
        seen[r] = True
        mask = np.zeros(len(ids), dtype=bool)
        mask[rows] = True
        shards.append((path, np.packbits(mask)))
        taken += len(rows)
        if on_ranks is not None:
            on_ranks(r)
    warn_non_finite(featureset, dropped)
    return RowPlan(shards, taken)


def iter_planned(
    featureset: str, plan: RowPlan, batch_rows: int = ITER_BATCH_ROWS, dtype: np.dtype | type = np.float32
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, X)`` batches of a plan's rows, in its order: ``rows`` (int64) are their numbers in
    the plan (0 .. plan.rows - 1), one row group in memory at a time. Rows that cannot be read as
    planned are left out, so the numbers say which came: a shard whose data changed since its
    commit (``open_shard`` warns) and a row no longer finite."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows!r}")
    before = 0  # plan rows in the shards before this one
    for path, packed in plan.shards:
        mask = np.unpackbits(packed).astype(bool)  # padded to whole bytes: rows past the shard's are 0
        planned = int(mask.sum())
        pf = open_shard(featureset, path)
        if pf is not None:
            mask = mask[: pf.metadata.num_rows]
            start, numbered = 0, before
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                rows = np.flatnonzero(mask[start : start + n])
                start += n
                if not len(rows):
                    continue
                col = pf.read_row_group(group, columns=[S.FEATURE]).column(0)
                if len(rows) < n:
                    col = col.take(pa.array(rows, pa.int64()))
                at = numbered + np.arange(len(rows), dtype=np.int64)
                numbered += len(rows)
                ok = finite_rows(col)
                if not ok.all():
                    col, at = col.filter(pa.array(ok)), at[ok]
                for lo in range(0, len(at), batch_rows):
                    yield at[lo : lo + batch_rows], feature_matrix(col.slice(lo, batch_rows), np.dtype(dtype))
        before += planned


def _holds_any(shard: Path, wanted: KeyIndex, seen: KeySet | np.ndarray) -> bool:
    """Whether a shard holds a wanted id not yet yielded (its id column only: cheap next to its features)."""
    assert isinstance(seen, np.ndarray)
    if seen.all():
        return False
    r = wanted.ranks(read_shard(shard, [S.IMAGE_ID]).column(0).drop_null())
    r = r[r >= 0]
    return bool(len(r)) and not bool(seen[r].all())


def _new_rows(t: pa.Table, wanted: KeyIndex | None, seen: KeySet | np.ndarray, dropped: list[int]) -> pa.Table:
    """A row group's rows to yield: wanted, finite, not yet seen, each id once (``seen`` is updated).

    Vectorised over compact keys (``core/keys.py``): no Python object per row or per id seen."""
    ok = finite_rows(t.column(S.FEATURE))
    dropped[0] += int((~ok).sum())
    col = t.column(S.IMAGE_ID)
    ok &= np.asarray(col.is_valid(), dtype=bool)
    rows = np.flatnonzero(ok)
    keys = keys_of(col.take(pa.array(rows, pa.int64()))) if len(rows) else np.zeros(0, "S1")
    if wanted is None:
        assert isinstance(seen, KeySet)
        fresh = ~seen.contains(keys)
        rows, keys = rows[fresh], keys[fresh]
        _, first, _ = unique_keys(keys)  # an id twice in the group: its first row
        first.sort()
        rows = rows[first]
        seen.add(keys[first])
    else:
        assert isinstance(seen, np.ndarray)
        r = wanted.ranks(keys)
        fresh = r >= 0
        fresh[fresh] = ~seen[r[fresh]]
        rows, r = rows[fresh], r[fresh]
        _, first = np.unique(r, return_index=True)
        first.sort()
        rows = rows[first]
        seen[r[first]] = True
    return t if len(rows) == t.num_rows else t.take(pa.array(rows, pa.int64()))


def _batches(
    t: pa.Table, batch_rows: int, dtype: np.dtype, as_keys: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, t.num_rows, batch_rows):
        part = t.slice(start, batch_rows)
        ids = part.column(S.IMAGE_ID)
        yield (
            keys_of(ids) if as_keys else np.asarray(ids.to_pylist(), dtype=object),
            feature_matrix(part.column(S.FEATURE), dtype),
        )


def load_features(
    ws: Workspace,
    featureset: str,
    ids: Sequence[str] | None = None,
    dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image_ids, X)`` for the wanted ids (all when ``ids`` is None).

    Each id appears once (a duplicate row from concurrent runs is dropped); rows come back in
    the order of ``ids`` when given, ids without a feature row are simply absent.
    """
    got_ids, mats = [], []
    for batch_ids, X in iter_features(ws, featureset, ids=ids, batch_rows=1 << 62, dtype=dtype):  # a row group each
        got_ids.append(batch_ids)
        mats.append(X)
    if not mats:
        info = featureset_info(ws, featureset)
        return np.array([], dtype=object), np.zeros((0, provenance_dim(info)), dtype=dtype)
    all_ids = np.concatenate(got_ids)
    X = np.concatenate(mats)
    if ids is not None:
        pos = {k: i for i, k in enumerate(all_ids)}
        order = [pos[k] for k in dict.fromkeys(ids) if k in pos]
        all_ids, X = all_ids[order], X[order]
    return all_ids, X
