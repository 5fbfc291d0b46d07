"""Near-duplicate groups, train/test leaks and label conflicts of a dataset over a featureset: tables, summary, page.

The default criterion: each image's nearest neighbours by features are the candidates, and a
candidate pair is a copy when the two images look alike (``imgfeat.index.looks``: luminance
detail, blind to colour, size, brightness, re-encoding, letterboxing and slight turns). Images
whose file cannot be read are judged by features alone (cosine >= FALLBACK_COSINE). The very
same bytes under two paths are always duplicates. ``threshold`` replaces all of this with a
fixed cosine of the features (the criterion before looks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol, TypeAlias, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.hashing import CONTENT_ID_ALGORITHM, content_hasher, digest_chunks
from imgfeat.core.keys import (
    PACKED,
    KeyIndex,
    KeyLike,
    as_strings,
    concat_keys,
    filled,
    keys_equal,
    keys_of,
    keys_to_arrow,
    like,
    search_buckets,
    sorted_unique,
    word_bucket_of,
    word_bucket_starts,
)
from imgfeat.core.options import opt
from imgfeat.core.progress import progress
from imgfeat.core.ranges import check_fields
from imgfeat.core.results import JsonObject, JsonResult
from imgfeat.core.sizes import memory_budget, release_freed_memory
from imgfeat.core.storage import (
    FileLock,
    atomic_path,
    remove_stale_tmp,
    scratch_file,
    scratch_writes,
    write_bytes_atomic,
    write_json_atomic,
    write_table_atomic,
)
from imgfeat.core.stores import ImageRoot
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.extract.featureset import featureset_dim, featureset_info
from imgfeat.index.kinds import (
    FINE_LISTS,
    MIN_POINTS_PER_LIST,
    TRAIN_ITERATIONS,
    TRAIN_SAMPLE,
    IndexParams,
    add_in_chunks,
    flat_bytes,
    import_faiss,
    ivfpq_bytes,
    make_index,
    presize_lists,
    reduce_dims,
    resolve_params,
    sample_rows,
    sample_size,
    set_search_params,
    streamed_two_level_centroids,
    train_on_sample,
    two_level_index,
)
from imgfeat.index.looks import (
    LOOK_BYTES,
    LOOK_THRESHOLD,
    LOOK_VERSION,
    SIDE,
    VARIANTS,
    LookStore,
    calibrate,
    look_similarity,
    looks_of_files,
)
from imgfeat.index.page import render_page
from imgfeat.index.scratch import (
    KeyStore,
    ScratchArray,
    Vectors,
    VectorStore,
    block_rows,
    read_into,
    reduce_store,
    rescore_block,
    similarities_to,
    write_all,
)
from imgfeat.index.vectors import iter_vectors, read_vectors
from imgfeat.scan.manifest import corrupt_manifest, dataset_root, manifest_file
from imgfeat.scan.rows import ManifestRows, readable

log = logging.getLogger(__name__)
_T = TypeVar("_T")

FALLBACK_COSINE = 0.9  # pairs without a look (unreadable files): copies of real photos mostly score above
MIRROR_COSINE = 0.9  # a mirrored look counts only when the features agree this much (symmetric scenes)
DEFAULT_NEIGHBOURS = 20  # candidates per image: copies rank within the first 15 on real photos (bench_dedup)
CALIBRATION_IMAGES = 32  # images of the dataset whose synthetic copies check the look (0: none)
# One table per folder (every reader opens a folder as exactly its rows); the page and summary beside.
GROUPS_DIR, LEAKS_DIR, TABLE_FILE = "groups", "leaks", "part-0.parquet"
PAGE_FILE, SUMMARY_FILE = "index.html", "_dedup.json"
OLD_FILES = ("groups.parquet", "leaks.parquet")  # the layout before one table per folder: removed on rerun
LOOKS_FILE = "_cache/looks.parquet"  # image_id -> look: a rerun decodes only images it has not seen
RECALIBRATE_GROWTH = 2  # the calibration is redone once the dataset holds this many times the images it had
PAIRS_FILE, SEARCHED_FILE = "_cache/pairs.parquet", "_cache/searched.parquet"  # last run's candidates, its images
RESEARCH_NEW_FRACTION = 0.5  # more new images than this share of all: every image is searched again
SEARCH_CHUNK = 1024  # new images compared with all at a time ...
BLOCK_ROWS = 16_384  # ... a block of all at a time: a 1024 x 16384 float32 working set (64 MiB)
SELECT_ROWS = 256  # ... whose rows are ranked this many at a time (their candidates' positions: int64)
EXACT_MAX = 20_000  # above this many images the neighbour search is approximate (IVF)
DEDUP_NPROBE = 8  # near-copies sit in the same or a neighbouring list: a few lists find them
LIST_ROWS = 160  # past 2 sqrt(n) lists, one list per this many rows: a query scans a constant number
FINE_NPROBE = 12  # lists searched per query once they are that fine (each a smaller part of the space)
# bytes of IVF-PQ code per row at most: codes only propose candidates (exact cosines decide), and 16
# find the same near-copies 64 do, scanned in a third of the time (a million synthetic rows)
DEDUP_PQ_BYTES = 16
FINE_SAMPLE_SHARE = 8  # the two-level quantizer's training sample takes at most this share of the budget
CANDIDATE_DIMS = 256  # approximate search finds candidates on this many principal components
IN_MEMORY_SHARE = 0.5  # vectors taking more of the memory budget than this go to a scratch file
INDEX_SHARE = 4  # the candidate index takes at most 1/INDEX_SHARE of the budget (else IVF-PQ codes sized to it)


@dataclass(frozen=True)
class DedupConfig:
    """Which dataset and featureset, the criterion, and where the results go (dedup/<name>/).

    ``threshold`` None: the default criterion (feature neighbours checked by their looks); a
    number: a fixed cosine of the features instead.
    """

    featureset: str = opt(
        metavar="FS", help="the featureset to compare images by: its name, a recipe name or RECIPE@ID"
    )
    dataset: str = opt(metavar="NAME", help="the dataset to look into")
    threshold: float | None = opt(
        None,
        metavar="T",
        help="instead of the default criterion: a cosine similarity of the features, in "
        "(0, 1], at or above which two images are near-duplicates",
    )
    # candidates per image; groups still chain through neighbours of neighbours
    neighbours: int = opt(
        DEFAULT_NEIGHBOURS, metavar="K", help=f"candidate neighbours looked at per image (default {DEFAULT_NEIGHBOURS})"
    )
    name: str | None = opt(None, metavar="NAME", help="output folder name under dedup/ (default: the dataset)")
    page_groups: int = 200  # groups drawn on the HTML page (all of them are in the table)
    exact_max: int = EXACT_MAX
    calibration_images: int = CALIBRATION_IMAGES
    wait: float | None = None
    # Bytes the neighbour search's index may use: exact while a copy of the vectors fits it, else
    # approximate (ivf, or ivfpq when even that does not fit). None: exact up to exact_max.
    memory_budget: int | None = opt(
        None,
        metavar="SIZE",
        help="memory the neighbour search may use, e.g. 256MB or 2GiB: exact while a copy of the vectors fits, else approximate and rescored exactly (default: a quarter of RAM)",
    )

    @property
    def budget(self) -> int:
        """The memory budget in bytes: the one given, else a quarter of physical RAM."""
        return memory_budget(self.memory_budget)

    def __post_init__(self) -> None:
        check_name("featureset", self.featureset)
        check_name("dataset", self.dataset)
        check_name("dedup", self.out_name)
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1):
            raise ConfigError(f"dedup threshold must be a cosine similarity in (0, 1], got {t!r}")
        for key in ("neighbours", "page_groups", "exact_max"):  # memory_budget: check_fields (a size)
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dedup {key} must be a positive integer, got {value!r}")
        c = self.calibration_images
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 10_000:
            raise ConfigError(f"dedup calibration_images must be an integer from 0 to 10000, got {c!r}")
        check_fields(self)  # and the upper bounds their flags and keys have (neighbours up to 1000)

    @property
    def out_name(self) -> str:
        return self.name or self.dataset


@dataclass(frozen=True)
class DedupSummary(JsonResult):
    """What `imgfeat dedup` found; ``to_json`` is its --json object."""

    dataset: str
    featureset: str
    threshold: float | None  # the fixed cosine given, None under the default criterion
    criterion: dict[str, Any]  # its name, parameters and calibration (see ``criterion_summary``)
    images: int
    paths: int
    missing_features: int
    search: str  # "exact", or "approximate (ivf)": candidates on CANDIDATE_DIMS components, rescored exactly
    groups: int
    grouped_paths: int
    exact_duplicate_paths: int
    groups_table: str
    leaks: int
    leaks_table: str
    label_conflicts: int  # groups holding two or more labels
    label_conflict_paths: int
    page: str
    seconds: float
    written: bool = True  # False: nothing changed since the last run, whose results stand
    inputs_digest: str = ""  # the rows, featureset and criterion the results were computed from
    timings: dict[str, float] = field(default_factory=dict)  # read, neighbours, tables, page, write


@dataclass(frozen=True)
class Neighbours:
    """Each unique image's nearest other images: ``rows[u]`` (-1: none) and ``sims[u]``, best first."""

    sims: np.ndarray
    rows: np.ndarray
    kind: str


@dataclass(frozen=True)
class Graph:
    """Above-threshold pairs between unique images: ``a[k]`` ~ ``b[k]`` with similarity ``sim[k]``."""

    a: np.ndarray
    b: np.ndarray
    sim: np.ndarray


def dedup_params(n: int, exact_max: int, dim: int | None = None, memory_budget: int | None = None) -> IndexParams:
    """Exact up to ``exact_max`` while a copy of the vectors fits the budget; beyond, an IVF on at
    most CANDIDATE_DIMS dimensions, ivfpq when those vectors take more than a quarter of the budget.

    Lists: 2 sqrt(n), 8 probed (near-copies share a list), or one per LIST_ROWS rows where that is
    more; from FINE_LISTS lists on (about 330,000 images) FINE_NPROBE are probed, found through a
    two-level quantizer (``kinds.two_level_index``; three levels from 4,096 lists, ~655,000 images,
    ``kinds.THREE_LEVEL_LISTS``): a query then scans about the same number of rows at any n, where
    with sqrt(n) lists it scans sqrt(n) times more. Their training sample is
    streamed where the budget cannot hold it (``trained_index``), so the lists keep up with the rows
    at any budget. IVF-PQ codes take DEDUP_PQ_BYTES at most."""
    if n <= exact_max and (memory_budget is None or dim is None or flat_bytes(n, dim) <= memory_budget):
        return resolve_params("flat", n)
    nlist = max(int(2 * math.sqrt(n)), n // LIST_ROWS)
    nlist = max(1, min(nlist, n // MIN_POINTS_PER_LIST))
    nprobe = FINE_NPROBE if nlist >= FINE_LISTS else DEDUP_NPROBE
    cdim = min(dim, CANDIDATE_DIMS) if dim else None
    # the index takes a quarter of the budget where IVF-PQ codes can fit in it (the neighbour lists,
    # the pairs and a block of vectors share the rest), else up to half, as an index built alone
    if memory_budget is not None and cdim:
        quarter = memory_budget // INDEX_SHARE
        if flat_bytes(n, cdim) > quarter and ivfpq_bytes(n, cdim, nlist, 1) <= quarter:
            # (the codes are sized to half the budget given: a quarter of this one)
            return _few_code_bytes(
                resolve_params("ivfpq", n, nlist=nlist, nprobe=nprobe, dim=cdim, memory_budget=2 * quarter), cdim
            )
        if flat_bytes(n, cdim) > memory_budget:
            return _few_code_bytes(
                resolve_params("ivfpq", n, nlist=nlist, nprobe=nprobe, dim=cdim, memory_budget=memory_budget), cdim
            )
    return resolve_params("ivf", n, nlist=nlist, nprobe=nprobe)


def _few_code_bytes(params: IndexParams, dim: int) -> IndexParams:
    """``params`` with at most DEDUP_PQ_BYTES code bytes per row (a divisor of ``dim``, as ``choose_pq_m``'s)."""
    fitting = [m for m in range(1, min(DEDUP_PQ_BYTES, dim // 2) + 1) if dim % m == 0] or [1]
    return replace(params, pq_m=min(params.pq_m or fitting[-1], fitting[-1]))


def fine_sample_bytes(memory_budget: int | None) -> int | None:
    """What a two-level quantizer's training sample may take in memory: FINE_SAMPLE_SHARE of the budget."""
    return None if memory_budget is None else max(1, memory_budget // FINE_SAMPLE_SHARE)


def trained_index(Y: Vectors, params: IndexParams, memory_budget: int | None) -> tuple[Any, IndexParams]:
    """An empty index of ``params`` trained on a seeded sample of ``Y`` (rows in memory or a store):
    FAISS's own k-means up to FINE_LISTS lists, a two-level quantizer from there, its sample of
    MIN_POINTS_PER_LIST rows a list taken into memory where FINE_SAMPLE_SHARE of the budget holds
    it, else streamed through scratch stores beside ``Y`` (``kinds.streamed_two_level_centroids``)."""
    n, dim = Y.shape
    if params.kind in ("ivf", "ivfpq") and params.lists >= FINE_LISTS:
        size = max(1, min(n, MIN_POINTS_PER_LIST * params.lists))
        room = fine_sample_bytes(memory_budget)
        if room is None or size * dim * 4 <= room:
            return two_level_index(params, Y[sample_rows(n, size, params.seed)], n)
        folder = Y.folder if isinstance(Y, VectorStore) else None
        centroids = streamed_two_level_centroids(
            Y,
            params.lists,
            params.seed,
            params.train_iterations or TRAIN_ITERATIONS,
            block_rows=block_rows(dim, memory_budget, STORE_SHARE),
            spill_bytes=room,
            spill=lambda: VectorStore(dim, folder),
        )
        codes_sample = Y[sample_rows(n, min(n, TRAIN_SAMPLE), params.seed)]
        return two_level_index(params, codes_sample, n, centroids)
    index = make_index(params, dim)
    if params.kind in ("ivf", "ivfpq"):
        params = train_on_sample(index, params, Y[sample_rows(n, sample_size(params, n, dim), params.seed)], n)
    return index, params


def nearest_neighbours(X: Vectors, k: int, exact_max: int = EXACT_MAX, memory_budget: int | None = None) -> Neighbours:
    """The ``k`` nearest other rows of every row of unit vectors ``X``, with exact similarities
    (``search_neighbours``' blocks, kept whole: what the leaks of the cosine criterion read)."""
    n = len(X)
    if n < 2:
        return Neighbours(np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64), "flat")
    sims = np.empty((n, min(k + 1, n)), np.float32)
    rows = np.empty((n, min(k + 1, n)), np.int64)

    def keep(queries: np.ndarray, s: np.ndarray, r: np.ndarray) -> None:
        sims[queries], rows[queries] = s, r

    return Neighbours(sims, rows, search_neighbours(X, k, keep, exact_max, memory_budget))


Emit: TypeAlias = Callable[[np.ndarray, np.ndarray, np.ndarray], None]  # (query rows, sims, rows) of a block


def search_neighbours(
    X: Vectors, k: int, emit: Emit, exact_max: int = EXACT_MAX, memory_budget: int | None = None
) -> str:
    """Find the ``k`` nearest other rows of every row of unit vectors ``X`` with exact similarities,
    handing them to ``emit`` a block of queries at a time, each query once (best first, rows -1
    where none, never the row itself); returns the search's kind. Queries come in row order, but
    over a store with rescoring in the order of their inverted lists (``_store_search``).

    Up to ``exact_max`` rows (and while a copy fits ``memory_budget``) the search is exact. Beyond,
    candidates come from an IVF (or IVF-PQ) index over the vectors' first CANDIDATE_DIMS principal
    components and are rescored on the full vectors. No array grows with the rows times ``k``.
    """
    n = len(X)
    if n < 2:
        return "flat"
    params = dedup_params(n, exact_max, X.shape[1], memory_budget)
    if isinstance(X, VectorStore):
        if params.kind == "flat":  # a copy of the vectors fits the budget: the search in memory
            return search_neighbours(X[:], k, emit, exact_max, memory_budget)
        return _store_search(X, k, params, memory_budget, emit)
    Y = reduce_dims(X, CANDIDATE_DIMS) if params.kind != "flat" and X.shape[1] > CANDIDATE_DIMS else X
    index, built = trained_index(Y, params, memory_budget)
    add_in_chunks(index, Y)
    set_search_params(index, built)
    kk = min(k + 1, n)
    for lo in range(0, n, KNN_ROWS):
        s, r = index.search(np.ascontiguousarray(Y[lo : lo + KNN_ROWS]), kk)
        queries = np.arange(lo, lo + len(r))
        r = _not_self(queries, r)  # (before rescoring, as over a store: the same order of rows)
        if Y is not X or built.kind == "ivfpq":  # codes and components only propose: exact cosines decide
            s, r = rescore_block(X[lo : lo + len(r)], X, r)
        emit(queries, s, r)
    return built.kind


KNN_ROWS = 8192  # queries searched at a time in memory (``kinds.knn``'s chunk)
QUERY_ROWS = 8192  # queries searched (and their candidates rescored) at a time from a store
# of the budget, the rows read from a store at a time: streamed into it, added to the index, or
# candidates rescored (FAISS' add, or the gathering of candidates, takes a few times as much)
STORE_SHARE = 32


def _not_self(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Neighbour rows of ``queries`` with each query's own row as -1 (in place)."""
    rows[rows == queries[:, None]] = -1
    return rows


def _list_blocks(index: Any, n: int, size: int) -> Iterator[np.ndarray]:
    """The rows of an IVF index, list after list, ``size`` at a time (the last block fewer; int64),
    or in row order when its lists do not hold ``n`` rows: queries taken in this order share most
    of their candidates within a block, so rescoring reads far fewer rows. Read from the lists as
    the blocks are wanted: no array of every row's place (40 MB at ten million rows)."""
    faiss = import_faiss()
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    if sum(lists.list_size(at) for at in range(ivf.nlist)) != n:
        yield from _row_blocks(n, size)
        return
    pending: list[np.ndarray] = []
    held = 0
    for at in range(ivf.nlist):
        count = lists.list_size(at)
        if not count:
            continue
        ids = lists.get_ids(at)
        pending.append(faiss.rev_swig_ptr(ids, count).astype(np.int64))  # (a copy: the list's ids are released)
        lists.release_ids(at, ids)
        held += count
        if held >= size:
            rows = np.concatenate(pending)
            done = len(rows) - len(rows) % size
            yield from (rows[lo : lo + size] for lo in range(0, done, size))
            pending, held = [rows[done:]], len(rows) - done
    if held:
        yield np.concatenate(pending)


def fill_presized(index: Any, Y: VectorStore, rows_at_a_time: int, probes: VectorStore | None = None) -> None:
    """Fill an IVF index from a store a block at a time, every inverted list given its room first.

    Filled a block at a time, a list grows by doubling, up to twice its rows (IVF-PQ at 10M rows:
    hundreds of MB over its codes). So each row's list is found first (one coarse search a row,
    kept as 4 bytes a row, or with ``probes`` read back from them), the lists sized to their
    counts (``presize_lists``), and the rows added with their lists (``add_core``): the coarse
    search is not repeated, the store is read twice.

    ``probes`` (an int32 store of ``index.nprobe`` columns, IVF only): that coarse search asks for
    each row's ``index.nprobe`` nearest lists and appends them in row order, the first its own
    list, so that searching the rows later need not find them again (``search_preassigned``)."""
    if not preassigned(index):  # not a bare IVF (flat, HNSW, a transform before it): filled as it grows
        for _, B in Y.blocks(rows_at_a_time):
            index.add(np.ascontiguousarray(B))
        return
    faiss = import_faiss()
    ivf = faiss.extract_index_ivf(index)
    counts = np.zeros(ivf.nlist, np.int64)
    lists = np.empty(len(Y) if probes is None else 0, np.int32)  # (with probes: their first column)
    for lo, B in Y.blocks(rows_at_a_time):
        near = nearest_lists(index, B, 1 if probes is None else probes.dim)
        counts += np.bincount(near[:, 0], minlength=ivf.nlist)
        if probes is None:
            lists[lo : lo + len(B)] = near[:, 0]
        else:
            probes.append(near)
    presize_lists(index, counts)
    step = _encode_rows(ivf)
    for lo, B in Y.blocks(rows_at_a_time):
        own = lists[lo : lo + len(B)] if probes is None else probes.block(lo, lo + len(B))[:, 0]
        for at_row in range(0, len(B), step):
            x = np.ascontiguousarray(B[at_row : at_row + step], np.float32)
            at = own[at_row : at_row + len(x)].astype(np.int64)
            ivf.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(at))  # both stay referenced until it returns


PQ_TABLE_BYTES = 32 << 20  # what IVF-PQ's encoder may hold in distance tables for the rows it adds at a time


def _encode_rows(ivf: Any) -> int:
    """Rows to add to ``ivf`` at a time. FAISS encodes PQ codes of 16 or more dimensions a
    sub-vector by way of a distance table for each row, 256 floats a sub-quantizer, for up to
    32,768 rows at once: at 8 sub-quantizers of 16 dimensions (10M rows of 128 under a 1GB budget)
    268 MB for a moment, the 10M dedup's peak. Added a few thousand rows at a time, 32 MB."""
    pq = getattr(import_faiss().downcast_index(ivf), "pq", None)
    if pq is None:
        return 1 << 30
    return max(1, PQ_TABLE_BYTES // (int(pq.ksub) * int(pq.M) * 4))


def nearest_lists(index: Any, X: np.ndarray, probes: int) -> np.ndarray:
    """The ``probes`` nearest inverted lists of each row of ``X`` in an IVF index, nearest first
    (int32; -1 where its quantizer finds fewer): the coarse search ``index.search`` would make.

    Through a quantizer of nested IVFs (``kinds.list_quantizer``) the rows are searched grouped by
    their nearest top-level centroid (a few dozen, compared flat), so that rows in a row read the
    same groups of centroids while they are in the CPU's cache: at 62,500 lists (10M rows) 18 us
    a row became 13 (FAISS gives each row the same lists in any order)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    top = _top_level(index.quantizer)
    if top is None or len(X) < 2:
        _, at = index.quantizer.search(X, probes)
        return np.asarray(at, np.int32)
    _, group = top.search(X, 1)
    order = np.argsort(group[:, 0], kind="stable")
    _, at = index.quantizer.search(X[order], probes)
    out = np.empty(at.shape, np.int32)
    out[order] = at
    return out


def _top_level(quantizer: Any) -> Any:
    """The flat index at the top of a quantizer of nested IVFs (None for a flat quantizer)."""
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(quantizer)
    if ivf is None:
        return None
    while True:
        inner = faiss.downcast_index(ivf.quantizer)
        nested = faiss.try_extract_index_ivf(inner)
        if nested is None:
            return inner
        ivf = nested


def preassigned(index: Any) -> bool:
    """Whether ``index`` is a bare IVF whose search can be handed its queries' lists."""
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and ivf.this == index.this


# FAISS's ``search`` spreads its queries over the threads itself; ``search_preassigned`` does only
# in this mode (its default, 0, searches the queries one thread after another)
PARALLEL_OVER_QUERIES = 3


def _store_search(X: VectorStore, k: int, params: IndexParams, memory_budget: int | None, emit: Emit) -> str:
    """``search_neighbours``' approximate search over vectors in a scratch store: the principal
    components computed a block at a time into a second store, the index filled and queried a
    block at a time, each block's candidates rescored on the rows they name (read from ``X``).
    Memory: the index and a block, not the vectors."""
    n, dim = X.shape
    Y = reduce_store(X, CANDIDATE_DIMS, block_rows(dim, memory_budget)) if dim > CANDIDATE_DIMS else X
    probes = None
    try:
        index, params = trained_index(Y, params, memory_budget)
        set_search_params(index, params)
        if preassigned(index):  # each row's lists found once, as it is added, not again as it is searched
            index.nprobe = min(index.nprobe, index.nlist)
            index.parallel_mode = PARALLEL_OVER_QUERIES
            probes = VectorStore(index.nprobe, Y.folder, np.int32)
        fill_presized(index, Y, block_rows(Y.shape[1], memory_budget, STORE_SHARE), probes)
        kk = min(k + 1, n)
        step = max(1, min(QUERY_ROWS, block_rows(dim, memory_budget, STORE_SHARE) // kk))  # queries rescored at a time
        rescoring = Y is not X or params.kind == "ivfpq"  # codes and components only propose: exact cosines decide
        blocks = _list_blocks(index, n, QUERY_ROWS) if rescoring else _row_blocks(n, QUERY_ROWS)
        for queries in blocks:
            B = np.ascontiguousarray(Y[queries])  # (in row order: one read)
            if probes is None:
                s, r = index.search(B, kk)
            else:
                s, r = index.search_preassigned(B, kk, probes[queries], None)
            r = _not_self(queries, r)  # (before rescoring: a query's own row is not read again)
            if rescoring:
                for at in range(0, len(B), step):
                    end = min(at + step, len(B))
                    Q = B[at:end] if Y is X else X[queries[at:end]]
                    s[at:end], r[at:end] = rescore_block(Q, X, r[at:end])
            emit(queries, s, r)
        del index
    finally:
        if probes is not None:
            probes.close()
        if Y is not X:
            Y.close()
    return params.kind


def _row_blocks(n: int, size: int) -> Iterator[np.ndarray]:
    for lo in range(0, n, size):
        yield np.arange(lo, min(n, lo + size))


def similar_pairs(nb: Neighbours, threshold: float) -> Graph:
    """Each pair of images at or above ``threshold`` (found among the neighbour lists) once (the
    similarity of its first listing), ordered by (a, b)."""
    with PairRanges(len(nb.rows), int(np.count_nonzero(nb.rows >= 0))) as pairs:
        for lo in range(0, len(nb.rows), QUERY_ROWS):
            pairs.add_listed(lo, nb.sims[lo : lo + QUERY_ROWS], nb.rows[lo : lo + QUERY_ROWS], threshold)
        return pairs.graph()


PAIR_CHUNK = 500_000  # listed pairs a range of PairRanges holds on average (with its sort: about 25 MB)
PAIR_RECORD = np.dtype([("a", np.int64), ("b", np.int64), ("sim", np.float32)])  # packed: 20 bytes


class PairRanges:
    """Listed pairs of ``n`` nodes (``a ~ b`` with a similarity), each distinct pair kept once with
    the similarity of its first listing, without holding them all: at 20 neighbours an image, a
    million images list 20M pairs, the largest arrays of a run.

    ``add`` sends each listing (smaller node first) to an unnamed scratch file per range of its
    smaller node, in listing order; ``chunks`` gives each range's distinct pairs sorted by (a, b),
    ranges in ascending order: together, the pairs in the order one sort of all gives. In memory:
    one range (``listings`` expected in all sizes the ranges, about PAIR_CHUNK each).
    """

    def __init__(self, n: int, listings: int, folder: Path | None = None) -> None:
        ranges = max(1, min(n, listings // PAIR_CHUNK + 1))
        self.n = n
        self._bounds = np.linspace(0, n, ranges + 1).astype(np.int64)
        self._folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        self._files: list[IO[bytes]] = []
        self._distinct = False
        try:
            for _ in range(ranges):
                self._files.append(scratch_file(folder))
        except BaseException:
            self.close()
            raise

    def add(self, a: np.ndarray, b: np.ndarray, sim: np.ndarray) -> None:
        """Listings ``a[k] ~ b[k]`` (nodes) of similarity ``sim[k]``, after every one added before."""
        if self._distinct:
            raise RuntimeError("pairs added after they were read")
        rec = np.empty(len(a), PAIR_RECORD)
        rec["a"], rec["b"], rec["sim"] = np.minimum(a, b), np.maximum(a, b), sim
        where = np.searchsorted(self._bounds, rec["a"], side="right") - 1
        order = np.argsort(where, kind="stable")  # listing order within a range
        rec = rec[order]
        cuts = np.searchsorted(where[order], np.arange(len(self._files) + 1)).tolist()
        with scratch_writes(self._folder):
            for f, lo, hi in zip(self._files, cuts[:-1], cuts[1:]):
                if hi > lo:
                    f.write(rec[lo:hi].tobytes())

    def add_listed(self, nodes: int | np.ndarray, sims: np.ndarray, rows: np.ndarray, threshold: float) -> None:
        """Neighbour lists of ``nodes`` (a first node ``lo``: ``lo, lo + 1, ...``; ``search_neighbours``'
        block), those at or above ``threshold``."""
        b, s = rows.ravel(), sims.ravel()
        valid = (b >= 0) & (s >= threshold)
        if isinstance(nodes, (int, np.integer)):
            nodes = np.arange(nodes, nodes + len(rows), dtype=np.int64)
        a = np.repeat(np.asarray(nodes, np.int64), rows.shape[1])
        self.add(a[valid], b[valid], s[valid])

    def _read(self, f: IO[bytes]) -> np.ndarray:
        with scratch_writes(self._folder):  # the buffered writes land here: a full disk says so
            f.flush()
        f.seek(0)
        return np.frombuffer(f.read(), PAIR_RECORD)

    def chunks(self) -> Iterator[Graph]:
        """Each range's distinct pairs, sorted by (a, b): the first time, each range is reduced to
        them in its file."""
        for f in self._files:
            rec = self._read(f)
            if not self._distinct:
                _, first = np.unique(rec["a"] * self.n + rec["b"], return_index=True)  # stable: the first listing
                rec = rec[first]
                with scratch_writes(self._folder):
                    f.seek(0)
                    f.truncate()
                    f.write(rec.tobytes())
            yield Graph(rec["a"].copy(), rec["b"].copy(), rec["sim"].copy())
        self._distinct = True

    def graph(self) -> Graph:
        """Every distinct pair at once."""
        return concat_graphs(list(self.chunks()))

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> PairRanges:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def concat_graphs(parts: Sequence[Graph]) -> Graph:
    if not parts:
        return Graph(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    return Graph(*(np.concatenate([getattr(g, c) for g in parts]) for c in ("a", "b", "sim")))


def pair_chunks(pairs: Graph | PairRanges) -> Iterator[Graph]:
    """The pairs a range at a time (a Graph: itself)."""
    if isinstance(pairs, Graph):
        yield pairs
    else:
        yield from pairs.chunks()


@dataclass(frozen=True)
class Components:
    """The connected components of ``n`` nodes under a graph's pairs: ``comp[nodes]`` gives each
    node's label (int64), a paired node its component among the paired ones (0 .. count-1), any
    other node one of its own (count + node). Held for the paired nodes only: a label for each of
    ten million images, beside SciPy's work over them all, took ~200 MB for a few thousand pairs."""

    n: int
    paired: np.ndarray  # the nodes in a pair, sorted
    label: np.ndarray  # their components' labels
    count: int  # components among the paired nodes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, nodes: Any) -> np.ndarray:
        nodes = np.asarray(nodes, np.int64)
        out: np.ndarray = nodes + self.count
        if len(self.paired):
            at = np.minimum(np.searchsorted(self.paired, nodes), len(self.paired) - 1)
            out = np.where(self.paired[at] == nodes, self.label[at], out)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every node's label (a number per node: for small graphs and tests)."""
        labels = self[np.arange(self.n)]
        return labels if dtype is None else labels.astype(dtype)


def components(n: int, graph: Graph) -> Components:
    """The connected components of ``n`` nodes under ``graph``: only the paired nodes go through
    SciPy, every other node is a component of its own."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(graph.a):
        return Components(n, np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    paired, at = np.unique(np.concatenate([graph.a, graph.b]), return_inverse=True)
    m, k = len(paired), len(graph.a)
    sub = coo_matrix((np.ones(k, np.int8), (at[:k], at[k:])), shape=(m, m))
    count, found = connected_components(sub, directed=False)
    return Components(n, paired.astype(np.int64), found.astype(np.int64), int(count))


def best_partner(graph: Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(nodes, partner, similarity)``: each paired node (sorted) with its most similar partner
    in the graph (of equals, the last listed) and their similarity."""
    sim = np.concatenate([graph.sim, graph.sim])
    order = np.argsort(sim, kind="stable")[::-1]  # best first; of equals, the last listed first
    src = np.concatenate([graph.a, graph.b])[order]
    nodes, first = np.unique(src, return_index=True)
    return nodes.astype(np.int64), np.concatenate([graph.b, graph.a])[order][first], sim[order][first]


def looked_pairs(cands: Graph | PairRanges, L: np.ndarray | LookStore, ok: np.ndarray) -> tuple[Graph, dict[str, int]]:
    """The candidate pairs that are copies: looks alike, or (no look) features at FALLBACK_COSINE.
    Candidates are judged a range at a time; only the copies are kept, in the candidates' order."""
    copies: list[Graph] = []
    stats = dict.fromkeys(("candidate_pairs", "looked_pairs", "copy_pairs", "copy_pairs_without_look"), 0)
    for g in pair_chunks(cands):
        a, b, sim = g.a, g.b, g.sim
        both = ok[a] & ok[b]
        straight, mirrored = look_similarity(L, a[both], b[both])
        alike = np.zeros(len(a), bool)
        alike[both] = (straight >= LOOK_THRESHOLD) | ((mirrored >= LOOK_THRESHOLD) & (sim[both] >= MIRROR_COSINE))
        keep = np.where(both, alike, sim >= FALLBACK_COSINE)
        stats["candidate_pairs"] += int(len(a))
        stats["looked_pairs"] += int(both.sum())
        stats["copy_pairs"] += int(keep.sum())
        stats["copy_pairs_without_look"] += int((keep & ~both).sum())
        copies.append(Graph(a[keep], b[keep], sim[keep]))
    return concat_graphs(copies), stats


# A manifest row's flags (``Images.row_flags``): its split as a code in the low bits, none (null),
# train, or any other (held out); FIRST_ROW on its image's first row (whose file the look is read
# from); FIRST_TRAIN on its image's first row whose split is train (the path a leak names)
SPLIT_NONE, SPLIT_IS_TRAIN, SPLIT_HELD = 0, 1, 2
SPLIT_BITS, FIRST_ROW, FIRST_TRAIN = 3, 4, 8
ROW_COLUMNS = [S.IMAGE_ID, S.PATH, S.SPLIT, S.LABEL]


class RowSource(Protocol):
    """Manifest rows by position (``ROW_COLUMNS``): what ``Images`` reads paths, splits and labels from."""

    def take(self, positions: np.ndarray) -> pa.Table: ...

    def close(self) -> None: ...


class TableRows:
    """An in-memory table as a ``RowSource`` (a dataset built by hand; tests)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def take(self, positions: np.ndarray) -> pa.Table:
        return self.table.take(pa.array(np.asarray(positions, np.int64), pa.int64()))

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Images:
    """A dataset's readable manifest rows joined to the unique images that have features.

    Held as compact arrays: a manifest row's node and flags (5 bytes a row: its split, whether it
    is its image's first row, and its first training row), and each image's id as a 16-byte key,
    in memory or (vectors in a scratch file) in a scratch file of its own, read back for the few
    images a table names. Paths, splits and labels stay in the manifest and are read back
    (``column``) only for the rows a look or a table needs: at ten million rows the columns as
    Arrow strings took over a gigabyte, and the per-image arrays beside them ~280 MB.
    """

    ids: np.ndarray | KeyStore  # node k's image id as a key: ``ids[nodes]``, ``len(ids)``
    X: Vectors  # their unit vectors: in memory, or a scratch file when they do not fit the budget
    row_node: np.ndarray  # per manifest row (by position): its node, -1 unreadable or without features
    row_flags: np.ndarray  # uint8 per manifest row: its split code | FIRST_ROW | FIRST_TRAIN
    source: RowSource  # the rows' ROW_COLUMNS by position
    readable_rows: int  # readable manifest rows (with or without features)
    missing: int  # unique images without a feature row
    rows_digest: str  # of every readable row (id, path, split, label), in manifest order
    # with ids in a scratch file: the distinct ids sorted and each one's node, set aside there
    # for a rerun's joins (``node_lookup``)
    ranked: tuple[KeyStore, ScratchArray] | None = None

    def id_strings(self, nodes: np.ndarray) -> list[str]:
        """The image ids of ``nodes`` as Python strings (the few a table names)."""
        return as_strings(self.ids[np.asarray(nodes, np.int64)])

    def id_array(self, nodes: np.ndarray) -> pa.Array:
        """The image ids of ``nodes`` as an Arrow string column (no Python string each)."""
        return keys_to_arrow(self.ids[np.asarray(nodes, np.int64)])

    def node_lookup(self) -> NodeOf | RankedNodes:
        """Image id -> node for the millions of ids of a rerun's caches: over ids in memory a
        ``NodeOf``; over ids in a scratch file the sorted ids and each one's node read back
        (20 bytes an id, no sort), where a ``NodeOf`` of them all held ~40."""
        if self.ranked is None:
            return NodeOf(self.ids[:])
        keys, nodes = self.ranked
        return RankedNodes(KeyIndex(keys[:]), nodes.read())

    def column(self, name: str, rows: np.ndarray) -> list[Any]:
        """Column ``name`` of manifest rows ``rows`` as Python values (only those rows are read)."""
        col = self.source.take(np.asarray(rows, np.int64)).column(name)
        values: list[Any] = (col if name == S.PATH else col.cast(pa.string())).to_pylist()
        return values

    def flagged(self, flag: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, nodes)`` of the manifest rows carrying ``flag`` (FIRST_ROW, FIRST_TRAIN), in
        manifest order, a block of GROUP_SCAN rows at a time."""
        for lo in range(0, len(self.row_node), GROUP_SCAN):
            at = lo + np.flatnonzero(self.row_flags[lo : lo + GROUP_SCAN] & flag)
            yield at, self.row_node[at].astype(np.int64)

    def first_rows(self, nodes: np.ndarray, flag: int = FIRST_ROW) -> np.ndarray:
        """Each of ``nodes``' first manifest row (int64; ``FIRST_TRAIN``: its first training
        row), -1 where it has none: one scan of the rows' flags, no number kept per image."""
        nodes = np.asarray(nodes, np.int64)
        want = np.unique(nodes)
        found = np.full(len(want), -1, np.int64)
        if not len(want):
            return found
        for rows, got in self.flagged(flag):
            at = np.minimum(np.searchsorted(want, got), len(want) - 1)
            hit = want[at] == got
            found[at[hit]] = rows[hit]
        return found[np.searchsorted(want, nodes)]

    def train_nodes(self) -> np.ndarray:
        """A bool per node: whether a row of it is in split train."""
        out = np.zeros(len(self.ids), bool)
        for _, nodes in self.flagged(FIRST_TRAIN):
            out[nodes] = True
        return out

    def held_rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, nodes)`` of the rows with features whose split is set and not train, in
        manifest order, a block of GROUP_SCAN rows at a time."""
        for lo in range(0, len(self.row_node), GROUP_SCAN):
            node = self.row_node[lo : lo + GROUP_SCAN]
            at = np.flatnonzero(((self.row_flags[lo : lo + GROUP_SCAN] & SPLIT_BITS) == SPLIT_HELD) & (node >= 0))
            yield lo + at, node[at].astype(np.int64)

    @contextlib.contextmanager
    def parked(self, folder: Path) -> Iterator[None]:
        """The per-row arrays (and the ids, where they are in memory) moved to a scratch file under
        ``folder`` for the block, and read back after it (also when it raises): the neighbour
        search reads only the vectors. While parked they are None, so a reader fails at once
        instead of reading nothing."""
        arrays = [(name, a) for name in PARKED if isinstance(a := getattr(self, name), np.ndarray)]
        if sum(a.nbytes for _, a in arrays) < PARK_MIN_BYTES:
            yield
            return
        f = scratch_file(folder)
        try:
            at = 0
            with scratch_writes(folder):
                for _, a in arrays:
                    write_all(f.fileno(), np.ascontiguousarray(a).view(np.uint8), at)
                    at += a.nbytes
            specs = [(name, a.dtype, a.shape) for name, a in arrays]
            del arrays
            for name, _, _ in specs:
                object.__setattr__(self, name, None)  # frozen: only this method swaps them
            release_freed_memory()
            try:
                yield
            finally:
                at = 0
                for name, dtype, shape in specs:
                    a = np.empty(shape, dtype)
                    read_into(f.fileno(), a.view(np.uint8), at)
                    at += a.nbytes
                    object.__setattr__(self, name, a)
        finally:
            f.close()

    def close(self) -> None:
        """Give back the scratch files of the vectors and ids, and the manifest's file."""
        for scratch in (self.X, self.ids, *(self.ranked or ())):
            if isinstance(scratch, (VectorStore, KeyStore, ScratchArray)):
                scratch.close()
        self.source.close()


PARKED = ("ids", "row_node", "row_flags")  # what ``Images.parked`` moves out
PARK_MIN_BYTES = 16 << 20  # below this they stay in memory (a million images: ~5 MB of rows)

# (start position, rows of ROW_COLUMNS, which are readable) a row group at a time
RowChunks: TypeAlias = Callable[[], Iterator[tuple[int, pa.Table, np.ndarray]]]
NodeLookup: TypeAlias = Callable[[pa.ChunkedArray | pa.Array], np.ndarray]  # ids -> nodes (int64, -1: none)


def _digest_lines(t: pa.Table) -> bytes:
    """Rows (ROW_COLUMNS) as ``\\x1f``-joined UTF-8, each ending in ``\\x1e`` ("" for none), joined by Arrow."""
    cols = [pc.fill_null(t.column(c).cast(pa.string()), "") for c in ROW_COLUMNS]
    joined = pc.binary_join_element_wise(*cols, "\x1f")
    return ("\x1e".join(joined.to_pylist()) + "\x1e").encode()


def _wanted(chunks: RowChunks, total: int = 0) -> tuple[np.ndarray, str, int]:
    """``(keys, digest, readable rows)``: the distinct ids of the readable rows (sorted keys), a
    digest of those rows in manifest order, and their count: one pass, a row group at a time.
    The ids go into one array of ``total`` keys (the manifest's rows, a bound on them), sorted
    in place: a set grown by merging sorted runs held twice the keys at its last merge."""
    hasher = content_hasher()
    count = 0

    def ids() -> Iterator[pa.ChunkedArray]:
        nonlocal count
        for _, t, ok in chunks():
            t = t.filter(pa.array(ok))
            count += t.num_rows
            if t.num_rows:
                hasher.update(_digest_lines(t))
                yield t.column(S.IMAGE_ID)

    keys = filled(ids(), total)
    return sorted_unique(keys, owned=True), hasher.hexdigest(), count


def _firsts(seen: np.ndarray, nodes: np.ndarray, mask: np.ndarray, flag: int) -> np.ndarray:
    """``flag`` (uint8 a row) on the first of the rows ``mask`` picks (in order) of each node not
    yet ``seen`` with it, which it then is."""
    out = np.zeros(len(nodes), np.uint8)
    at = np.flatnonzero(mask)
    if len(at):
        u, first = np.unique(nodes[at], return_index=True)
        new = (seen[u] & flag) == 0
        out[at[first[new]]] = flag
        seen[u[new]] |= flag
    return out


def _index_rows(chunks: RowChunks, n_rows: int, n_nodes: int, node_of: NodeLookup) -> tuple[np.ndarray, np.ndarray]:
    """``(row_node, row_flags)`` of ``Images``: each readable row's id mapped to its node (of
    ``n_nodes``) by ``node_of``, and its flags, a row group at a time."""
    row_node = np.full(n_rows, -1, np.int32 if n_nodes < 2**31 else np.int64)
    row_flags = np.zeros(n_rows, np.uint8)
    seen = np.zeros(n_nodes, np.uint8)  # FIRST_ROW | FIRST_TRAIN: which of its first rows are found
    for start, t, ok in chunks():
        at = np.flatnonzero(ok)
        if not len(at):
            continue
        t = t.take(pa.array(at, pa.int64()))
        rows = start + at
        node = node_of(t.column(S.IMAGE_ID))
        row_node[rows] = node
        split = t.column(S.SPLIT).cast(pa.string())
        train = pc.fill_null(pc.equal(split, S.SPLIT_TRAIN), False).to_numpy(zero_copy_only=False)
        held = np.asarray(pc.is_valid(split).to_numpy(zero_copy_only=False), bool) & ~train
        flags = np.where(train, SPLIT_IS_TRAIN, np.where(held, SPLIT_HELD, SPLIT_NONE)).astype(np.uint8)
        has = node >= 0
        flags |= _firsts(seen, node, has, FIRST_ROW)
        flags |= _firsts(seen, node, has & train, FIRST_TRAIN)
        row_flags[rows] = flags
    return row_node, row_flags


def images_of(
    ids: Sequence[str] | pa.Array | np.ndarray,
    X: Vectors,
    row_ids: Sequence[Any],
    row_paths: Sequence[Any],
    row_splits: Sequence[Any],
    missing: int = 0,
    row_labels: Sequence[Any] | None = None,
) -> Images:
    """``Images`` of rows given in memory (every row readable), node k being ``ids[k]``."""
    n = len(row_ids)
    table = pa.table(
        {
            S.IMAGE_ID: pa.array(list(row_ids), pa.string()),
            S.PATH: pa.array(list(row_paths), pa.string()),
            S.SPLIT: pa.array(list(row_splits), pa.string()),
            S.LABEL: pa.array([None] * n if row_labels is None else list(row_labels), pa.string()),
        }
    )

    def chunks() -> Iterator[tuple[int, pa.Table, np.ndarray]]:
        yield 0, table, np.ones(n, bool)

    keys = keys_of(ids) if len(ids) else np.zeros(0, PACKED)
    _, digest, readable_rows = _wanted(chunks, n)
    index = KeyIndex(keys)
    indexed = _index_rows(chunks, n, len(keys), index.positions)
    return Images(keys, X, *indexed, TableRows(table), readable_rows, missing, digest)


def load_images(ws: Workspace, cfg: DedupConfig) -> Images:
    """The dataset's ``Images``: the manifest read a row group at a time, twice (the distinct ids
    and the digest; then each row's node once the features' ids are known), its file held open for
    the paths the looks and tables read back: memory holds keys and codes, not the columns."""
    path = manifest_file(ws, cfg.dataset)
    try:
        source = ManifestRows(path, [*ROW_COLUMNS, S.STATUS])
    except (OSError, pa.ArrowException) as exc:
        raise corrupt_manifest(path, cfg.dataset, exc) from None

    def chunks() -> Iterator[tuple[int, pa.Table, np.ndarray]]:
        try:
            for g in range(source.num_row_groups):
                t = source.group(g)
                ok = np.asarray(readable(t).to_numpy(zero_copy_only=False), bool)  # status ok, an id
                yield int(source.starts[g]), t, ok
        except (OSError, pa.ArrowException) as exc:
            raise corrupt_manifest(path, cfg.dataset, exc) from None

    try:
        return _load_images(ws, cfg, source, chunks)
    except BaseException:
        source.close()
        raise


def _load_images(ws: Workspace, cfg: DedupConfig, source: ManifestRows, chunks: RowChunks) -> Images:
    """The vectors of the wanted ids (sorted keys, ``_wanted``) read in the featureset's order,
    which numbers the nodes; each id's node kept by its rank among the wanted (4 bytes an id),
    so that the manifest's rows find their nodes by a lookup in the sorted ids, and the ids in
    node order are made once from them (to a scratch file beside a scratch file of vectors)."""
    wanted, digest, readable_rows = _wanted(chunks, source.num_rows)
    if not len(wanted):  # nothing readable to compare: an empty result, not an error
        return Images(
            np.zeros(0, PACKED), np.zeros((0, 0), np.float32), np.full(source.num_rows, -1, np.int32),
            np.zeros(source.num_rows, np.uint8), source, 0, 0, digest,
        )  # fmt: skip
    dim = featureset_dim(ws, cfg.featureset)
    index = KeyIndex(wanted)  # sorted and distinct: no copy, a rank is a position
    node_type = np.int32 if len(wanted) < 2**31 else np.int64
    node_of_rank: np.ndarray = np.full(len(wanted), -1, node_type)
    folder = ws.dedup_dir(cfg.out_name) / "_cache"
    X: np.ndarray | VectorStore
    if flat_bytes(len(wanted), dim) > cfg.budget * IN_MEMORY_SHARE:  # the vectors to a scratch file, streamed
        batches = iter_vectors(ws, cfg.featureset, index, block_rows(dim, cfg.budget, STORE_SHARE))
        X = _stream_vectors(batches, dim, index, node_of_rank, folder)
    else:
        listed, X = read_vectors(ws, cfg.featureset, as_strings(wanted))
        if listed:
            node_of_rank[_ranks_of_wanted(index, listed)] = np.arange(len(listed))
    n = len(X)
    missing = len(wanted) - n
    stores: list[VectorStore | KeyStore | ScratchArray] = [X] if isinstance(X, VectorStore) else []
    try:
        if not n:
            raise ConfigError(
                f"featureset {cfg.featureset} has no features for dataset {cfg.dataset}; "
                f"run 'imgfeat extract --dataset {cfg.dataset}' first"
            )
        if missing:
            log.warning(
                "%d images of %s have no features in %s: they are left out", missing, cfg.dataset, cfg.featureset
            )

        indexed = _index_rows(chunks, source.num_rows, n, RankedNodes(index, node_of_rank).positions)
        del index  # (its buckets)
        ranked = None
        if stores:  # ids beside vectors in scratch files: sorted, with their nodes, for a rerun's joins
            ranked = (KeyStore(wanted.dtype, folder), ScratchArray(node_of_rank.dtype, folder))
            stores.extend(ranked)
            ranked[0].append(wanted)  # (one write each: no copy)
            ranked[1].append(node_of_rank)
        ids = _ids_in_node_order(wanted, node_of_rank, n, folder if stores else None)
        if isinstance(ids, KeyStore):
            stores.append(ids)
    except BaseException:
        for store in stores:
            store.close()
        raise
    return Images(ids, X, *indexed, source, readable_rows, missing, digest, ranked)


def _stream_vectors(
    batches: Iterator[tuple[np.ndarray, np.ndarray]], dim: int, index: KeyIndex, node_of_rank: np.ndarray, folder: Path
) -> VectorStore:
    """The featureset reader's batches written to a new store in order, each id's node (its row)
    kept at its rank among the wanted ids (a function of its own: no batch outlives the loop)."""
    X = VectorStore(dim, folder)
    try:
        for keys, B in batches:
            node_of_rank[_ranks_of_wanted(index, keys)] = np.arange(len(X), len(X) + len(B))
            X.append(B)
    except BaseException:
        X.close()
        raise
    return X


def _ranks_of_wanted(index: KeyIndex, ids: Any) -> np.ndarray:
    """The ranks of ids the featureset's reader gave for the wanted ones (it gives no other)."""
    ranks = index.ranks(ids)
    if len(ranks) and ranks.min() < 0:
        raise RuntimeError("the featureset reader returned an id that was not asked for")
    return ranks


ID_BLOCK = 1 << 20  # ids written to their scratch file at a time


def _ids_in_node_order(
    wanted: np.ndarray, node_of_rank: np.ndarray, n: int, folder: Path | None
) -> np.ndarray | KeyStore:
    """The keys of nodes 0 .. n-1 (``wanted[rank]`` is node ``node_of_rank[rank]``'s): an array,
    or with a ``folder`` a ``KeyStore`` there, made a block of ID_BLOCK nodes at a time from a
    scan of ``node_of_rank`` each (no inverse of it: 4 more bytes an image at the read's peak)."""
    store = KeyStore(wanted.dtype, folder) if folder is not None else None
    parts = []
    try:
        for lo in range(0, n, ID_BLOCK):
            hi = min(n, lo + ID_BLOCK)
            keys = np.empty(hi - lo, wanted.dtype)
            for at in range(0, len(node_of_rank), ID_BLOCK):  # (no temporary as long as the ids)
                nodes = node_of_rank[at : at + ID_BLOCK]
                ranks = np.flatnonzero((nodes >= lo) & (nodes < hi))
                keys[nodes[ranks] - lo] = wanted[at + ranks]
            if store is None:
                parts.append(keys)
            else:
                store.append(keys)
    except BaseException:
        if store is not None:
            store.close()
        raise
    return store if store is not None else concat_keys(parts) if parts else wanted[:0]


def groups_table(im: Images, graph: Graph, comp: Components | None = None) -> pa.Table:
    """One row per manifest path in a group of two or more paths (exact copies: nearest is itself).

    Each row carries its label and split; ``label_conflict`` marks every row of a group whose
    paths carry two or more labels (the same picture taught as two classes).
    """
    n = len(im.ids)
    comp = components(n, graph) if comp is None else comp
    grouped = _rows_of(im.row_node, _in_groups(im, comp))  # manifest rows in a group of 2+ paths
    paired, partners, sims = best_partner(graph)
    node_of_row = im.row_node[grouped].astype(np.int64)
    at = np.minimum(np.searchsorted(paired, node_of_row), max(0, len(paired) - 1))
    has = paired[at] == node_of_row if len(paired) else np.zeros(len(node_of_row), bool)
    partner = np.where(has, partners[at] if len(paired) else -1, -1)
    best = np.where(has, sims[at] if len(paired) else 0.0, 0.0)
    rows = im.source.take(grouped)
    nodes = node_of_row.tolist()
    paths, labels, splits = (
        rows.column(S.PATH).to_pylist(),
        *(rows.column(c).cast(pa.string()).to_pylist() for c in (S.LABEL, S.SPLIT)),
    )
    del rows
    id_of = _ids_of(im, np.concatenate([node_of_row, partner]))
    comp_of = dict(zip(nodes, comp[node_of_row].tolist()))
    group_id: dict[int, str] = {}
    for k in sorted(set(nodes), key=id_of.__getitem__):
        group_id.setdefault(comp_of[k], id_of[k])  # the smallest image id names the group
    labels_of: dict[int, set[str]] = {}
    for u, lab in zip(nodes, labels):
        if lab is not None:
            labels_of.setdefault(comp_of[u], set()).add(lab)
    paths_of = Counter(nodes)  # every path of a grouped node is a grouped row
    out = []
    for u, p, lab, sp, v, x in zip(nodes, paths, labels, splits, partner.tolist(), best.tolist()):
        c = comp_of[u]
        exact = paths_of[u] > 1
        out.append(
            (
                id_of[u],
                group_id[c],
                id_of[u] if exact else id_of[v],
                1.0 if exact else float(x),
                p,
                lab,
                sp,
                len(labels_of.get(c, ())) > 1,
            )
        )
    out.sort(key=lambda r: (not r[7], r[1], -r[3], r[4]))  # label conflicts first
    cols: list[Sequence[Any]] = list(zip(*out)) if out else [[]] * len(S.DEDUP_GROUPS_SCHEMA)
    return pa.table(dict(zip(S.DEDUP_GROUPS_SCHEMA.names, cols)), schema=S.DEDUP_GROUPS_SCHEMA)


GROUP_SCAN = 1 << 20  # manifest rows checked at a time for the nodes a table wants


def _in_groups(im: Images, comp: Components) -> np.ndarray:
    """A bool per node: whether its component holds two or more manifest paths. A node has two
    when a row of it is not its first row; only paired nodes share a component, so only theirs
    are summed. A block of rows at a time, no number per node or component (at ten million
    images each such array was 80 MB)."""
    n = len(im.ids)
    grouped = np.zeros(n, bool)
    for lo in range(0, len(im.row_node) if n else 0, GROUP_SCAN):
        part = im.row_node[lo : lo + GROUP_SCAN]
        at = np.flatnonzero((part >= 0) & ((im.row_flags[lo : lo + GROUP_SCAN] & FIRST_ROW) == 0))
        grouped[part[at]] = True  # a second path of one image
    paired = comp.paired
    if len(paired):
        paths = np.where(grouped[paired], 2, im.first_rows(paired) >= 0)  # 2: two or more, all the sum needs
        _, at = np.unique(comp.label, return_inverse=True)
        grouped[paired] |= np.bincount(at, weights=paths)[at] >= 2
    return grouped


def _rows_of(row_node: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The manifest rows (int64, in order) whose node is ``wanted`` (a bool per node), a block at a time."""
    parts = [np.zeros(0, np.int64)]
    for lo in range(0, len(row_node) if len(wanted) else 0, GROUP_SCAN):
        part = row_node[lo : lo + GROUP_SCAN]
        parts.append(lo + np.flatnonzero((part >= 0) & wanted[np.maximum(part, 0)]))
    return np.concatenate(parts)


def _ids_of(im: Images, nodes: np.ndarray) -> dict[int, str]:
    """Node -> image id of ``nodes`` (the few a table names: only they become Python strings)."""
    u = np.unique(np.asarray(nodes, np.int64))
    u = u[u >= 0]
    return dict(zip(u.tolist(), im.id_strings(u)))


def _leaks(rows: list[tuple[Any, ...]]) -> pa.Table:
    rows.sort(key=lambda r: (-r[6], r[1]))
    cols: list[Sequence[Any]] = list(zip(*rows)) if rows else [[]] * 7
    return pa.table(dict(zip(S.DEDUP_LEAKS_SCHEMA.names, cols)), schema=S.DEDUP_LEAKS_SCHEMA)


def leaks_table(im: Images, nb: Neighbours, threshold: float) -> pa.Table:
    """Held-out rows (split neither train nor empty) whose nearest training image is at or above threshold."""
    is_train = im.train_nodes()
    parts = list(im.held_rows())
    held = np.concatenate([np.zeros(0, np.int64), *(rows for rows, _ in parts)])
    nodes = np.concatenate([np.zeros(0, np.int64), *(nodes for _, nodes in parts)])
    if not is_train.any() or not len(held):
        return S.DEDUP_LEAKS_SCHEMA.empty_table()
    sims, rows = nearest_train(im.X, nb, is_train, nodes, threshold)
    same = is_train[nodes]  # the very same content is in train
    hit = same | ((rows >= 0) & (sims >= threshold))
    near = np.where(same, nodes, rows)[hit]
    sim = [1.0 if s else x for s, x in zip(same[hit].tolist(), sims[hit].tolist())]
    return _leak_rows(im, held[hit], nodes[hit], near, sim)


def _leak_rows(im: Images, held: np.ndarray, nodes: np.ndarray, near: np.ndarray, sim: list[float]) -> pa.Table:
    """The leaks table of held-out rows ``held`` (of nodes ``nodes``), each near training node ``near``."""
    paths, splits = im.column(S.PATH, held), im.column(S.SPLIT, held)
    near_paths = im.column(S.PATH, im.first_rows(near, FIRST_TRAIN))
    id_of = _ids_of(im, np.concatenate([nodes, near]))
    out = [
        (id_of[u], p, s, id_of[v], q, S.SPLIT_TRAIN, x)
        for u, p, s, v, q, x in zip(nodes.tolist(), paths, splits, near.tolist(), near_paths, sim)
    ]
    return _leaks(out)


def group_leaks_table(im: Images, comp: Components) -> pa.Table:
    """Held-out rows grouped with a training image; the nearest (by features) training member is named.

    Only a paired image shares its component, so the held-out rows looked at are those of a
    training image (the very same content) or of a paired one, kept as the rows are scanned: no
    number per held-out row (at ten million images, two million of them)."""
    is_train = im.train_nodes()
    paired = comp.paired
    held_parts, node_parts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for rows, nodes in im.held_rows():
        at = np.minimum(np.searchsorted(paired, nodes), max(0, len(paired) - 1))
        keep = is_train[nodes] | (paired[at] == nodes if len(paired) else False)
        held_parts.append(rows[keep])
        node_parts.append(nodes[keep])
    held, nodes = np.concatenate(held_parts), np.concatenate(node_parts)
    same = is_train[nodes]  # the very same content is in train
    looking = nodes[~same]  # paired, all of them
    # the training members of the components those held-out images are in, by their first
    # training rows (manifest order)
    wanted = np.unique(comp[looking])
    members = paired[is_train[paired]]
    members = members[np.isin(comp[members], wanted)]
    members = members[np.argsort(im.first_rows(members, FIRST_TRAIN), kind="stable")]
    train_nodes: dict[int, list[int]] = {}
    for u, c in zip(members.tolist(), comp[members].tolist()):
        train_nodes.setdefault(c, []).append(u)
    looking = looking[np.isin(comp[looking], np.fromiter(train_nodes, np.int64, len(train_nodes)))]
    nearest = nearest_members(im.X, comp, train_nodes, looking.tolist())
    near = np.where(same, nodes, -1)
    sim = np.where(same, 1.0, 0.0)
    if nearest:
        found = np.fromiter(nearest, np.int64, len(nearest))
        partner = np.fromiter((v[0] for v in nearest.values()), np.int64, len(nearest))
        score = np.fromiter((v[1] for v in nearest.values()), np.float64, len(nearest))
        order = np.argsort(found)
        found, partner, score = found[order], partner[order], score[order]
        at = np.flatnonzero(~same)
        k = np.minimum(np.searchsorted(found, nodes[at]), len(found) - 1)
        hit = found[k] == nodes[at]
        near[at[hit]], sim[at[hit]] = partner[k[hit]], score[k[hit]]
    hit = near >= 0
    return _leak_rows(im, held[hit], nodes[hit], near[hit], sim[hit].tolist())


MEMBER_BLOCK = 1 << 24  # similarities computed at a time when naming nearest group members (64 MiB)


def nearest_members(
    X: Vectors, comp: np.ndarray | Components, members: dict[int, list[int]], nodes: Sequence[int]
) -> dict[int, tuple[int, float]]:
    """For each of ``nodes`` whose component has ``members``, its most similar member (the first of
    equals) and their similarity. One product per component and block of nodes: a large group of
    copies costs a matrix product, not a gathered copy of its members per node."""
    by_comp: dict[int, list[int]] = {}
    for u in dict.fromkeys(nodes):  # each node once, in order
        if int(comp[u]) in members:
            by_comp.setdefault(int(comp[u]), []).append(u)
    out: dict[int, tuple[int, float]] = {}
    for c, us in by_comp.items():
        m = np.asarray(members[c], np.int64)
        M = X[m]
        step = max(1, MEMBER_BLOCK // max(1, len(m)))
        for lo in range(0, len(us), step):
            block = us[lo : lo + step]
            sims = X[block] @ M.T
            best = sims.argmax(axis=1)
            for u, b, row in zip(block, best.tolist(), sims):
                out[u] = (int(m[b]), float(row[b]))
    return out


def nearest_train(
    X: Vectors, nb: Neighbours, is_train: np.ndarray, nodes: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Similarity and node of the nearest training image of each of ``nodes`` (-1 where none is close).

    The first training image in a node's neighbour list is its nearest. A list holding no training
    image while its last entry is still above the threshold may have cut one off: those few
    nodes are compared with every training image exactly.
    """
    rows, sims = nb.rows[nodes], nb.sims[nodes]
    if rows.shape[1] == 0:  # a single image: nobody to be near
        return np.full(len(nodes), -np.inf, np.float32), np.full(len(nodes), -1, np.int64)
    mask = (rows >= 0) & is_train[np.maximum(rows, 0)]
    first = mask.argmax(axis=1)
    found = mask.any(axis=1)
    best_rows = np.where(found, rows[np.arange(len(nodes)), first], -1)
    best_sims = np.where(found, sims[np.arange(len(nodes)), first], -np.inf).astype(np.float32)
    cut = ~found & (rows.shape[1] > 0) & (sims[:, -1:].min(axis=1, initial=np.inf) >= threshold)
    for k in np.flatnonzero(cut):
        s = similarities_to(X, X[nodes[k]])
        s[~is_train] = -np.inf
        best_rows[k], best_sims[k] = int(s.argmax()), float(s.max())
    return best_sims, best_rows


def run_dedup(ws: Workspace, cfg: DedupConfig, run_id: str) -> DedupSummary:
    """Find groups, leaks and label conflicts; write groups/, leaks/ (one table each), index.html, _dedup.json.

    Incremental: looks are cached by image id, so a rerun decodes only new images; the
    calibration is reused until the dataset has grown RECALIBRATE_GROWTH-fold; a rerun over the
    very same rows, featureset and criterion writes nothing and returns the last summary.
    """
    clock = _Clock()
    featureset_info(ws, cfg.featureset)  # exit 2 for an unknown featureset
    im = clock.lap("read", load_images(ws, cfg))
    release_freed_memory()  # the featureset reader's and the id set's buffers
    try:
        return _run_loaded(ws, cfg, run_id, clock, im)
    finally:
        im.close()


def _run_loaded(ws: Workspace, cfg: DedupConfig, run_id: str, clock: _Clock, im: Images) -> DedupSummary:
    folder = ws.dedup_dir(cfg.out_name)
    digest = inputs_digest(cfg, im)
    previous = _previous(folder)
    if previous is not None and previous.get("inputs_digest") == digest and _tables_present(folder):
        log.info("dedup %s is current: nothing changed since run %s", cfg.out_name, previous.get("run_id"))
        return _unchanged(previous)
    root = dataset_root(ws, cfg.dataset)
    looks = cands = None
    try:
        computed = 0
        criterion: JsonObject
        if cfg.threshold is not None:
            nb = clock.lap("neighbours", nearest_neighbours(im.X, cfg.neighbours, cfg.exact_max, cfg.budget))
            graph, kind = similar_pairs(nb, cfg.threshold), nb.kind
            criterion = {"name": "cosine", "threshold": float(cfg.threshold), "neighbours": cfg.neighbours}
        else:
            cands, kind, searched = clock.lap("neighbours", candidate_pairs(folder, cfg, im, previous))
            release_freed_memory()  # the index and the search's blocks
            looks, computed = cached_looks(folder, im, root)
            release_freed_memory()  # the images' decoded blocks
            ok = looks.ok
            clock.lap("looks", None)
            graph, stats = looked_pairs(cands, looks, ok)
            criterion = criterion_summary(
                cfg,
                ok,
                {**stats, "images_searched": searched, "looks_computed": computed},
                _calibration(cfg, root, im, ok, previous),
            )
            clock.lap("calibration", None)
        comp = components(len(im.ids), graph)
        groups = groups_table(im, graph, comp)
        leaks = leaks_table(im, nb, cfg.threshold) if cfg.threshold is not None else group_leaks_table(im, comp)
        clock.lap("tables", None)
        page = clock.lap("page", render_page(groups, leaks, root, cfg, run_id, criterion_text(criterion)))
        release_freed_memory()  # the tables' transient copies, before the pairs cache's batches
        with FileLock(ws.locks_dir / f"dedup-{cfg.out_name}.lock", f"dedup results {cfg.out_name}", cfg.wait):
            remove_stale_tmp(folder)
            if looks is not None and computed:
                _write_looks(looks, folder / LOOKS_FILE)
            if cands is not None:
                _write_pairs(folder, im, cands)
            write_table_atomic(groups, folder / GROUPS_DIR / TABLE_FILE)
            write_table_atomic(leaks, folder / LEAKS_DIR / TABLE_FILE)
            write_bytes_atomic(page.encode("utf-8"), folder / PAGE_FILE)
            for old in OLD_FILES:  # an older layout kept both tables side by side in this folder
                (folder / old).unlink(missing_ok=True)
            clock.lap("write", None)
            summary = _summary(cfg, im, kind, criterion, groups, leaks, folder, clock, digest)
            write_json_atomic({**summary.to_json(), "run_id": run_id}, folder / SUMMARY_FILE)
    finally:  # the scratch files of the candidates and looks
        for scratch in (cands, looks):
            if scratch is not None:
                scratch.close()
    return summary


SEARCH_KINDS = {"flat": "exact", "new": "exact, new images against all (the others' candidates from the last run)"}


def candidate_pairs(
    folder: Path, cfg: DedupConfig, im: Images, previous: dict[str, Any] | None
) -> tuple[PairRanges, str, int]:
    """``(pairs, search kind, images searched)``: each image's ``cfg.neighbours`` nearest, as pairs
    (in scratch files under the run's cache folder: the caller closes them).

    When the last run searched with the same settings and few images are new, its pairs are
    kept (those between images still here) and only the new images are searched, against all.
    """
    last = (previous or {}).get("criterion") or {}
    n = len(im.ids)
    if (
        last.get("name") == "neighbours+look"
        and last.get("neighbours") == cfg.neighbours
        and (previous or {}).get("featureset") == cfg.featureset
    ):
        found = _last_search(folder, im.node_lookup(), n)
        if found is not None and len(found[0]) <= RESEARCH_NEW_FRACTION * n:
            new, now, token = found
            del found
            cached = _cached_pairs(folder, now, token, n, len(new) * cfg.neighbours)
            del now  # (a number per image the last run searched)
            if cached is not None:
                try:
                    with progress(total=len(new), desc="dedup: new images' neighbours") as bar:

                        def add(a: np.ndarray, b: np.ndarray, sim: np.ndarray) -> None:
                            cached.add(a, b, sim)
                            bar.update(len(a) // max(1, min(cfg.neighbours, n - 1)))

                        search_new_images(im.X, new, cfg.neighbours, add)
                except BaseException:
                    cached.close()
                    raise
                return cached, "new", len(new)
    pairs = PairRanges(n, n * min(cfg.neighbours + 1, n), folder / "_cache")
    try:
        with im.parked(folder / "_cache"), progress(total=n, desc="dedup: neighbours") as bar:

            def listed(queries: np.ndarray, s: np.ndarray, r: np.ndarray) -> None:
                pairs.add_listed(queries, s, r, -1.0)
                bar.update(len(r))

            kind = search_neighbours(im.X, cfg.neighbours, listed, cfg.exact_max, cfg.budget)
    except BaseException:
        pairs.close()
        raise
    return pairs, kind, n


def new_image_pairs(X: Vectors, new: np.ndarray, k: int) -> Graph:
    """Each of ``new`` rows with its ``k`` nearest other rows of ``X`` (exact), as pairs."""
    with PairRanges(len(X), len(new) * k) as pairs:
        search_new_images(X, new, k, pairs.add)
        return pairs.graph()


def search_new_images(
    X: Vectors, new: np.ndarray, k: int, add: Callable[[np.ndarray, np.ndarray, np.ndarray], None]
) -> None:
    """Each of ``new`` rows with its ``k`` nearest other rows of ``X`` (exact), listed to ``add``
    (``PairRanges.add``) SEARCH_CHUNK rows at a time."""
    k = min(k, len(X) - 1)
    for lo in range(0, len(new) if k > 0 else 0, SEARCH_CHUNK):
        rows = new[lo : lo + SEARCH_CHUNK]
        top, best = _top_k_blocked(X, rows, k)
        add(np.repeat(rows, k), top.ravel(), best.ravel().astype(np.float32))


def _top_k_blocked(X: Vectors, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar other rows of ``X`` to each of ``rows`` (and their similarities),
    scanning ``X`` a block of BLOCK_ROWS at a time: the working set never grows with ``len(X)``.
    Each block's similarities are ranked SELECT_ROWS queries at a time (a row's ranking is its own):
    the candidates' positions and their partition are int64, twice the block's similarities."""
    Q = X[rows]
    top = np.zeros((len(rows), 0), np.int64)
    best = np.zeros((len(rows), 0), np.float32)
    for start in range(0, len(X), BLOCK_ROWS):
        S = Q @ X[start : start + BLOCK_ROWS].T
        mine = (rows >= start) & (rows < start + S.shape[1])
        S[np.flatnonzero(mine), rows[mine] - start] = -np.inf  # an image is not its own neighbour
        here = np.arange(start, start + S.shape[1])
        new_top, new_best = np.empty((len(rows), k), np.int64), np.empty((len(rows), k), np.float32)
        for lo in range(0, len(rows), SELECT_ROWS):
            part = slice(lo, lo + SELECT_ROWS)
            sims = np.concatenate([best[part], S[part]], axis=1)
            cand = np.concatenate([top[part], np.broadcast_to(here, (len(sims), len(here)))], axis=1)
            keep = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            new_top[part], new_best[part] = (
                np.take_along_axis(cand, keep, axis=1),
                np.take_along_axis(sims, keep, axis=1),
            )
        top, best = new_top, new_best
    return top, best


def _last_search(folder: Path, node: NodeOf | RankedNodes, n: int) -> tuple[np.ndarray, np.ndarray, bytes] | None:
    """``(new, now, token)`` of the last run's searched images (the rows of its list of them):
    the nodes (of ``n``; ``node``: id -> node) it did not search, each of its nodes' node now (-1:
    gone), and the token its pairs cache must carry; read a row group at a time. None when the
    list is absent or unreadable."""
    try:
        f = pq.ParquetFile(folder / SEARCHED_FILE)
        token = (f.schema_arrow.metadata or {}).get(PAIRS_TOKEN)
        if not token:  # written before the pairs were node numbers: nothing to join them with
            raise ValueError("no pairs token")
        now = np.empty(f.metadata.num_rows, np.int32 if n < 2**31 else np.int64)
        at = 0
        for g in range(f.num_row_groups):
            ids = f.read_row_group(g, columns=[S.IMAGE_ID], use_threads=False).column(S.IMAGE_ID)
            now[at : at + len(ids)] = node.positions(ids)
            at += len(ids)
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        log.debug("dedup searched images unreadable (%s): every image is searched", exc)
        return None
    seen = np.zeros(n, bool)
    seen[now[now >= 0]] = True
    return np.flatnonzero(~seen), now, token


def _cached_pairs(folder: Path, now: np.ndarray, token: bytes, n: int, more: int) -> PairRanges | None:
    """The last run's candidate pairs between images still here (of ``n``; ``now``: its nodes'
    nodes now, ``_last_search``) in a new PairRanges sized for ``more`` listings still to come;
    read a row group at a time. None when absent, unreadable, or not written with the list of
    searched images ``token`` names (a run that stopped between the two files)."""
    try:
        f = pq.ParquetFile(folder / PAIRS_FILE)
        if (f.schema_arrow.metadata or {}).get(PAIRS_TOKEN) != token:
            raise ValueError("the pairs are not of the searched images' list")
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.debug("dedup pairs cache unreadable (%s): every image is searched", exc)
        return None
    pairs = PairRanges(n, f.metadata.num_rows + more, folder / "_cache")
    try:
        for g in range(f.num_row_groups):
            t = f.read_row_group(g, columns=["a", "b", S.SIMILARITY], use_threads=False)
            a, b = (t.column(c).to_numpy().astype(np.int64) for c in "ab")
            if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= len(now)):
                raise ValueError("a pair names an image the list of searched images does not hold")
            a, b = now[a], now[b]
            kept = (a >= 0) & (b >= 0)  # pairs between images still here
            pairs.add(a[kept], b[kept], t.column(S.SIMILARITY).to_numpy().astype(np.float32)[kept])
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        log.debug("dedup pairs cache unreadable (%s): every image is searched", exc)
        pairs.close()
        return None
    except BaseException:
        pairs.close()
        raise
    return pairs


class RankedNodes:
    """Image id -> node from the distinct ids sorted (a ``KeyIndex``) and each one's node by rank
    (-1: none): what ``_load_images`` joins the manifest's rows with."""

    def __init__(self, index: KeyIndex, node_of_rank: np.ndarray) -> None:
        self._index, self._node_of_rank = index, node_of_rank

    def positions(self, ids: KeyLike) -> np.ndarray:
        """Each id's node (int64), -1 for an id that is not one of them."""
        r = self._index.ranks(ids)
        return np.where(r >= 0, self._node_of_rank[np.maximum(r, 0)], -1)


class NodeOf:
    """Image id -> node (its position in ``ids``, -1: none) for the millions of ids of a pairs cache.

    ``KeyIndex`` answers with a binary search over the ids' bytes, slow at this count (a minute
    for 18M pairs); here each id's key is folded to a 64-bit integer, searched among the sorted
    integers of ``ids``, and each hit checked against the id itself. Two ids of ``ids`` folding
    alike (about one chance in 10^7 at a million ids) fall back to ``KeyIndex``.
    """

    def __init__(self, ids: pa.Array) -> None:
        self._keys = keys_of(ids)
        folded = _fold(self._keys)
        self._order = np.argsort(folded, kind="stable")
        self._folded = folded[self._order]
        clash = len(folded) > 1 and bool(np.any(self._folded[1:] == self._folded[:-1]))
        self._index = KeyIndex(self._keys) if clash else None
        self._starts = None if clash else word_bucket_starts(self._folded)  # millions: searched by bucket

    def positions(self, ids: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
        """Each id's node (int64), -1 for an id that is not one of them."""
        if self._index is not None:
            return self._index.positions(ids)
        keys, ok = like(keys_of(ids), self._keys)  # ok: which could be one of them (None: all)
        out = np.full(len(keys), -1, np.int64)
        if not len(self._order) or not len(keys):
            return out
        folded = _fold(keys)
        if self._starts is None:
            at = np.searchsorted(self._folded, folded)
        else:
            at = search_buckets(self._folded, folded, self._starts, word_bucket_of(folded, self._starts))
        at = np.minimum(at, len(self._folded) - 1)
        node = self._order[at]
        hit = (self._folded[at] == folded) & keys_equal(self._keys[node], keys)
        if ok is not None:
            hit &= ok
        out[hit] = node[hit]
        return out


def _fold(keys: np.ndarray) -> np.ndarray:
    """Each fixed-width key folded to a uint64 (FNV-style over its 8-byte words)."""
    width = keys.dtype.itemsize
    if width % 8:  # padded to whole words (a copy); content ids (16 bytes packed) are read in place
        raw = np.zeros((len(keys), -(-width // 8) * 8), np.uint8)
        raw[:, :width] = keys.view(np.uint8).reshape(len(keys), width)
        keys = raw
    words = np.ascontiguousarray(keys).view(np.uint64).reshape(len(keys), -1)
    h = np.full(len(keys), 0xCBF29CE484222325, np.uint64)
    for j in range(words.shape[1]):
        h ^= words[:, j]
        h *= np.uint64(0x100000001B3)
    return h


PAIRS_BATCH = 262_144  # candidate pairs (or searched ids) written at a time
# The caches' columns are ids, node numbers and looks, nearly all distinct: a dictionary saves
# nothing, and Parquet's dictionary builders held ~50 MB a file before giving up on them
CACHE_WRITER: dict[str, Any] = {"compression": "zstd", "use_dictionary": False}
PAIRS_TOKEN = b"searched_token"  # both cache files carry it: the pairs' nodes are rows of that list of ids


def _write_pairs(folder: Path, im: Images, cands: Graph | PairRanges) -> None:
    """The images searched (their ids in node order) and the candidate pairs as rows of that list,
    each written under the commit protocol a batch at a time, both with one new token: a rerun
    takes the pairs only with the very list they number (a run stopped between the two files
    leaves a pair of files it does not join). Node numbers, not ids: at ten million images the
    pairs as ids took ~7 GB and most of the write's time."""
    token = os.urandom(16).hex().encode()
    searched = pa.schema([(S.IMAGE_ID, pa.string())], metadata={PAIRS_TOKEN: token})
    with atomic_path(folder / SEARCHED_FILE) as tmp, pq.ParquetWriter(tmp, searched, **CACHE_WRITER) as writer:
        for lo in range(0, len(im.ids), PAIRS_BATCH):
            nodes = np.arange(lo, min(len(im.ids), lo + PAIRS_BATCH))
            writer.write_batch(pa.record_batch([im.id_array(nodes)], schema=searched))
    node = pa.int32() if len(im.ids) < 2**31 else pa.int64()
    schema = pa.schema([("a", node), ("b", node), (S.SIMILARITY, pa.float32())], metadata={PAIRS_TOKEN: token})
    with atomic_path(folder / PAIRS_FILE) as tmp, pq.ParquetWriter(tmp, schema, **CACHE_WRITER) as writer:
        for g in pair_chunks(cands):
            for lo in range(0, len(g.a), PAIRS_BATCH):
                part = slice(lo, lo + PAIRS_BATCH)
                writer.write_batch(
                    pa.record_batch(
                        [
                            pa.array(g.a[part], node),
                            pa.array(g.b[part], node),
                            pa.array(g.sim[part], pa.float32()),
                        ],
                        schema=schema,
                    )
                )


def inputs_digest(cfg: DedupConfig, im: Images) -> str:
    """What the results depend on: every readable row (id, path, split, label; in manifest order, as
    scan writes it: sorted by path), the featureset and the criterion."""
    head = repr(
        (
            cfg.featureset,
            cfg.threshold,
            cfg.neighbours,
            cfg.exact_max,
            cfg.calibration_images,
            cfg.page_groups,
            LOOK_THRESHOLD,
            LOOK_VERSION,
            im.missing,
        )
    ).encode()
    # a budget may change the search (approximate): results from another budget are not reused
    budget = [] if cfg.memory_budget is None else [f"memory_budget={cfg.memory_budget}".encode()]
    return digest_chunks([head, *budget, im.rows_digest.encode()], CONTENT_ID_ALGORITHM)


def _previous(folder: Path) -> JsonObject | None:
    """The last run's summary, or None (none, or unreadable: then everything is recomputed)."""
    try:
        obj = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _tables_present(folder: Path) -> bool:
    return all((folder / d / TABLE_FILE).is_file() for d in (GROUPS_DIR, LEAKS_DIR)) and (folder / PAGE_FILE).is_file()


def _unchanged(previous: dict[str, Any]) -> DedupSummary:
    fields = {k: v for k, v in previous.items() if k in DedupSummary.__dataclass_fields__}
    fields.update(written=False, seconds=0.0, timings={})
    try:
        return DedupSummary(**fields)
    except TypeError as exc:  # a summary from another version: treat as changed next time
        raise ImgfeatError(f"dedup summary {SUMMARY_FILE} is not readable ({exc}); delete it to recompute") from exc


LOOK_CHUNK = 1024  # images whose looks are computed at a time (then written to the scratch store)
CACHE_ROWS = 1024  # looks a row group of the cache file holds (10 MiB)


def cached_looks(folder: Path, im: Images, root: ImageRoot) -> tuple[LookStore, int]:
    """``(store, computed)``: the looks of every image of ``im`` in a scratch store, read from the
    cache (its rows in its order, those of images gone too, so a rewrite keeps them) and computed
    (one decode each, LOOK_CHUNK images at a time) for the rest. Memory: a chunk, not the dataset."""
    store = LookStore(len(im.ids), folder / "_cache")
    if (folder / LOOKS_FILE).is_file():  # (every id in memory only then)
        _read_looks(folder / LOOKS_FILE, store, im.node_lookup())
    todo = ~store.ok
    count = int(np.count_nonzero(todo))
    if not count:
        return store, 0
    computed, workers = 0, os.cpu_count() or 1
    with progress(total=count, desc="dedup: looks") as bar:  # a decode an image: the longest step
        for chunk, rows in _by_first_row(im, todo, LOOK_CHUNK):
            files = [root / p for p in im.column(S.PATH, rows)]
            L, ok = looks_of_files(files, workers=workers)
            good = chunk[ok]
            store.append(im.ids[good], L[ok], good)
            computed += len(good)
            bar.update(len(chunk))
    return store, computed


def _by_first_row(im: Images, wanted: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(nodes, rows)``: the nodes ``wanted`` (a bool per node) and their first manifest rows, in
    the order of those rows (their files in path order), ``size`` at a time: the rows' flags
    scanned a block at a time, no sort of every node (at ten million images its arrays took ~250 MB)."""
    nodes, rows = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for at, got in im.flagged(FIRST_ROW):
        keep = wanted[got]
        nodes, rows = np.concatenate([nodes, got[keep]]), np.concatenate([rows, at[keep]])
        done = len(nodes) - len(nodes) % size
        for start in range(0, done, size):
            yield nodes[start : start + size], rows[start : start + size]
        nodes, rows = nodes[done:], rows[done:]
    if len(nodes):
        yield nodes, rows


def _read_looks(path: Path, store: LookStore, node_of: NodeOf | RankedNodes) -> None:
    """Append the cache file's looks to ``store`` a row group at a time (nothing when absent, of
    another look version, or damaged: those looks are computed again), each row the look of its
    image's node by ``node_of`` (every image's id -> node; the cache's ids mapped once). A look is
    raw float16 bytes, or (caches written before) a list of float16."""
    if not path.is_file():
        return
    try:
        f = pq.ParquetFile(path)
        if (f.schema_arrow.metadata or {}).get(b"look_version") != LOOK_VERSION.encode():
            log.info("dedup looks cache %s is of another look version: computing the looks again", path)
            return
        for g in range(f.num_row_groups):  # not iter_batches: its read-ahead holds several groups at once
            t = f.read_row_group(g, columns=[S.IMAGE_ID, "look"], use_threads=False)
            ids, col = t.column(S.IMAGE_ID), t.column("look").combine_chunks()
            if pa.types.is_fixed_size_binary(col.type):
                raw = np.frombuffer(col.buffers()[1], np.uint8, len(col) * LOOK_BYTES, col.offset * LOOK_BYTES)
                L = raw.view(np.float16)
            else:
                L = col.flatten().to_numpy(zero_copy_only=False).astype(np.float16)
            store.append(ids, L.reshape(-1, VARIANTS, SIDE * SIDE), node_of.positions(ids))
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:  # a damaged cache is recomputed
        log.warning("dedup looks cache %s is unreadable (%s): computing the looks again", path, exc)
        store.clear()


def _write_looks(store: LookStore, path: Path) -> None:
    """The store's rows as the looks cache (image_id, look as raw float16 bytes), CACHE_ROWS a row group:
    Parquet's float16 lists cost ten times the memory and three times the time to write and read."""
    look = pa.binary(LOOK_BYTES)
    schema = pa.schema([(S.IMAGE_ID, pa.string()), ("look", look)], metadata={"look_version": LOOK_VERSION})
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, **CACHE_WRITER) as writer:
        for ids, L in store.blocks(CACHE_ROWS):
            col = pa.Array.from_buffers(look, len(ids), [None, pa.py_buffer(L)])  # no copy
            writer.write_batch(pa.record_batch([ids, col], schema=schema))


def _calibration(
    cfg: DedupConfig, root: ImageRoot, im: Images, ok: np.ndarray, previous: dict[str, Any] | None
) -> JsonObject:
    """The look's check on synthetic copies of a seeded sample of the dataset's own readable images.

    The last run's calibration stands while the dataset holds under RECALIBRATE_GROWTH times
    the images it was made on (and the same sample size).
    """
    old = ((previous or {}).get("criterion") or {}).get("calibration") or {}
    made_on = old.get("dataset_images")
    if (
        old.get("sample") == cfg.calibration_images
        and made_on
        and old.get("threshold") == LOOK_THRESHOLD
        and len(im.ids) < RECALIBRATE_GROWTH * made_on
    ):
        return {**old, "reused": True}
    readable = int(np.count_nonzero(ok))
    if not cfg.calibration_images or not readable:
        return {"images": 0}
    # (the sample np.flatnonzero(ok) would give ``choice``, without a number per readable image)
    pick = _nth_true(
        ok, np.random.default_rng(0).choice(readable, size=min(cfg.calibration_images, readable), replace=False)
    )
    out: JsonObject = {
        **calibrate([root / p for p in im.column(S.PATH, im.first_rows(np.sort(pick)))]),
        "sample": cfg.calibration_images,
        "dataset_images": len(im.ids),
        "reused": False,
    }
    found = out.get("found")  # a float, or None when no copy could be made
    if isinstance(found, (int, float)) and found < 0.98:
        log.warning(
            "%.1f%% of synthetic copies of images of %s look alike to their original, under 98%% "
            "(see criterion.calibration in the summary): dedup may miss copies here",
            100 * found,
            cfg.dataset,
        )
    return out


def _nth_true(mask: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(mask)[ranks]`` (int64), counted a block of GROUP_SCAN at a time."""
    ranks = np.asarray(ranks, np.int64)
    out = np.full(len(ranks), -1, np.int64)
    seen = 0
    for lo in range(0, len(mask), GROUP_SCAN):
        at = np.flatnonzero(mask[lo : lo + GROUP_SCAN])
        here = (ranks >= seen) & (ranks < seen + len(at))
        out[here] = lo + at[ranks[here] - seen]
        seen += len(at)
    return out


def criterion_summary(cfg: DedupConfig, ok: np.ndarray, stats: dict[str, int], calibration: JsonObject) -> JsonObject:
    """The default criterion's parameters, what it looked at, and its calibration: the run summary's ``criterion``."""
    return {
        "name": "neighbours+look",
        "neighbours": cfg.neighbours,
        "look_threshold": LOOK_THRESHOLD,
        "mirror_min_cosine": MIRROR_COSINE,
        "fallback_cosine": FALLBACK_COSINE,
        "images_looked": int(ok.sum()),
        "images_without_look": int((~ok).sum()),
        **stats,
        "calibration": calibration,
    }


def criterion_text(criterion: dict[str, Any]) -> str:
    """One line for people: how pairs were judged."""
    if criterion["name"] == "cosine":
        return f"cosine similarity ≥ {criterion['threshold']:g}"
    cal = criterion.get("calibration") or {}
    found = (
        f"; {cal['found']:.1%} of synthetic copies of {cal['images']} own images pass"
        if cal.get("found") is not None
        else ""
    )
    return (
        f"{criterion['neighbours']} nearest by features, copies when their looks are ≥ "
        f"{criterion['look_threshold']:g} alike{found}"
    )


class _Clock:
    """Seconds per step of a run, for the summary's ``timings``."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str, value: _T) -> _T:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now
        return value


def _summary(
    cfg: DedupConfig,
    im: Images,
    kind: str,
    criterion: dict[str, Any],
    groups: pa.Table,
    leaks: pa.Table,
    folder: Path,
    clock: _Clock,
    digest: str,
) -> DedupSummary:
    group_ids = groups[S.GROUP_ID].to_pylist()
    exact = sum(1 for i, n in zip(groups[S.IMAGE_ID].to_pylist(), groups[S.NEAREST_ID].to_pylist()) if i == n)
    conflict = [g for g, c in zip(group_ids, groups[S.LABEL_CONFLICT].to_pylist()) if c]
    return DedupSummary(
        dataset=cfg.dataset,
        featureset=cfg.featureset,
        threshold=cfg.threshold,
        criterion=criterion,
        images=len(im.ids),
        paths=im.readable_rows,
        missing_features=im.missing,
        search=SEARCH_KINDS.get(kind, f"approximate ({kind})"),
        groups=len(set(group_ids)),
        grouped_paths=len(group_ids),
        exact_duplicate_paths=exact,
        groups_table=str(folder / GROUPS_DIR),
        leaks=leaks.num_rows,
        leaks_table=str(folder / LEAKS_DIR),
        label_conflicts=len(set(conflict)),
        label_conflict_paths=len(conflict),
        page=str(folder / PAGE_FILE),
        seconds=round(time.perf_counter() - clock.t0, 3),
        timings=clock.timings,
        inputs_digest=digest,
    )
