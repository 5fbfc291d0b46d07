"""FAISS index kinds over unit vectors (inner product = cosine): the choice, parameters, training and search."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from imgfeat.core.errors import ConfigError, unknown_value
from imgfeat.core.results import JsonObject

KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")
# Up to this many rows `auto` is exact: a flat search over 50,000 x 1,280 floats is ~0.25 GB
# scanned per query batch, still well under a second; beyond it an IVF index is much faster.
AUTO_FLAT_MAX = 50_000
TRAIN_SAMPLE = 40_000  # rows an IVF quantizer is trained on (k-means cost grows with it)
MIN_POINTS_PER_LIST = 39  # FAISS wants at least this many training points per IVF list
TRAIN_ITERATIONS = 10  # k-means rounds (FAISS' default, 25, costs 2.5x for little recall)
PQ_BITS = 8  # bits per product-quantizer code: 256 centroids per sub-vector, one byte each
PQ_CENTROIDS = 1 << PQ_BITS
PQ_MIN_ROWS = PQ_CENTROIDS  # k-means of 256 centroids needs at least that many training rows
# Rows each sub-quantizer's k-means trains on, per centroid (FAISS's default is 256: 65,536 rows for
# every one of up to dim/2 sub-quantizers). 64 (16,384 rows) trained a 576-d, 288-code PQ in 15 s
# instead of 35, with the same recall on its own rows; the coarse quantizer keeps its sample.
PQ_TRAIN_POINTS_PER_CENTROID = 64
ID_BYTES = 8  # FAISS keeps an int64 id per row in each inverted list
FILL_BATCH_ROWS = 8192  # rows read and added at a time when an index is filled from its shards


def import_faiss() -> Any:  # the faiss module
    """FAISS, imported on first use; its loader's INFO lines about CPU builds are not for people."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


@dataclass(frozen=True)
class IndexParams:
    """A resolved kind and its parameters, as the provenance records them."""

    kind: str
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int | None = None
    ef_search: int | None = None
    ef_construction: int | None = None
    trained_on: int = 0  # rows in the training sample
    rows_at_training: int = 0  # rows the index had when it was trained
    train_iterations: int | None = None  # k-means rounds of the IVF quantizer
    seed: int = 0
    pq_m: int | None = None  # ivfpq: sub-vectors per row, one PQ_BITS code each (bytes per row)
    pq_bits: int | None = None

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> IndexParams:
        return cls(**obj)

    @property
    def lists(self) -> int:
        """``nlist`` of an IVF kind (ivf, ivfpq), which always has one."""
        if self.nlist is None:
            raise ValueError(f"a {self.kind} index has no inverted lists")
        return self.nlist


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise unknown_value("index kind", str(kind), KINDS)
    return kind


def resolve_params(
    kind: str,
    n: int,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 128,
    seed: int = 0,
    dim: int | None = None,
    memory_budget: int | None = None,
) -> IndexParams:
    """Turn ``auto`` into a kind for ``n`` rows and fill the kind's parameters.

    Without a ``memory_budget`` (bytes), ``auto`` is flat up to AUTO_FLAT_MAX rows and ivf beyond.
    With one (and ``dim``), ``auto`` keeps that rule while the full vectors fit it, else ivfpq,
    whose codes are sized to fit (``pq_m``).
    """
    kind = check_kind(kind)
    fits = memory_budget is None or dim is None or flat_bytes(n, dim) <= memory_budget
    if kind == "auto":
        kind = ("flat" if n <= AUTO_FLAT_MAX else "ivf") if fits else "ivfpq"
    if kind == "flat":
        return IndexParams("flat", seed=seed)
    if kind == "hnsw":
        return IndexParams("hnsw", hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=max(40, 2 * hnsw_m), seed=seed)
    lists = nlist or default_nlist(n)
    params = IndexParams(kind, nlist=lists, train_iterations=TRAIN_ITERATIONS, seed=seed)
    if kind == "ivfpq":
        if dim is None:
            raise ConfigError("an ivfpq index needs the vectors' dimension to size its codes")
        if nlist is None:  # no fewer training points per list than FAISS wants, from a sample the budget holds
            params = replace(
                params,
                nlist=max(1, min(lists, sample_size(params, n, dim, memory_budget) // MIN_POINTS_PER_LIST)),
            )
            lists = params.lists
        params = replace(params, pq_m=choose_pq_m(params, n, dim, memory_budget), pq_bits=PQ_BITS)
    return replace(params, nprobe=min(lists, nprobe or default_nprobe(lists)))


def flat_bytes(n: int, dim: int) -> int:
    """Memory of the full float32 vectors of ``n`` rows: what a flat (or ivf) index holds."""
    return n * dim * 4


def working_rows(dim: int, memory_budget: int | None) -> int | None:
    """Float32 rows that half the budget holds: the training sample and the batch being added
    (the other half is the index itself). None: no budget."""
    return None if memory_budget is None else max(1, memory_budget // 2 // (dim * 4))


def fill_batch_rows(dim: int, memory_budget: int | None) -> int:
    """Rows read from the shards and added at a time."""
    rows = working_rows(dim, memory_budget)
    return FILL_BATCH_ROWS if rows is None else max(64, min(FILL_BATCH_ROWS, rows // 4))


def sample_size(params: IndexParams, n: int, dim: int, memory_budget: int | None = None) -> int:
    """Rows the quantizers are trained on: FAISS wants >= 39 per list (more buys little), a product
    quantizer 40 per centroid; within the budget's working half."""
    size = min(TRAIN_SAMPLE, 50 * params.lists)
    if params.kind == "ivfpq":
        size = min(TRAIN_SAMPLE, max(size, 40 * PQ_CENTROIDS))
    rows = working_rows(dim, memory_budget)
    if rows is not None:
        size = min(size, rows - fill_batch_rows(dim, memory_budget))
    return max(1, min(n, size))


def ivfpq_bytes(n: int, dim: int, nlist: int, m: int) -> int:
    """Memory of an ivfpq index: codes and ids, coarse centroids and PQ codebooks (256 x dim in all)."""
    return n * (m + ID_BYTES) + (nlist + PQ_CENTROIDS) * dim * 4


def choose_pq_m(params: IndexParams, n: int, dim: int, memory_budget: int | None) -> int:
    """The most bytes per row (a divisor of ``dim``, at least 2 dimensions per sub-vector) whose
    index fits the budget's half for the index: more bytes, better recall. A ConfigError when
    even one byte per row does not fit."""
    candidates = [m for m in range(1, dim // 2 + 1) if dim % m == 0] or [1]
    room = None if memory_budget is None else memory_budget - memory_budget // 2
    fitting = [m for m in candidates if room is None or ivfpq_bytes(n, dim, params.lists, m) <= room]
    if not fitting:
        need = 2 * ivfpq_bytes(n, dim, params.lists, candidates[0])
        raise ConfigError(
            f"memory budget {memory_budget} bytes is too small for an index of {n} rows of "
            f"{dim} dimensions: the smallest (ivfpq, 1 byte per row) needs about {need} bytes"
        )
    return fitting[-1]


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) lists, but never fewer training points per list than FAISS wants."""
    return max(1, min(int(4 * math.sqrt(max(n, 1))), min(n, TRAIN_SAMPLE) // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: a sixteenth of them, at least 8 (recall@10 >= 0.95 on clustered data)."""
    return max(8, nlist // 16)


def make_index(params: IndexParams, dim: int):
    """An empty FAISS index of the kind (inner-product metric)."""
    faiss = import_faiss()

    if params.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        return index
    if params.kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
    if params.kind == "ivfpq":
        return faiss.IndexIVFPQ(
            faiss.IndexFlatIP(dim),
            dim,
            params.nlist,
            params.pq_m,
            params.pq_bits or PQ_BITS,
            faiss.METRIC_INNER_PRODUCT,
        )
    raise ConfigError(f"cannot make an index of kind {params.kind!r} (allowed: {', '.join(KINDS[1:])})")


def train(index, params: IndexParams, X: np.ndarray) -> IndexParams:
    """Train an IVF quantizer on a seeded sample of ``X``; returns the params with ``trained_on``."""
    if params.kind not in ("ivf", "ivfpq") or index.is_trained:
        return params
    rows = sample_rows(len(X), sample_size(params, len(X), X.shape[1]), params.seed)
    return train_on_sample(index, params, X[rows], len(X))


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` of ``n`` row numbers, seeded, ascending: a copy, so that the permutation of all
    ``n`` is let go (a view of it held 80 MB at ten million rows through a streamed training)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def train_on_sample(index, params: IndexParams, sample: np.ndarray, total: int) -> IndexParams:
    """Train an IVF (or IVF-PQ) index on ``sample``, rows of an index that will hold ``total``."""
    if params.kind not in ("ivf", "ivfpq") or index.is_trained:
        return params
    need = max(params.lists, PQ_MIN_ROWS if params.kind == "ivfpq" else 0)
    if len(sample) < need:
        raise ConfigError(
            f"an {params.kind} index with nlist={params.nlist} needs at least {need} rows, got {len(sample)}"
        )
    index.cp.seed = params.seed
    index.cp.niter = params.train_iterations or TRAIN_ITERATIONS
    index.cp.min_points_per_centroid = 1  # a sample the budget shrank is known to be small: FAISS need not warn
    if params.kind == "ivfpq":
        index.pq.cp.seed = params.seed
        index.pq.cp.niter = params.train_iterations or TRAIN_ITERATIONS
        index.pq.cp.min_points_per_centroid = 1
        index.pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS_PER_CENTROID
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return replace(params, trained_on=len(sample), rows_at_training=total)


FINE_LISTS = 2048  # from this many lists on, the lists' centroids are themselves searched through an IVF
QUANTIZER_NPROBE = 16  # groups a quantizer over the lists' centroids searches, at each of its levels
# From this many lists on (dedup: ~655,000 rows) the quantizer's groups are themselves found through
# an IVF (groups of groups): a query is compared with ~cbrt(nlist) vectors at each of three levels,
# not with sqrt(nlist) group centroids and 16 groups' centroids at two. One thread, 128-d clustered
# rows (benchmarks/bench_quantizer.py): 10 against 18 us a query at 6,250 lists (1M rows), 25-31
# against 79-94 at 62,500 (10M), the same nearest list. It compares fewer centroids, so on rows
# without clusters it finds the nearest list less often (0.86 against 0.95 at 6,250 lists); at
# 2,048 lists it saved only 20% (6.5 against 8.1 us) for that loss.
THREE_LEVEL_LISTS = 4096


def _spherical_kmeans(rows: np.ndarray, k: int, seed: int, iterations: int) -> np.ndarray:
    faiss = import_faiss()
    km = faiss.Kmeans(rows.shape[1], k, niter=iterations, seed=seed, spherical=True, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(rows, dtype=np.float32))
    return np.asarray(km.centroids)


def _list_shares(counts: np.ndarray, nlist: int) -> np.ndarray:
    """Lists per coarse cluster, proportional to its rows and summing to ``nlist``."""
    return np.diff(np.r_[0, np.cumsum(counts) * nlist // max(1, int(counts.sum()))])


# A coarse cluster given more lists than this (one that holds far more than its part of the rows,
# as one kind of photo can in a real collection) is split two-level in turn: a k-means of k
# centroids costs k times the rows, so one plain k-means of such a cluster's share would cost
# what the two levels were there to avoid (at 10M rows, one cluster of half the rows: 31,000 lists).
CELL_MAX_LISTS = 512


def _cell_centroids(rows: np.ndarray, share: int, seed: int, iterations: int) -> np.ndarray:
    """One coarse cluster's lists: its rows themselves where they are no more than its share, its
    own two-level centroids where its share is over CELL_MAX_LISTS."""
    k = int(min(max(1, share), len(rows)))
    if k == len(rows):
        return rows
    if k > CELL_MAX_LISTS:
        return two_level_centroids(rows, k, seed, iterations)
    return _spherical_kmeans(rows, k, seed, iterations)


def _unit_rows(parts: list[np.ndarray]) -> np.ndarray:
    C = np.ascontiguousarray(np.vstack(parts), dtype=np.float32)
    norms = np.linalg.norm(C, axis=1, keepdims=True)
    np.divide(C, norms, out=C, where=norms > 0)
    return C


def two_level_centroids(sample: np.ndarray, nlist: int, seed: int, iterations: int = TRAIN_ITERATIONS) -> np.ndarray:
    """About ``nlist`` unit centroids of ``sample`` by two-level k-means: sqrt(nlist) coarse
    clusters, then each clustered again into a share of the lists proportional to its rows.
    The cost is that of a k-means of sqrt(nlist) centroids twice, not of nlist (6,250 lists on
    244,000 rows of 128 dimensions: about 2 s on 2 cores), a cluster with more than CELL_MAX_LISTS
    lists split the same way in turn. Seeded; a cluster with fewer rows than its share keeps its
    rows as centroids, one with rows gets a list at least (so the count can come out a little off
    ``nlist``)."""
    faiss = import_faiss()
    X = np.ascontiguousarray(sample, dtype=np.float32)
    dim = X.shape[1]
    nlist = max(1, min(nlist, len(X)))
    coarse = max(1, int(math.sqrt(nlist)))
    top = faiss.IndexFlatIP(dim)
    top.add(_spherical_kmeans(X, coarse, seed, iterations))
    _, at = top.search(X, 1)
    at = at[:, 0]
    counts = np.bincount(at, minlength=coarse)
    if counts.max() == len(X):  # the rows would not split (all alike): one k-means, no deeper level
        return _unit_rows([_spherical_kmeans(X, nlist, seed, iterations)])
    share = _list_shares(counts, nlist)
    parts = [_cell_centroids(X[at == c], share[c], seed + c + 1, iterations) for c in np.flatnonzero(counts).tolist()]
    return _unit_rows(parts)


TOP_POINTS_PER_CENTROID = 256  # rows a coarse centroid is trained on when the fine sample is streamed
MAX_SPILLS = 1024  # scratch files the fine sample is spread over at most (each read back whole)


def streamed_two_level_centroids(
    Y: Any,
    nlist: int,
    seed: int,
    iterations: int = TRAIN_ITERATIONS,
    *,
    block_rows: int,
    spill_bytes: int,
    spill: Any,
) -> tuple[np.ndarray, int]:
    """``two_level_centroids`` for rows too many to sample into memory: ``(centroids, rows trained on)``.

    ``Y`` (an array or a vector store, read ``block_rows`` at a time) gives a seeded sample of
    TOP_POINTS_PER_CENTROID rows per coarse cluster for the coarse k-means, then MIN_POINTS_PER_LIST
    rows per list, streamed: each assigned to its coarse cluster and set aside in one of several
    scratch stores (``spill()`` makes one; ``_spill_plan`` spreads the clusters over them so each
    holds about ``spill_bytes``, and keeps of a cluster far larger than that only that many rows).
    Each store is then read back whole and its clusters trained one at a time (a cluster with many
    lists two-level in turn). Memory: a block, one store's rows and the centroids, at any number of
    rows and however unevenly they cluster, so the number of lists can grow with the rows (a query
    scans the same number of rows at any n)."""
    faiss = import_faiss()
    n, dim = Y.shape
    nlist = max(1, min(nlist, n))
    coarse = max(1, int(math.sqrt(nlist)))
    top = faiss.IndexFlatIP(dim)
    top_rows = Y[sample_rows(n, min(n, coarse * TOP_POINTS_PER_CENTROID), seed)]
    top.add(_spherical_kmeans(top_rows, coarse, seed, iterations))
    fine = sample_rows(n, min(n, MIN_POINTS_PER_LIST * nlist), seed + 1)
    room = max(1, spill_bytes // (dim * 4))  # rows a store is meant to hold
    cap, store_of, groups = _spill_plan(top, top_rows, len(fine), room)
    stores: list[Any] = []
    cells: list[list[np.ndarray]] = [[] for _ in range(groups)]
    counts = np.zeros(coarse, np.int64)  # every sampled row per cluster: the lists' shares
    kept = np.zeros(coarse, np.int64)  # those set aside: at most ``cap`` a cluster
    try:
        stores.extend(spill() for _ in range(groups))
        step = max(1, block_rows)
        for lo in range(0, n, step):  # the whole of Y a block at a time: sequential reads, the sample picked out
            a, b = np.searchsorted(fine, [lo, lo + step])
            if a == b:
                continue
            B = np.ascontiguousarray(Y[lo : lo + step][fine[a:b] - lo], dtype=np.float32)
            _, at = top.search(B, 1)
            at = at[:, 0].astype(np.int64)
            counts += np.bincount(at, minlength=coarse)
            rank = _rank_within(at) + kept[at]  # each row's place among its cluster's rows so far
            keep = rank < cap[at]
            kept += np.bincount(at[keep], minlength=coarse)
            B, at = B[keep], at[keep]
            group = store_of[at]
            for g in np.unique(group).tolist():
                mine = group == g
                stores[g].append(B[mine])
                cells[g].append(at[mine].astype(np.int32))
        labels = [np.concatenate(c) if c else np.zeros(0, np.int32) for c in cells]
        share = _list_shares(counts, nlist)
        found: dict[int, np.ndarray] = {}
        for g in range(groups):
            R = stores[g][0 : len(stores[g])]
            stores[g].close()
            for c in np.unique(labels[g]).tolist():
                found[c] = _cell_centroids(R[labels[g] == c], share[c], seed + c + 1, iterations)
            del R
    finally:
        for store in stores:
            store.close()
    return _unit_rows([found[c] for c in sorted(found)]), int(kept.sum())


def _spill_plan(top: Any, top_rows: np.ndarray, fine: int, room: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(cap, store_of, stores)`` for spilling a fine sample of ``fine`` rows: each coarse cluster's
    share of it estimated from the coarse k-means' own rows, a cluster's rows kept up to ``cap``
    (a fifth over its estimate, never over ``room``: the rest only count towards its lists), and the
    clusters spread over the stores largest first, each onto the least filled, so that no store
    holds much over ``room`` rows whatever the clusters' sizes (a store holds at most its share of
    the caps plus one cluster's)."""
    coarse = top.ntotal
    _, at = top.search(np.ascontiguousarray(top_rows, dtype=np.float32), 1)
    expected = np.bincount(at[:, 0], minlength=coarse) * (fine / max(1, len(top_rows)))
    cap = np.minimum(room, np.ceil(expected * 1.2).astype(np.int64) + MIN_POINTS_PER_LIST)
    stores = int(min(MAX_SPILLS, max(1, -(-min(int(cap.sum()), fine) // room))))
    store_of = np.zeros(coarse, np.int64)
    load = np.zeros(stores, np.int64)
    for c in np.argsort(-cap, kind="stable").tolist():
        g = int(np.argmin(load))
        store_of[c] = g
        load[g] += cap[c]
    return cap, store_of, stores


def _rank_within(labels: np.ndarray) -> np.ndarray:
    """Each element's count of earlier elements with its label (0 for a label's first)."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.r_[0, np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - run_start
    return rank


def two_level_index(
    params: IndexParams, sample: np.ndarray, total: int, centroids: tuple[np.ndarray, int] | None = None
) -> tuple[Any, IndexParams]:
    """An IVF (or IVF-PQ) index of ``params``' kind whose ``nlist`` lists are found through a small
    IVF over their centroids (``two_level_centroids``), trained on ``sample``, for ``total`` rows;
    or over ``centroids`` ``(lists' centroids, rows they were trained on)`` already found
    (``streamed_two_level_centroids``), ``sample`` then training only the codes.

    A flat quantizer compares each query with every centroid: with lists proportional to the rows
    (a constant number scanned per query) its cost would grow with the rows; ``list_quantizer``'s
    grows with sqrt(nlist), or cbrt(nlist) from THREE_LEVEL_LISTS on. IVF-PQ codes
    encode the vectors themselves, not their residuals: one distance table per query, not one per
    list probed, so probing more lists stays cheap (recall is the same on near-copies)."""
    faiss = import_faiss()
    dim = sample.shape[1]
    if centroids is None:
        C = two_level_centroids(sample, params.lists, params.seed, params.train_iterations or TRAIN_ITERATIONS)
        trained_on = len(sample)
    else:
        C, trained_on = centroids
    nlist = len(C)
    quantizer = list_quantizer(C, params.seed, params.train_iterations or TRAIN_ITERATIONS)
    if params.kind == "ivfpq":
        index = faiss.IndexIVFPQ(
            quantizer, dim, nlist, params.pq_m, params.pq_bits or PQ_BITS, faiss.METRIC_INNER_PRODUCT
        )
        index.by_residual = False
        index.pq.cp.seed = params.seed
        index.pq.cp.niter = params.train_iterations or TRAIN_ITERATIONS
        index.pq.cp.min_points_per_centroid = 1
        index.pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS_PER_CENTROID
    elif params.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ConfigError(f"a two-level quantizer is for ivf or ivfpq indexes, not {params.kind!r}")
    # the quantizer is trained and filled: FAISS trains only the codes, on a spread-out part of the sample
    stride = max(1, -(-len(sample) // TRAIN_SAMPLE))
    index.train(np.ascontiguousarray(sample[::stride], dtype=np.float32))
    index.nprobe = min(nlist, params.nprobe or default_nprobe(nlist))
    return index, replace(params, nlist=nlist, trained_on=trained_on, rows_at_training=total)


def list_quantizer(C: np.ndarray, seed: int, iterations: int = TRAIN_ITERATIONS) -> Any:
    """An IVF-Flat holding the lists' unit centroids ``C``, one list a group of them, that finds a
    query's nearest lists without comparing it with them all (FAISS reads them back by list number).

    Two levels: sqrt(nlist) groups (FAISS's k-means), their centroids searched flat, a query then
    compared with them and the centroids of QUANTIZER_NPROBE groups. From THREE_LEVEL_LISTS on,
    three: ~nlist^(2/3) groups of ~cbrt(nlist) centroids (spherical k-means), their centroids held
    in such a two-level IVF (cbrt(nlist) groups of groups), QUANTIZER_NPROBE searched at each level.
    Seeded; FAISS's own format throughout (``write_index`` keeps every level and its nprobe)."""
    nlist = len(C)
    if nlist < THREE_LEVEL_LISTS:
        return _group_ivf(C, None, seed, iterations)
    groups = _unit_rows([_spherical_kmeans(C, max(1, round(nlist ** (2 / 3))), seed, iterations)])
    return _group_ivf(C, _group_ivf(groups, None, seed, iterations), seed, iterations)


def _group_ivf(C: np.ndarray, groups: Any, seed: int, iterations: int) -> Any:
    """``C`` in an IVF-Flat whose lists are the groups ``groups`` holds (an index of their
    centroids), or (None) sqrt(len(C)) groups of FAISS's k-means, searched flat."""
    faiss = import_faiss()
    dim = C.shape[1]
    if groups is None:
        ivf = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(dim), dim, max(1, int(math.sqrt(len(C)))), faiss.METRIC_INNER_PRODUCT
        )
        ivf.cp.seed = seed
        ivf.cp.niter = iterations
        ivf.cp.min_points_per_centroid = 1
        ivf.train(C)
    else:  # trained already: its quantizer holds one centroid per list
        ivf = faiss.IndexIVFFlat(groups, dim, int(groups.ntotal), faiss.METRIC_INNER_PRODUCT)
    ivf.add(C)
    ivf.make_direct_map()
    ivf.nprobe = min(ivf.nlist, QUANTIZER_NPROBE)
    return ivf


def list_of(index, X: np.ndarray) -> np.ndarray:
    """The inverted list each row of ``X`` (normalised) goes to in an IVF index: its coarse centroid."""
    _, at = index.quantizer.search(np.ascontiguousarray(X, dtype=np.float32), 1)
    return np.asarray(at[:, 0])


def presize_lists(index, counts: np.ndarray) -> None:
    """Give an IVF index's inverted lists room for ``counts`` rows each before it is filled (each
    list resized to its count and back to empty: the room stays). Lists that are not FAISS's
    in-memory arrays are left to grow as they are filled."""
    faiss = import_faiss()
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists):
        return
    for at in np.flatnonzero(counts).tolist():
        lists.resize(at, int(counts[at]))
        lists.resize(at, 0)


def set_search_params(index, params: IndexParams, nprobe: int | None = None) -> None:
    """Apply the search-time parameters a saved index does not carry (``nprobe`` overrides the recorded one)."""
    if params.kind in ("ivf", "ivfpq"):
        index.nprobe = nprobe or params.nprobe
    elif params.kind == "hnsw":
        index.hnsw.efSearch = params.ef_search


def add_in_chunks(index, X: np.ndarray, chunk_rows: int = 65_536) -> None:
    for start in range(0, len(X), chunk_rows):
        index.add(np.ascontiguousarray(X[start : start + chunk_rows]))


def knn(index, Q: np.ndarray, k: int, chunk_rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, rows)`` of the ``k`` nearest rows per query (rows -1 where fewer exist)."""
    sims = np.empty((len(Q), k), dtype=np.float32)
    rows = np.empty((len(Q), k), dtype=np.int64)
    for start in range(0, len(Q), chunk_rows):
        stop = start + chunk_rows
        sims[start:stop], rows[start:stop] = index.search(np.ascontiguousarray(Q[start:stop]), k)
    return sims, rows


def reduce_dims(
    X: np.ndarray, dim: int, seed: int = 0, sample: int = TRAIN_SAMPLE, chunk_rows: int = 65_536
) -> np.ndarray:
    """Unit vectors projected on their ``dim`` principal components (PCA fitted on a seeded sample), renormalised.

    Cosines there rank candidates nearly as the full vectors do, at a fraction of the cost.
    """
    faiss = import_faiss()

    pca = faiss.PCAMatrix(X.shape[1], dim)
    rows = np.sort(np.random.default_rng(seed).permutation(len(X))[:sample])
    pca.train(np.ascontiguousarray(X[rows]))
    Y = np.empty((len(X), dim), dtype=np.float32)
    for start in range(0, len(X), chunk_rows):
        Y[start : start + chunk_rows] = pca.apply(np.ascontiguousarray(X[start : start + chunk_rows]))
    norms = np.linalg.norm(Y, axis=1, keepdims=True)
    np.divide(Y, norms, out=Y, where=norms > 0)
    return Y


def rescore(X: np.ndarray, rows: np.ndarray, chunk_rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosines of candidate ``rows`` (-1: none) of every row of ``X``, re-sorted best first."""
    sims = np.full(rows.shape, -np.inf, dtype=np.float32)
    out_rows = rows.copy()
    for start in range(0, len(X), chunk_rows):
        r = rows[start : start + chunk_rows]
        s = np.einsum("cd,ckd->ck", X[start : start + chunk_rows], X[np.maximum(r, 0)])
        s[r < 0] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")
        sims[start : start + chunk_rows] = np.take_along_axis(s, order, axis=1)
        out_rows[start : start + chunk_rows] = np.take_along_axis(r, order, axis=1)
    return sims, out_rows
