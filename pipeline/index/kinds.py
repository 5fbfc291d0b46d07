"""FAISS index kinds over unit vectors (inner product = cosine): the choice, parameters, training and search."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from imgfeat.core.errors import ConfigError, unknown_value
from imgfeat.core.results import JsonObject

KINDS = ("auto", "flat", "ivf", "hnsw")
# Up to this many rows `auto` is exact: a flat search over 50,000 x 1,280 floats is ~0.25 GB
# scanned per query batch, still well under a second; beyond it an IVF index is much faster.
AUTO_FLAT_MAX = 50_000
TRAIN_SAMPLE = 40_000  # rows an IVF quantizer is trained on (k-means cost grows with it)
MIN_POINTS_PER_LIST = 39  # FAISS wants at least this many training points per IVF list
TRAIN_ITERATIONS = 10  # k-means rounds (FAISS' default, 25, costs 2.5x for little recall)


def import_faiss():
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

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "IndexParams":
        return cls(**obj)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise unknown_value("index kind", str(kind), KINDS)
    return kind


def resolve_params(kind: str, n: int, nlist: int | None = None, nprobe: int | None = None,
                   hnsw_m: int = 32, ef_search: int = 128, seed: int = 0) -> IndexParams:
    """Turn ``auto`` into a kind for ``n`` rows and fill the kind's parameters."""
    kind = check_kind(kind)
    if kind == "auto":
        kind = "flat" if n <= AUTO_FLAT_MAX else "ivf"
    if kind == "flat":
        return IndexParams("flat", seed=seed)
    if kind == "hnsw":
        return IndexParams("hnsw", hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=max(40, 2 * hnsw_m),
                           seed=seed)
    nlist = nlist or default_nlist(n)
    return IndexParams("ivf", nlist=nlist, nprobe=min(nlist, nprobe or default_nprobe(nlist)),
                       train_iterations=TRAIN_ITERATIONS, seed=seed)


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
    raise ConfigError(f"cannot make an index of kind {params.kind!r} (allowed: flat, ivf, hnsw)")


def train(index, params: IndexParams, X: np.ndarray) -> IndexParams:
    """Train an IVF quantizer on a seeded sample of ``X``; returns the params with ``trained_on``."""
    if params.kind != "ivf" or index.is_trained:
        return params
    if len(X) < params.nlist:
        raise ConfigError(f"an ivf index with nlist={params.nlist} needs at least {params.nlist} rows, got {len(X)}")
    size = min(TRAIN_SAMPLE, 50 * params.nlist)  # FAISS wants >= 39 points per list; more buys little
    rows = np.random.default_rng(params.seed).permutation(len(X))[:size]
    rows.sort()
    index.cp.seed = params.seed
    index.cp.niter = params.train_iterations or TRAIN_ITERATIONS
    index.train(np.ascontiguousarray(X[rows]))
    return replace(params, trained_on=len(rows), rows_at_training=len(X))


def set_search_params(index, params: IndexParams, nprobe: int | None = None) -> None:
    """Apply the search-time parameters a saved index does not carry."""
    if params.kind == "ivf":
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


def reduce_dims(X: np.ndarray, dim: int, seed: int = 0, sample: int = TRAIN_SAMPLE,
                chunk_rows: int = 65_536) -> np.ndarray:
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


def build_in_memory(X: np.ndarray, params: IndexParams):
    """Make, train and fill an index from unit vectors; returns ``(index, params)``."""
    index = make_index(params, X.shape[1])
    params = train(index, params, X)
    add_in_chunks(index, X)
    set_search_params(index, params)
    return index, params
