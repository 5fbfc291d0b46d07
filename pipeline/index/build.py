"""The index stage: a featureset's rows in a FAISS index, created, extended or rebuilt under the commit protocol.

Where the files live and how they are read back (checked) is ``imgfeat.index.files``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.keys import KeyIndex, KeySet, as_strings, filled, keys_to_arrow, sorted_unique
from imgfeat.core.options import opt
from imgfeat.core.progress import progress
from imgfeat.core.ranges import check_fields
from imgfeat.core.results import JsonObject, JsonResult
from imgfeat.core.sizes import memory_budget, release_freed_memory
from imgfeat.core.storage import (
    WAIT_HINT,
    FileLock,
    atomic_path,
    check_wait,
    remove_file,
    remove_stale_tmp,
    write_json_atomic,
)
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.extract.featureset import (
    RowPlan,
    committed_among,
    committed_keys,
    featureset_dim,
    featureset_info,
    iter_planned,
    plan_rows,
)
from imgfeat.index.files import (
    IDS_FILE,
    INDEX_PREFIX,
    INDEX_SUFFIX,
    PROVENANCE_FILE,
    CommittedIds,
    IdsDigest,
    IndexInfo,
    checked_index_file,
    index_lock,
    migrate_layout,
    provenance_path,
    read_faiss,
    read_info,
    refuse_links,
    write_faiss,
)
from imgfeat.index.kinds import (
    ID_BYTES,
    KINDS,
    IndexParams,
    add_in_chunks,
    check_kind,
    fill_batch_rows,
    list_of,
    make_index,
    presize_lists,
    resolve_params,
    sample_rows,
    sample_size,
    train,
    train_on_sample,
)
from imgfeat.index.scratch import ScratchArray
from imgfeat.index.vectors import normalise, read_vectors, scanned_datasets
from imgfeat.scan.manifest import corrupt_manifest, manifest_file
from imgfeat.scan.rows import ManifestRows, manifest_groups, manifest_rows, readable

log = logging.getLogger(__name__)

RETRAIN_GROWTH = 4  # an IVF index is retrained once it holds this many times the rows it was trained on


@dataclass(frozen=True)
class IndexConfig:
    """What `imgfeat index` builds: the featureset rows of some datasets (all rows when none), named."""

    featureset: str = opt(
        metavar="FS", help="the featureset to index: its name, a recipe name (its latest) or RECIPE@ID"
    )
    datasets: tuple[str, ...] = ()  # the flag is the repeatable --dataset
    name: str | None = opt(
        None, metavar="NAME", help="index name (default: the datasets and the featureset, joined by '-')"
    )
    kind: str = opt(
        "auto",
        choices=KINDS,
        help="flat: exact; ivf, hnsw, ivfpq: approximate; auto: flat up to 50,000 rows, else ivf, or ivfpq when the vectors do not fit --memory-budget",
    )
    nlist: int | None = opt(None, metavar="N", help="IVF lists (default ~4 sqrt(rows))")
    nprobe: int | None = opt(None, metavar="N", help="IVF lists searched per query (default max(8, nlist/16))")
    hnsw_m: int = 32
    ef_search: int = 128
    seed: int = 0
    wait: float | None = opt(
        None,
        metavar="SECONDS",
        help="wait up to this long for another process writing the same index, instead of exiting at once",
    )
    # build again from the featureset, whatever the old files hold (a damaged index)
    rebuild: bool = opt(False, help="build the index again from its featureset, replacing its files (damaged or not)")
    # Bytes the index may use (its rows, the training sample, the batch being added): ``auto`` is
    # then ivfpq, sized to fit, when the full vectors do not fit, and the rows are streamed from the
    # shards; None: no budget (the whole featureset is read at once, as before).
    memory_budget: int | None = opt(
        None,
        metavar="SIZE",
        help="memory the index may use (its rows, the training sample, the batch being added), e.g. 256MB or 2GiB; auto builds ivfpq, sized to fit, when the full vectors do not fit (default: a quarter of RAM)",
    )

    @property
    def budget(self) -> int:
        """The memory budget in bytes: the one given, else a quarter of physical RAM."""
        return memory_budget(self.memory_budget)

    def __post_init__(self) -> None:
        check_wait(self.wait, "index wait")
        check_fields(self)  # nlist, nprobe: the ranges of their flags and keys
        check_name("featureset", self.featureset)
        for d in self.datasets:
            check_name("dataset", d)
        check_name("index", self.index_name)
        check_kind(self.kind)
        for key in ("nlist", "nprobe", "hnsw_m", "ef_search"):  # memory_budget: check_fields (a size)
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"index {key} must be a positive integer, got {value!r}")

    @property
    def index_name(self) -> str:
        """``--name``, else the featureset name (prefixed by the datasets when some are chosen)."""
        return self.name or "-".join((*self.datasets, self.featureset))


@dataclass(frozen=True)
class IndexSummary(JsonResult):
    """What one `imgfeat index` did (``added`` 0 and ``written`` False: nothing was new)."""

    index: str
    featureset: str
    kind: str
    rows: int
    added: int
    rebuilt: bool
    written: bool
    missing_features: int
    index_dir: str
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    index_bytes: int | None = None  # the index file's size (what the index itself takes in memory, about)


def build_index(ws: Workspace, cfg: IndexConfig, run_id: str) -> IndexSummary:
    """Create or extend ``indexes/<name>/``: only rows not in it yet are added; nothing new writes nothing."""
    t0 = time.perf_counter()
    fs_info = featureset_info(ws, cfg.featureset)  # exit 2 for an unknown featureset
    name = cfg.index_name
    with FileLock(index_lock(ws, name), f"index {name}", cfg.wait, hint=WAIT_HINT):
        refuse_links(ws, name)
        for folder in (ws.index_dir(name), ws.index_files_dir(name)):
            remove_stale_tmp(folder)
        migrate_layout(ws, name)
        before = _previous(ws, cfg)
        prev = None if cfg.rebuild else before  # a rebuild reads nothing of the old files but its kind
        old = CommittedIds.of(ws, prev) if prev else CommittedIds(None)
        covered, missing = _covered_ids(ws, cfg)
        new = covered.without(old.keys()) if old.num_rows else covered
        del covered
        added = len(new)  # (`new` is consumed by the build below)
        total = old.num_rows + added
        if total == 0:
            raise ConfigError(
                f"featureset {cfg.featureset} has no feature rows"
                + (f" for dataset(s) {', '.join(cfg.datasets)}" if cfg.datasets else "")
                + "; run 'imgfeat extract' first"
            )
        wanted = _wanted_params(cfg, before, total, featureset_dim(ws, cfg.featureset))
        rebuild = cfg.rebuild or (prev is not None and _needs_rebuild(prev.params, wanted, cfg, total))
        if prev is not None and not new and not rebuild:
            checked_index_file(ws, prev)
            log.info("index %s is current: %d rows, nothing new", name, total)
            return _summary(cfg, prev, 0, False, False, missing, t0)
        if prev is None or rebuild:
            built = _fresh(ws, cfg, wanted, old, new)
        else:
            built = _extended(ws, cfg, prev, old, new)
        info = _commit(ws, cfg, fs_info, before, built, run_id)
    log.info(
        "index %s: %d rows (%d added%s), kind %s", name, info.rows, added, ", rebuilt" if rebuild else "", info.kind
    )
    return _summary(cfg, info, added, rebuild, True, missing, t0)


def _previous(ws: Workspace, cfg: IndexConfig) -> IndexInfo | None:
    """The committed provenance, if any; with ``--rebuild`` a damaged one is no error (it is replaced)."""
    if not provenance_path(ws, cfg.index_name).is_file():
        return None
    try:
        prev = read_info(ws, cfg.index_name)
    except ImgfeatError as exc:
        if not cfg.rebuild:
            raise
        log.warning(
            "index %s: its provenance is damaged; rebuilding it from featureset %s", cfg.index_name, cfg.featureset
        )
        log.debug("%s", exc)
        return None
    if prev.featureset != cfg.featureset:
        raise ConfigError(
            f"index {prev.name} was built on featureset {prev.featureset}, not {cfg.featureset}; "
            "give this one another --name"
        )
    return prev


def _covered_ids(ws: Workspace, cfg: IndexConfig) -> tuple[KeySet, int]:
    """(ids the index should hold, ids of the datasets that have no feature row yet), as compact
    keys (``core/keys.py``): a few tens of bytes an image, at millions of images."""
    if not cfg.datasets:
        return committed_keys(ws, cfg.featureset), 0
    groups = (t[S.IMAGE_ID] for d in cfg.datasets for t in manifest_groups(ws, d, [S.IMAGE_ID]))
    listed = sorted_unique(filled(groups, sum(manifest_rows(ws, d) for d in cfg.datasets)), owned=True)
    known = committed_among(ws, cfg.featureset, KeyIndex(listed))  # a byte an id, not a set of the features' ids
    missing = int((~known).sum())
    if missing:
        log.warning(
            "%d images of %s have no features in %s yet: run 'imgfeat extract' first",
            missing,
            ", ".join(cfg.datasets),
            cfg.featureset,
        )
    return KeySet(listed if not missing else listed[known], owned=True), missing


def _wanted_params(cfg: IndexConfig, prev: IndexInfo | None, total: int, dim: int) -> IndexParams:
    """``auto`` keeps an existing approximate index's kind, unless the budget now needs ivfpq; a flat
    one turns approximate when it outgrows flat (or the budget)."""

    def resolve(kind: str) -> IndexParams:
        return resolve_params(kind, total, cfg.nlist, cfg.nprobe, cfg.hnsw_m, cfg.ef_search, cfg.seed, dim, cfg.budget)

    auto = resolve(cfg.kind)
    if cfg.kind == "auto" and prev is not None and prev.kind not in ("flat", auto.kind) and auto.kind != "ivfpq":
        return resolve(prev.kind)
    return auto


def _needs_rebuild(prev: IndexParams, wanted: IndexParams, cfg: IndexConfig, total: int) -> bool:
    """A kind or parameter change, or an IVF index that outgrew the sample it was trained on."""
    if wanted.kind != prev.kind:
        return True
    if prev.kind in ("ivf", "ivfpq"):
        outgrown = total > RETRAIN_GROWTH * prev.rows_at_training
        return outgrown or cfg.nlist not in (None, prev.nlist) or cfg.nprobe not in (None, prev.nprobe)
    if prev.kind == "hnsw":
        return (prev.hnsw_m, prev.ef_search) != (wanted.hnsw_m, wanted.ef_search)
    return False


@dataclass
class Built:
    """A filled FAISS index and how to make its ids table: ``_commit`` writes the index, lets it go,
    and only then calls ``id_rows``, so the ids' bookkeeping never shares the memory with the index."""

    index: Any  # the FAISS index (None once written)
    params: IndexParams
    id_rows: Callable[[], IdRows]
    scratch: list[ScratchArray] = field(default_factory=list)  # closed once the ids table is written

    def close(self) -> None:
        for part in self.scratch:
            part.close()


def _fresh(ws: Workspace, cfg: IndexConfig, params: IndexParams, old: CommittedIds, new: KeySet) -> Built:
    """Every row, old ones first in their committed order (so the old ids file stays a prefix)."""
    if params.kind in ("ivf", "ivfpq"):
        return _fresh_streamed(ws, cfg, params, old, new)
    # a flat or HNSW index holds every vector in memory anyway: ids as Python strings are small beside them
    old_ids = as_strings(old.keys())
    new_ids = set(as_strings(new.keys()))
    ids, X = read_vectors(ws, cfg.featureset, new_ids.union(old_ids))
    pos = {i: k for k, i in enumerate(ids)}
    gone = [i for i in old_ids if i not in pos]
    if gone:
        raise ImgfeatError(
            f"index {cfg.index_name}: {len(gone)} of its images (e.g. {gone[0]}) no longer have a "
            f"feature row in {cfg.featureset}; build a new index under another --name"
        )
    order = [pos[i] for i in old_ids] + [k for k, i in enumerate(ids) if i in new_ids]
    if order != list(range(len(ids))):
        X = X[order]
    ids = [ids[k] for k in order]
    index = make_index(params, X.shape[1])
    params = train(index, params, X)
    add_in_chunks(index, X)
    del X
    in_order = ids[len(old_ids) :]
    added = KeyIndex(in_order)
    return Built(index, params, lambda: _id_rows(ws, cfg, old, added, added.ranks(in_order)))


def _fresh_streamed(ws: Workspace, cfg: IndexConfig, params: IndexParams, old: CommittedIds, new: KeySet) -> Built:
    """An IVF index trained on a seeded sample and filled a batch at a time from the shards.

    In three phases that never hold their memory at once: the ids (a compact key each) choose the
    sample and plan the fill (``_plan``), then go to a scratch file; the index is trained and
    filled from the plan, a bit per feature row; once it is written and let go, the ids come back
    for its ids table. Rows keep ``_fresh``'s order (old ones at their committed positions, new
    ones after in shard order) through FAISS ids."""
    old_keys = old.keys()  # in their committed order: each keeps its position
    new.add(old_keys)  # `new` becomes every id (consumed: one array of keys, not two)
    everything = KeyIndex(new.take())  # sorted and distinct: owns that array, ranks in its order
    total = len(everything)
    dim = featureset_dim(ws, cfg.featureset)
    size = sample_size(params, total, dim, cfg.budget)
    pool = everything.keys()  # sorted: a seeded sample of ids, the same whatever the shard order
    _, sample = read_vectors(ws, cfg.featureset, as_strings(pool[sample_rows(len(pool), size, params.seed)]))
    del pool
    plan = _plan(ws, cfg, everything, old_keys)
    try:
        keys = plan.set_aside(everything)
        del everything, old_keys
        release_freed_memory()  # the id sets and their transient copies
        index = make_index(params, dim)
        params = train_on_sample(index, params, sample, total)
        del sample
        if total * (index.code_size + ID_BYTES) > cfg.budget // PRESIZE_SHARE:
            _presize(cfg, index, plan)
        came = _fill(cfg, index, plan, old.num_rows)
    except BaseException:
        plan.close()
        raise
    release_freed_memory()  # the batches' and the growing inverted lists' old buffers
    return Built(
        index, params, lambda: _id_rows(ws, cfg, old, KeyIndex(keys.read()), plan.ranks_of(came)), plan.scratch
    )


TRIM_EVERY = 16  # batches added between two release_freed_memory calls (each costs milliseconds)
PRESIZE_SHARE = 4  # inverted lists over this share of the budget get their room before the fill


@dataclass
class FillPlan:
    """The feature rows an index is filled with (``featureset.plan_rows``: a bit a shard row), and,
    in scratch files, what each of those rows is: its id's rank among the wanted ids and, when the
    index keeps old rows, its position among them (-1: a new row)."""

    rows: RowPlan
    ranks: ScratchArray
    old_at: ScratchArray | None
    scratch: list[ScratchArray]

    def set_aside(self, wanted: KeyIndex) -> ScratchArray:
        """The wanted ids' keys, in a scratch file until the ids table needs them."""
        keys = ScratchArray(wanted.keys().dtype)
        self.scratch.append(keys)
        keys.append(wanted.keys())
        return keys

    def ranks_of(self, rows: np.ndarray) -> np.ndarray:
        """The ranks of the plan rows marked in ``rows`` (a bool by plan row), in plan order."""
        out = np.empty(int(rows.sum()), self.ranks.dtype)
        n, step = 0, 1 << 20
        for lo in range(0, len(rows), step):
            part = self.ranks.read(lo, lo + step)[rows[lo : lo + step]]
            out[n : n + len(part)] = part
            n += len(part)
        return out

    def close(self) -> None:
        for part in self.scratch:
            part.close()


def _plan(ws: Workspace, cfg: IndexConfig, wanted: KeyIndex, old_ids: np.ndarray) -> FillPlan:
    """Plan the fill with the rows of ``wanted`` (``featureset.plan_rows``); ``old_ids``, the rows
    an index keeps, take their positions."""
    ranks = ScratchArray(np.int32 if len(wanted) < 2**31 else np.int64)
    old_pos = KeyIndex(old_ids) if len(old_ids) else None
    old_at = ScratchArray(np.int64) if old_pos is not None else None
    plan = FillPlan(RowPlan([], 0), ranks, old_at, [ranks] + ([old_at] if old_at is not None else []))
    keys = wanted.keys()

    def each(r: np.ndarray) -> None:
        ranks.append(r)
        if old_pos is not None and old_at is not None:
            old_at.append(old_pos.positions(keys[r]))

    try:
        plan.rows = plan_rows(ws, cfg.featureset, wanted, each)
    except BaseException:
        plan.close()
        raise
    return plan


def _presize(cfg: IndexConfig, index: Any, plan: FillPlan) -> None:
    """Count the rows of each inverted list in a first pass, and give every list that room.

    Filled a batch at a time, a list grows by reallocation: a doubling leaves up to half of it
    unused, and the heap keeps the old block. On a 1M x 128 IVF-flat that came to ~150 MB over its
    512 MB of rows. The pass costs a second read of the features (one coarse search a row), so it
    runs only where the lists are a large share of the budget."""
    counts = np.zeros(index.nlist, np.int64)
    batch = fill_batch_rows(index.d, cfg.budget)
    with progress(total=plan.rows.rows, desc=f"index {cfg.index_name}: list sizes", unit="row") as bar:
        for at, X in iter_planned(cfg.featureset, plan.rows, batch):
            counts += np.bincount(list_of(index, normalise(X)), minlength=index.nlist)
            bar.update(len(at))
    presize_lists(index, counts)


def _fill(cfg: IndexConfig, index: Any, plan: FillPlan, n_old: int) -> np.ndarray:
    """Add the plan's rows, a batch at a time: old rows at their positions (FAISS ids of an IVF
    index), new ones after, in plan order. Returns which plan rows were added as new rows (a bool
    each); an old row that did not come is an error (its position would be a hole)."""
    came = np.zeros(plan.rows.rows, dtype=bool)
    n_new = old_came = 0
    batch = fill_batch_rows(index.d, cfg.budget)
    with progress(total=plan.rows.rows, desc=f"index {cfg.index_name}", unit="row") as bar:
        for done, (at, X) in enumerate(iter_planned(cfg.featureset, plan.rows, batch), 1):
            X = normalise(X)
            if plan.old_at is not None:
                labels = plan.old_at.read(int(at[0]), int(at[-1]) + 1)[at - at[0]]
                fresh = labels < 0
                old_came += len(labels) - int(fresh.sum())
                labels[fresh] = n_old + n_new + np.arange(int(fresh.sum()))
                index.add_with_ids(X, labels)
                came[at[fresh]] = True
                n_new += int(fresh.sum())
            else:  # rows in order: plain add works for every kind
                index.add(X)
                came[at] = True
            if done % TRIM_EVERY == 0:  # the inverted lists grow by reallocation: hand their old buffers back
                release_freed_memory()
            bar.update(len(at))
    if old_came != n_old:
        raise ImgfeatError(
            f"index {cfg.index_name}: {n_old - old_came} of its images no longer have a feature row "
            f"in {cfg.featureset}; build a new index under another --name"
        )
    return came


def _extended(ws: Workspace, cfg: IndexConfig, prev: IndexInfo, old: CommittedIds, new: KeySet) -> Built:
    """The committed index with the new rows added after its own, streamed from the shards (planned
    before the index is read: ``_fresh_streamed``)."""
    wanted = KeyIndex(new.take())  # (`new` is left empty)
    plan = _plan(ws, cfg, wanted, np.zeros(0, "S1"))
    try:
        keys = plan.set_aside(wanted)
        del wanted
        release_freed_memory()
        index = read_faiss(ws, prev)
        came = _fill(cfg, index, plan, 0)
    except BaseException:
        plan.close()
        raise
    return Built(
        index, prev.params, lambda: _id_rows(ws, cfg, old, KeyIndex(keys.read()), plan.ranks_of(came)), plan.scratch
    )


@dataclass(frozen=True)
class IdRows:
    """The ids table (``image_id, dataset, path``): the committed rows, then the new ones, made a
    batch at a time as it is written. Per new id it holds numbers (its rank, its dataset, its
    manifest row), not strings: each batch's paths are read from the manifests' row groups, kept
    open from the moment they were matched (a rescan that replaces a manifest meanwhile replaces
    the file's name, not the file read). At 10M synthetic rows the paths alone were 260 MB."""

    old: CommittedIds  # read again as it is copied (never held as a table)
    ids: KeyIndex  # the new rows' ids are ids.keys()[ranks]
    ranks: np.ndarray
    src: np.ndarray  # by rank: the manifest row (position in its file) holding its path (-1: none)
    dataset_of: np.ndarray  # by rank: the index of its dataset in `names` (-1: none)
    names: list[str]
    manifests: list[ManifestRows]  # the datasets' manifests, as `names`

    @property
    def num_rows(self) -> int:
        return self.old.num_rows + len(self.ranks)

    def batches(self, rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        yield from self.old.batches()
        names = pa.array(self.names, pa.string())
        for start in range(0, len(self.ranks), rows):
            r = self.ranks[start : start + rows]
            src, dataset_of = self.src[r], self.dataset_of[r]
            dataset = pa.DictionaryArray.from_arrays(pa.array(dataset_of, pa.int32(), mask=dataset_of < 0), names)
            yield pa.record_batch(
                [keys_to_arrow(self.ids.keys()[r]), dataset.cast(pa.string()), self._paths(src, dataset_of)],
                schema=S.INDEX_IDS_SCHEMA,
            )

    def _paths(self, src: np.ndarray, dataset_of: np.ndarray) -> pa.Array:
        """The paths of these manifest rows (null where none), read from their row groups."""
        parts, where = [], np.full(len(src), -1, np.int64)  # where: each row's place in the parts
        done = 0
        for k, rows in enumerate(self.manifests):
            mine = np.flatnonzero(dataset_of == k)
            if len(mine):
                parts.append(rows.take(src[mine])[S.PATH].combine_chunks())
                where[mine] = done + np.arange(len(mine))
                done += len(mine)
        taken = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
        return taken.take(pa.array(where, pa.int64(), mask=where < 0))

    def close(self) -> None:
        for rows in self.manifests:
            rows.close()


def _id_rows(ws: Workspace, cfg: IndexConfig, old: CommittedIds, ids: KeyIndex, ranks: np.ndarray) -> IdRows:
    """The ids table: ``old``, then the new rows, the ids of these ``ranks`` in ``ids`` in that
    order, each with its first readable manifest row over the datasets in order (dataset and path;
    null if none), the manifests read a row group at a time."""
    names = list(cfg.datasets or scanned_datasets(ws)) if len(ranks) else []
    manifests: list[ManifestRows] = []
    try:
        for d in names:
            path = manifest_file(ws, d)
            try:
                manifests.append(ManifestRows(path, [S.IMAGE_ID, S.PATH, S.STATUS]))
            except (OSError, pa.ArrowException) as exc:
                raise corrupt_manifest(path, d, exc) from None
        # by rank: its manifest row and dataset, in the narrowest integers that hold them
        longest = max((rows.num_rows for rows in manifests), default=0)
        src = np.full(len(ids), -1, dtype=np.int32 if longest < 2**31 else np.int64)
        dataset_of = np.full(len(ids), -1, dtype=np.int16 if len(names) < 2**15 else np.int32)
        for k, (d, rows) in enumerate(zip(names, manifests)):
            path = manifest_file(ws, d)
            try:
                for g in range(rows.num_row_groups):
                    t = rows.group(g)
                    at = np.flatnonzero(np.asarray(readable(t), dtype=bool))
                    r = ids.ranks(t[S.IMAGE_ID].take(pa.array(at, pa.int64())))
                    hit = np.flatnonzero(r >= 0)
                    hit = hit[src[r[hit]] < 0]  # not found in an earlier row or dataset
                    if not len(hit):
                        continue
                    _, first = np.unique(r[hit], return_index=True)  # an id twice in a group: its first row
                    hit = hit[first]
                    src[r[hit]] = rows.starts[g] + at[hit]
                    dataset_of[r[hit]] = k
            except (OSError, pa.ArrowException) as exc:
                raise corrupt_manifest(path, d, exc) from None
    except BaseException:
        for rows in manifests:
            rows.close()
        raise
    return IdRows(old, ids, ranks, src, dataset_of, names, manifests)


def _commit(
    ws: Workspace,
    cfg: IndexConfig,
    fs_info: JsonObject,
    prev: IndexInfo | None,
    built: Built,
    run_id: str,
) -> IndexInfo:
    """Index file (new name), ids.parquet (old rows stay its prefix), then the provenance: the commit.

    The index is let go once its file is written, before its ids table is made (``Built``).
    ``prev`` is the provenance before (its creation time is kept).
    """
    folder, files = ws.index_dir(cfg.index_name), ws.index_files_dir(cfg.index_name)
    index_file = f"{INDEX_PREFIX}{run_id}{INDEX_SUFFIX}"
    try:
        index, built.index = built.index, None
        with atomic_path(files / index_file) as tmp:
            write_faiss(index, tmp)
        rows, dim = int(index.ntotal), int(index.d)
        del index
        release_freed_memory()
        digest = IdsDigest()
        table = built.id_rows()
        try:
            with (
                atomic_path(folder / IDS_FILE) as tmp,
                pq.ParquetWriter(tmp, S.INDEX_IDS_SCHEMA, compression="zstd") as out,
            ):
                for batch in table.batches():
                    out.write_batch(batch)
                    digest.update(batch.column(0))
        finally:
            table.close()
    finally:
        built.close()
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    fingerprint = fs_info.get("fingerprint")  # a string in every provenance extract writes
    info = IndexInfo(
        name=cfg.index_name,
        featureset=cfg.featureset,
        featureset_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
        dim=dim,
        datasets=tuple(cfg.datasets),
        params=built.params,
        rows=rows,
        ids_digest=digest.hexdigest(),
        index_file=index_file,
        created_at=prev.created_at if prev else now,
        updated_at=now,
        run_id=run_id,
        index_bytes=(files / index_file).stat().st_size,
        path=str(folder),
    )
    obj = info.to_json()
    obj.pop("path")
    write_json_atomic(obj, files / PROVENANCE_FILE)
    for stale in files.glob(f"{INDEX_PREFIX}*{INDEX_SUFFIX}"):
        if stale.name != index_file:
            remove_file(stale, ws.root)
    return info


def _summary(
    cfg: IndexConfig, info: IndexInfo, added: int, rebuilt: bool, written: bool, missing: int, t0: float
) -> IndexSummary:
    return IndexSummary(
        index=info.name,
        featureset=info.featureset,
        kind=info.kind,
        rows=info.rows,
        added=added,
        rebuilt=rebuilt,
        written=written,
        missing_features=missing,
        index_dir=info.path,
        seconds=round(time.perf_counter() - t0, 3),
        params=info.params.to_json(),
        index_bytes=info.index_bytes,
    )
