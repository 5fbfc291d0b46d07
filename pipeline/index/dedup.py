"""Near-duplicate groups and train/test leaks of a dataset over a featureset: tables, summary, HTML page."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.storage import FileLock, remove_stale_tmp, write_bytes_atomic, write_json_atomic, write_table_atomic
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.extract.featureset import featureset_info
from imgfeat.index.kinds import (MIN_POINTS_PER_LIST, IndexParams, build_in_memory, knn, reduce_dims, rescore,
                                  resolve_params)
from imgfeat.index.vectors import manifest_rows, read_vectors
from imgfeat.scan.manifest import dataset_root

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.9  # lite0 features: copies >= 0.91, distinct photos <= 0.53 (tests/test_dedup.py)
GROUPS_FILE, LEAKS_FILE, PAGE_FILE, SUMMARY_FILE = "groups.parquet", "leaks.parquet", "index.html", "_dedup.json"
EXACT_MAX = 20_000  # above this many images the neighbour search is approximate (IVF)
DEDUP_NPROBE = 8  # near-copies sit in the same or a neighbouring list: a few lists find them
CANDIDATE_DIMS = 256  # approximate search finds candidates on this many principal components


@dataclass(frozen=True)
class DedupConfig:
    """Which dataset and featureset, the cosine threshold, and where the results go (dedup/<name>/)."""

    featureset: str
    dataset: str
    threshold: float = DEFAULT_THRESHOLD
    neighbours: int = 10  # candidates per image; groups still chain through neighbours of neighbours
    name: str | None = None
    page_groups: int = 200  # groups drawn on the HTML page (all of them are in the table)
    exact_max: int = EXACT_MAX
    wait: float | None = None

    def __post_init__(self) -> None:
        check_name("featureset", self.featureset)
        check_name("dataset", self.dataset)
        check_name("dedup", self.out_name)
        if not isinstance(self.threshold, (int, float)) or not 0 < self.threshold <= 1:
            raise ConfigError(f"dedup threshold must be a cosine similarity in (0, 1], got {self.threshold!r}")
        for key in ("neighbours", "page_groups", "exact_max"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"dedup {key} must be a positive integer, got {getattr(self, key)!r}")

    @property
    def out_name(self) -> str:
        return self.name or self.dataset


@dataclass(frozen=True)
class DedupSummary:
    """What `imgfeat dedup` found; ``to_json`` is its --json object."""

    dataset: str
    featureset: str
    threshold: float
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
    page: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # read, neighbours, tables, page, write

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


def dedup_params(n: int, exact_max: int) -> IndexParams:
    """Exact up to ``exact_max``; beyond, a coarse IVF (2 sqrt(n) lists, 8 probed): near-copies share a list."""
    if n <= exact_max:
        return resolve_params("flat", n)
    nlist = max(1, min(int(2 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))
    return resolve_params("ivf", n, nlist=nlist, nprobe=DEDUP_NPROBE)


def nearest_neighbours(X: np.ndarray, k: int, exact_max: int = EXACT_MAX) -> Neighbours:
    """The ``k`` nearest other rows of every row of unit vectors ``X``, with exact similarities.

    Up to ``exact_max`` rows the search is exact. Beyond, candidates come from an IVF index over
    the vectors' first CANDIDATE_DIMS principal components and are rescored on the full vectors.
    """
    n = len(X)
    if n < 2:
        return Neighbours(np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64), "flat")
    params = dedup_params(n, exact_max)
    Y = reduce_dims(X, CANDIDATE_DIMS) if params.kind != "flat" and X.shape[1] > CANDIDATE_DIMS else X
    index, params = build_in_memory(Y, params)
    sims, rows = knn(index, Y, min(k + 1, n))
    del index
    if Y is not X:
        sims, rows = rescore(X, rows)
    rows[rows == np.arange(n)[:, None]] = -1  # an image is not its own neighbour
    return Neighbours(sims, rows, params.kind)


def similar_pairs(nb: Neighbours, threshold: float) -> Graph:
    """Each pair of images at or above ``threshold`` (found among the neighbour lists) once."""
    n = len(nb.rows)
    a = np.repeat(np.arange(n), nb.rows.shape[1])
    b, s = nb.rows.ravel(), nb.sims.ravel()
    keep = (b >= 0) & (s >= threshold)
    a, b, s = a[keep], b[keep], s[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    _, first = np.unique(lo * n + hi, return_index=True)
    return Graph(lo[first], hi[first], s[first])


def components(n: int, graph: Graph) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes (union-find over the pairs)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    m = coo_matrix((np.ones(len(graph.a)), (graph.a, graph.b)), shape=(n, n))
    return connected_components(m, directed=False)[1]


def best_partner(n: int, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """For each node, its most similar partner in the graph (-1 and 0 where it has none)."""
    order = np.argsort(np.concatenate([graph.sim, graph.sim]), kind="stable")
    src = np.concatenate([graph.a, graph.b])[order]
    dst = np.concatenate([graph.b, graph.a])[order]
    sim = np.concatenate([graph.sim, graph.sim])[order]
    partner, best = np.full(n, -1, np.int64), np.zeros(n, np.float32)
    partner[src], best[src] = dst, sim  # ascending order: the last (best) write wins
    return partner, best


@dataclass(frozen=True)
class Images:
    """A dataset's readable manifest rows joined to the unique images that have features."""

    ids: list[str]  # unique images with a feature row (node k = ids[k])
    X: np.ndarray  # their unit vectors
    row_ids: list[str]  # per manifest row
    row_paths: list[str]
    row_splits: list[str | None]
    missing: int  # unique images without a feature row


def load_images(ws: Workspace, cfg: DedupConfig) -> Images:
    table = manifest_rows(ws, cfg.dataset)
    row_ids = table[S.IMAGE_ID].to_pylist()
    ids, X = read_vectors(ws, cfg.featureset, row_ids)
    missing = len(set(row_ids)) - len(ids)
    if not ids:
        raise ConfigError(f"featureset {cfg.featureset} has no features for dataset {cfg.dataset}; "
                          f"run 'imgfeat extract --dataset {cfg.dataset}' first")
    if missing:
        log.warning("%d images of %s have no features in %s: they are left out", missing, cfg.dataset, cfg.featureset)
    return Images(ids, X, row_ids, table[S.PATH].to_pylist(), table[S.SPLIT].to_pylist(), missing)


def groups_table(im: Images, graph: Graph) -> pa.Table:
    """One row per manifest path in a group of two or more paths (exact copies: nearest is itself)."""
    n = len(im.ids)
    node = {i: k for k, i in enumerate(im.ids)}
    rows = [(node[i], p) for i, p in zip(im.row_ids, im.row_paths) if i in node]
    paths_per_node = np.bincount([u for u, _ in rows], minlength=n)
    comp = components(n, graph)
    paths_per_comp = np.bincount(comp, weights=paths_per_node)
    partner, best = best_partner(n, graph)
    group_id: dict[int, str] = {}
    for k in np.argsort(np.asarray(im.ids, dtype=object), kind="stable"):
        group_id.setdefault(int(comp[k]), im.ids[k])  # the smallest image id names the group
    out = []
    for u, p in rows:
        if paths_per_comp[comp[u]] < 2:
            continue
        exact = paths_per_node[u] > 1
        nearest = im.ids[u] if exact else im.ids[partner[u]]
        out.append((im.ids[u], group_id[int(comp[u])], nearest, 1.0 if exact else float(best[u]), p))
    out.sort(key=lambda r: (r[1], -r[3], r[4]))
    cols = list(zip(*out)) if out else [[]] * 5
    return pa.table(dict(zip(S.DEDUP_GROUPS_SCHEMA.names, cols)), schema=S.DEDUP_GROUPS_SCHEMA)


def leaks_table(im: Images, nb: Neighbours, threshold: float) -> pa.Table:
    """Held-out rows (split neither train nor empty) whose nearest training image is at or above threshold."""
    node = {i: k for k, i in enumerate(im.ids)}
    train_path: dict[str, str] = {}
    held = []
    for i, p, s in zip(im.row_ids, im.row_paths, im.row_splits):
        if i in node and s is not None:
            if s == S.SPLIT_TRAIN:
                train_path.setdefault(i, p)
            else:
                held.append((i, p, s))
    if not train_path or not held:
        return S.DEDUP_LEAKS_SCHEMA.empty_table()
    is_train = np.zeros(len(im.ids), bool)
    is_train[[node[i] for i in train_path]] = True
    sims, rows = nearest_train(im.X, nb, is_train, np.array([node[i] for i, _, _ in held]), threshold)
    out = []
    for (i, p, s), sim, r in zip(held, sims.tolist(), rows.tolist()):
        if i in train_path:
            out.append((i, p, s, i, train_path[i], S.SPLIT_TRAIN, 1.0))  # the very same content is in train
        elif r >= 0 and sim >= threshold:
            out.append((i, p, s, im.ids[r], train_path[im.ids[r]], S.SPLIT_TRAIN, sim))
    out.sort(key=lambda r: (-r[6], r[1]))
    cols = list(zip(*out)) if out else [[]] * 7
    return pa.table(dict(zip(S.DEDUP_LEAKS_SCHEMA.names, cols)), schema=S.DEDUP_LEAKS_SCHEMA)


def nearest_train(X: np.ndarray, nb: Neighbours, is_train: np.ndarray, nodes: np.ndarray,
                  threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Similarity and node of the nearest training image of each of ``nodes`` (-1 where none is close).

    The first training image in a node's neighbour list is its nearest. A list holding no training
    image while its last entry is still above the threshold may have cut one off: those few
    nodes are compared with every training image exactly.
    """
    rows, sims = nb.rows[nodes], nb.sims[nodes]
    mask = (rows >= 0) & is_train[np.maximum(rows, 0)]
    first = mask.argmax(axis=1)
    found = mask.any(axis=1)
    best_rows = np.where(found, rows[np.arange(len(nodes)), first], -1)
    best_sims = np.where(found, sims[np.arange(len(nodes)), first], -np.inf).astype(np.float32)
    cut = ~found & (rows.shape[1] > 0) & (sims[:, -1:].min(axis=1, initial=np.inf) >= threshold)
    for k in np.flatnonzero(cut):
        s = X @ X[nodes[k]]
        s[~is_train] = -np.inf
        best_rows[k], best_sims[k] = int(s.argmax()), float(s.max())
    return best_sims, best_rows


def run_dedup(ws: Workspace, cfg: DedupConfig, run_id: str) -> DedupSummary:
    """Find groups and leaks; write groups.parquet, leaks.parquet, index.html under dedup/<name>/."""
    from imgfeat.index.page import render_page

    clock = _Clock()
    featureset_info(ws, cfg.featureset)  # exit 2 for an unknown featureset
    im = clock.lap("read", load_images(ws, cfg))
    nb = clock.lap("neighbours", nearest_neighbours(im.X, cfg.neighbours, cfg.exact_max))
    groups = groups_table(im, similar_pairs(nb, cfg.threshold))
    leaks = clock.lap("tables", leaks_table(im, nb, cfg.threshold))
    folder = ws.dedup_dir(cfg.out_name)
    page = clock.lap("page", render_page(groups, leaks, dataset_root(ws, cfg.dataset), cfg, run_id))
    with FileLock(ws.locks_dir / f"dedup-{cfg.out_name}.lock", f"dedup results {cfg.out_name}", cfg.wait):
        remove_stale_tmp(folder)
        write_table_atomic(groups, folder / GROUPS_FILE)
        write_table_atomic(leaks, folder / LEAKS_FILE)
        write_bytes_atomic(page.encode("utf-8"), folder / PAGE_FILE)
        clock.lap("write", None)
        summary = _summary(cfg, im, nb.kind, groups, leaks, folder, clock)
        write_json_atomic({**summary.to_json(), "run_id": run_id}, folder / SUMMARY_FILE)
    return summary


class _Clock:
    """Seconds per step of a run, for the summary's ``timings``."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str, value):
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now
        return value


def _summary(cfg: DedupConfig, im: Images, kind: str, groups: pa.Table, leaks: pa.Table, folder,
             clock: _Clock) -> DedupSummary:
    group_ids = groups[S.GROUP_ID].to_pylist()
    exact = sum(1 for i, n in zip(groups[S.IMAGE_ID].to_pylist(), groups[S.NEAREST_ID].to_pylist()) if i == n)
    return DedupSummary(dataset=cfg.dataset, featureset=cfg.featureset, threshold=float(cfg.threshold),
                        images=len(im.ids), paths=len(im.row_ids), missing_features=im.missing,
                        search="exact" if kind == "flat" else f"approximate ({kind})", groups=len(set(group_ids)),
                        grouped_paths=len(group_ids), exact_duplicate_paths=exact,
                        groups_table=str(folder / GROUPS_FILE), leaks=leaks.num_rows,
                        leaks_table=str(folder / LEAKS_FILE), page=str(folder / PAGE_FILE),
                        seconds=round(time.perf_counter() - clock.t0, 3), timings=clock.timings)
