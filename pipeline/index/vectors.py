"""Featureset rows as L2-normalised float32 vectors, and the manifest paths of image ids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.workspace import Workspace
from imgfeat.core.commits import ShardRecord
from imgfeat.extract.featureset import (
    feature_matrix,
    feature_shards,
    featureset_info,
    finite_rows,
    open_shard,
    trusted_shards,
    warn_non_finite,
)
from imgfeat.scan.manifest import read_manifest

READ_BATCH_ROWS = 8192


def normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in place (float32), so inner product = cosine similarity.

    An all-zero row stays zero: it is similar to nothing rather than a NaN that poisons search.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    np.divide(X, norms, out=X, where=norms > 0)
    return X


def featureset_dim(ws: Workspace, featureset: str) -> int:
    """The vector length a featureset stores (from its provenance, else its first shard)."""
    dim = featureset_info(ws, featureset).get("dim")
    if dim:
        return int(dim)
    shards = feature_shards(ws, featureset)
    if not shards:
        return 0
    return int(pq.ParquetFile(shards[0]).schema_arrow.field(S.FEATURE).type.list_size)


def read_vectors(ws: Workspace, featureset: str, wanted: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
    """``(ids, X)``: each wanted id once (all when None), in shard order, normalised float32.

    Ids are read first (cheap); features are then streamed into one preallocated array, and a
    shard holding nothing wanted is never decoded.
    """
    wanted_set = None if wanted is None else set(wanted)
    shards = trusted_shards(ws, featureset)
    ids: list[str] = []
    seen: set[str] = set()
    picks: list[list[int]] = []  # per shard: the row positions kept, in order
    dropped = 0
    for path, record in shards:
        shard_ids, finite = _ids(path, record)
        dropped += len(shard_ids) - int(finite.sum())
        keep = []
        for r, i in enumerate(shard_ids):
            if finite[r] and i not in seen and (wanted_set is None or i in wanted_set):
                seen.add(i)
                ids.append(i)
                keep.append(r)
        picks.append(keep)
    warn_non_finite(featureset, dropped)
    X = np.zeros((len(ids), featureset_dim(ws, featureset)), dtype=np.float32)
    good = np.ones(len(ids), dtype=bool)  # rows of a shard whose data changed since its commit: out
    start = 0
    for (path, _), keep in zip(shards, picks):
        if keep:
            if not _fill(featureset, path, keep, X[start : start + len(keep)]):
                good[start : start + len(keep)] = False
            start += len(keep)
    if not good.all():
        ids, X = [i for i, g in zip(ids, good) if g], X[good]
    return ids, normalise(X)


def _ids(path: Path, record: ShardRecord | None) -> tuple[list[str], np.ndarray]:
    """A shard's ids and which rows are finite: the id column alone unless its record says it holds
    NaN or inf rows (or it has no record: a legacy featureset)."""
    if record is not None and record.nonfinite == 0:
        with pq.ParquetFile(path) as pf:
            ids = pf.read(columns=[S.IMAGE_ID]).column(0).to_pylist()
        return ids, np.ones(len(ids), dtype=bool)
    with pq.ParquetFile(path) as pf:
        t = pf.read(columns=[S.IMAGE_ID, S.FEATURE])
    return t.column(0).to_pylist(), finite_rows(t.column(S.FEATURE))


def _fill(featureset: str, path: Path, keep: list[int], out: np.ndarray) -> bool:
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
            out[done : done + hi - lo] = feature_matrix(pa.chunked_array([col]), np.float32)
            done += hi - lo
        offset += batch.num_rows
    return True


def manifest_rows(ws: Workspace, dataset: str) -> pa.Table:
    """The readable rows of a dataset's manifest: ``image_id, path, split`` (status ok)."""
    table = read_manifest(ws, dataset, columns=[S.IMAGE_ID, S.PATH, S.SPLIT, S.STATUS])
    ok = pc.and_(pc.equal(table[S.STATUS], S.STATUS_OK), pc.is_valid(table[S.IMAGE_ID]))
    return table.filter(pc.fill_null(ok, False)).select([S.IMAGE_ID, S.PATH, S.SPLIT])


def first_paths(ws: Workspace, datasets: Sequence[str]) -> dict[str, tuple[str, str]]:
    """image_id -> (dataset, path) of its first manifest row, over ``datasets`` in order."""
    out: dict[str, tuple[str, str]] = {}
    for d in datasets:
        t = manifest_rows(ws, d)
        for i, p in zip(t[S.IMAGE_ID].to_pylist(), t[S.PATH].to_pylist()):
            out.setdefault(i, (d, p))
    return out


def scanned_datasets(ws: Workspace) -> list[str]:
    """Every dataset of the workspace that has a manifest."""
    return [d for d in ws.list_names("datasets") if ws.manifest_path(d).is_file()]
