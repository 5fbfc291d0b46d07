"""Featureset rows as L2-normalised float32 vectors, the manifest paths of image ids, id prefixes."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from imgfeat.core.errors import ConfigError
from imgfeat.core.keys import KeyIndex, KeyLike
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import READ_BATCH_ROWS, committed_ids, iter_features, pick_rows, read_picked


def normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in place (float32), so inner product = cosine similarity.

    An all-zero row stays zero: it is similar to nothing rather than a NaN that poisons search.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not X.flags.writeable:  # a view of Arrow's buffers (a streamed batch): scale a copy
        X = X.copy()
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    np.divide(X, norms, out=X, where=norms > 0)
    return X


def read_vectors(ws: Workspace, featureset: str, wanted: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
    """``(ids, X)``: each wanted id once (all when None), in shard order, normalised float32.

    The featureset's reader decides the rows (``pick_rows``: ids first, cheap) and streams their
    features into one preallocated array (``read_picked``: a shard holding nothing wanted is never
    decoded).
    """
    ids, X = read_picked(ws, featureset, pick_rows(ws, featureset, wanted))
    return ids, normalise(X)


def iter_vectors(
    ws: Workspace, featureset: str, wanted: KeyLike | KeyIndex | None = None, batch_rows: int = READ_BATCH_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(keys, X)`` batches of at most ``batch_rows`` rows, normalised float32, the ids as compact
    keys (``core/keys.py``): the featureset's one streaming reader (``iter_features``: trusted rows,
    each id once, in shard order), one row group in memory at a time, no Python string per id."""
    for keys, X in iter_features(ws, featureset, ids=wanted, batch_rows=batch_rows, as_keys=True):
        yield keys, normalise(X)


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
            raise ConfigError(
                f"image id {ref!r}: give the full id or at least {MIN_ID_PREFIX} of its {ID_HEX} hex digits"
            )
    if all(len(r) == ID_HEX for r in refs):
        return refs
    ids = sorted(committed_ids(ws, featureset))
    return [ref if len(ref) == ID_HEX else _one_match(ref, ids, featureset) for ref in refs]


def _one_match(prefix: str, ids: list[str], featureset: str) -> str:
    start = bisect.bisect_left(ids, prefix)
    matches = list(itertools.takewhile(lambda i: i.startswith(prefix), ids[start : start + 6]))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"image id {prefix!r}: no image id in featureset {featureset} starts with it")
    more = " ..." if len(matches) > 5 else ""
    raise ConfigError(
        f"image id {prefix!r} is ambiguous in featureset {featureset}: it starts "
        f"{', '.join(matches[:5])}{more}; give more digits"
    )
