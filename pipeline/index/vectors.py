"""Featureset rows as L2-normalised float32 vectors, the manifest paths of image ids, id prefixes."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.workspace import Workspace
from imgfeat.core.commits import ShardRecord
from imgfeat.extract.featureset import (
    committed_ids,
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


def iter_vectors(ws: Workspace, featureset: str, wanted: set[str] | None = None,
                 batch_rows: int = READ_BATCH_ROWS) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(ids, X)`` batches of at most ``batch_rows`` rows: each wanted id once (all when None), in
    the shard order ``read_vectors`` gives, normalised float32; one shard's rows in memory at a time.

    (Private to the index until the featureset's own streaming reader takes its place.)
    """
    seen: set[str] = set()
    dropped, dim = 0, featureset_dim(ws, featureset)
    for path, record in trusted_shards(ws, featureset):
        shard_ids, finite = _ids(path, record)
        dropped += len(shard_ids) - int(finite.sum())
        keep = []
        for r, i in enumerate(shard_ids):
            if finite[r] and i not in seen and (wanted is None or i in wanted):
                seen.add(i)
                keep.append(r)
        pf = open_shard(featureset, path) if keep else None
        if pf is None:  # nothing wanted here, or its data changed since its commit (warned)
            continue
        for lo in range(0, len(keep), batch_rows):
            part = keep[lo : lo + batch_rows]
            X = np.zeros((len(part), dim), dtype=np.float32)
            _copy_rows(pf, part, X)
            yield [shard_ids[r] for r in part], normalise(X)
    warn_non_finite(featureset, dropped)


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
    pf = open_shard(featureset, path)
    if pf is None:
        return False
    _copy_rows(pf, keep, out)
    return True


def _copy_rows(pf: pq.ParquetFile, keep: list[int], out: np.ndarray) -> None:
    """Copy rows ``keep`` (ascending positions) of an opened shard's features into ``out``."""
    positions = np.asarray(keep, dtype=np.int64)
    done, offset = 0, 0
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=[S.FEATURE]):
        lo, hi = np.searchsorted(positions, [offset, offset + batch.num_rows])
        if hi > lo:
            col = batch.column(0).take(pa.array(positions[lo:hi] - offset, pa.int64()))
            out[done : done + hi - lo] = feature_matrix(pa.chunked_array([col]), np.float32)
            done += hi - lo
        offset += batch.num_rows


def manifest_rows(ws: Workspace, dataset: str) -> pa.Table:
    """The readable rows of a dataset's manifest: ``image_id, path, split, label`` (status ok)."""
    table = read_manifest(ws, dataset, columns=[S.IMAGE_ID, S.PATH, S.SPLIT, S.LABEL, S.STATUS])
    ok = pc.and_(pc.equal(table[S.STATUS], S.STATUS_OK), pc.is_valid(table[S.IMAGE_ID]))
    return table.filter(pc.fill_null(ok, False)).select([S.IMAGE_ID, S.PATH, S.SPLIT, S.LABEL])


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


MIN_ID_PREFIX = 8  # hex digits: 16^8 ids make a clash between two random images rare below ~10k images
ID_HEX = 32  # an image id is the BLAKE2b-128 of the file's bytes, as 32 hex digits


def resolve_id_prefixes(ws: Workspace, featureset: str, refs: Sequence[str]) -> list[str]:
    """Full image ids for ids or unique prefixes (8+ hex digits) of ids in the featureset, as git does.

    A prefix that matches no id, or several, is a ConfigError naming it (and the candidates).
    """
    refs = [r.strip().lower() for r in refs]
    for ref in refs:
        if not (MIN_ID_PREFIX <= len(ref) <= ID_HEX and all(c in "0123456789abcdef" for c in ref)):
            raise ConfigError(f"image id {ref!r}: give the full id or at least {MIN_ID_PREFIX} of its "
                              f"{ID_HEX} hex digits")
    if all(len(r) == ID_HEX for r in refs):
        return refs
    ids = sorted(committed_ids(ws, featureset))
    return [ref if len(ref) == ID_HEX else _one_match(ref, ids, featureset) for ref in refs]


def _one_match(prefix: str, ids: list[str], featureset: str) -> str:
    start = bisect.bisect_left(ids, prefix)
    matches = list(itertools.takewhile(lambda i: i.startswith(prefix), ids[start:start + 6]))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"image id {prefix!r}: no image id in featureset {featureset} starts with it")
    more = " ..." if len(matches) > 5 else ""
    raise ConfigError(f"image id {prefix!r} is ambiguous in featureset {featureset}: it starts "
                      f"{', '.join(matches[:5])}{more}; give more digits")
