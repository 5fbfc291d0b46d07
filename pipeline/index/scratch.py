"""Vectors too many for the memory budget: float32 rows in an unnamed scratch file, read a run at a time.

``VectorStore`` holds rows as ``np.ndarray`` would (``len``, ``shape``, ``X[rows]``, ``X[lo:hi]``),
so code written for a matrix reads a store unchanged, while only the rows asked for come into
memory. Rows are read with ``preadv`` (one call per run of consecutive rows), never through a
mapping: the kernel maps pages around each page touched and the resident set counts them.
The file has no name: a crash leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from imgfeat.core.sizes import memory_budget as resolve_budget
from imgfeat.core.storage import scratch_file, scratch_writes

STORE_BLOCK_BYTES = 64 << 20  # a block read or written at a time when the budget does not say
MIN_BLOCK_ROWS = 256


class VectorStore:
    """Rows of ``dim`` values (float32 unless ``dtype`` says) in an unnamed scratch file under
    ``folder`` (the system's temp folder when None), appended in order and read back by row numbers."""

    def __init__(self, dim: int, folder: Path | None = None, dtype: Any = np.float32) -> None:
        self._folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        self._file = scratch_file(folder)  # held open until close()
        self.dim = int(dim)
        self.n = 0
        self.dtype = np.dtype(dtype)

    @property
    def folder(self) -> Path:
        """Where its scratch file is (stores made beside it go there too)."""
        return self._folder

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.n

    def append(self, X: np.ndarray) -> None:
        """Add rows ``X`` (``(rows, dim)``, written as the store's dtype) after the last."""
        X = np.ascontiguousarray(X, self.dtype)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"rows of {self.dim} values expected, got shape {X.shape}")
        with scratch_writes(self._folder):
            write_all(self._file.fileno(), X, self.n * self.row_bytes)  # (a write may come back short)
        self.n += len(X)

    def block(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo`` to ``hi`` (clipped to the store): one read."""
        lo, hi = max(0, lo), min(self.n, hi)
        out = np.empty((max(0, hi - lo), self.dim), self.dtype)
        if len(out):
            read_into(self._file.fileno(), out, lo * self.row_bytes)
        return out

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any shape of row numbers, each in range) as ``rows.shape + (dim,)``:
        each distinct row read once, one ``preadv`` per run of consecutive rows."""
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.n):
            raise IndexError(f"row out of range for a store of {self.n} rows")
        want, back = np.unique(flat, return_inverse=True)
        got = np.empty((len(want), self.dim), self.dtype)
        if not len(want):
            return got.reshape(*rows.shape, self.dim)
        fd, size = self._file.fileno(), self.row_bytes
        breaks = np.flatnonzero(np.diff(want) != 1) + 1  # runs of consecutive rows: one read each
        starts, stops = np.r_[0, breaks], np.r_[breaks, len(want)]
        view = got.data.cast("B")
        preadv = os.preadv
        for lo, hi, offset in zip((starts * size).tolist(), (stops * size).tolist(), (want[starts] * size).tolist()):
            if preadv(fd, [view[lo:hi]], offset) != hi - lo:  # a short read: finish it the slow way
                read_into(fd, got.reshape(-1).view(np.uint8)[lo:hi], offset)
        if len(want) == len(flat) and np.array_equal(want, flat):  # already sorted and distinct: no copy
            return got.reshape(*rows.shape, self.dim)
        return got[back.reshape(-1)].reshape(*rows.shape, self.dim)

    def __getitem__(self, key: Any) -> np.ndarray:
        """``X[lo:hi]`` (a step of 1) or ``X[rows]`` (row numbers, as ``np.ndarray`` indexes them)."""
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.n)
            if step != 1:
                return self.rows(np.arange(lo, hi, step))
            return self.block(lo, hi)
        if isinstance(key, (int, np.integer)):
            k = int(key) + (self.n if key < 0 else 0)
            return self.rows(np.array([k]))[0]
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return self.rows(np.where(rows < 0, rows + self.n, rows))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row: only for small stores (a caller that needs the matrix whole)."""
        X = self.block(0, self.n)
        return X if dtype is None else X.astype(dtype)

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, block)`` of every row in order, ``rows`` at a time."""
        for lo in range(0, self.n, max(1, rows)):
            yield lo, self.block(lo, lo + rows)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScratchArray:
    """A one-dimensional array of one dtype in an unnamed scratch file: appended in order, read back
    whole or a range at a time (what a stage sets aside while something bigger holds the memory)."""

    def __init__(self, dtype: np.dtype | type, folder: Path | None = None) -> None:
        self._folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        self._file = scratch_file(folder)
        self.dtype = np.dtype(dtype)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, self.dtype).reshape(-1)
        if len(a):
            with scratch_writes(self._folder):
                write_all(self._file.fileno(), a.view(np.uint8), self.n * self.dtype.itemsize)
            self.n += len(a)

    def read(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Items ``lo`` to ``hi`` (clipped; all by default): one read."""
        lo, hi = max(0, lo), self.n if hi is None else min(self.n, hi)
        out = np.empty(max(0, hi - lo), self.dtype)
        if len(out):
            read_into(self._file.fileno(), out.view(np.uint8), lo * self.dtype.itemsize)
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ScratchArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KeyStore:
    """Keys (one fixed-width dtype, ``core/keys.py``) in an unnamed scratch file, one a row: a
    stage that names millions of images keeps their ids here and reads back the few a table
    names, or a block at a time. ``keys[nodes]`` and ``keys[lo:hi]`` come back as key arrays."""

    def __init__(self, dtype: np.dtype | str, folder: Path | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self._rows = VectorStore(self.dtype.itemsize, folder, np.uint8)

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, keys: np.ndarray) -> None:
        if keys.dtype != self.dtype:
            raise ValueError(f"keys of {self.dtype} expected, got {keys.dtype}")
        self._rows.append(np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), self.dtype.itemsize))

    def __getitem__(self, key: Any) -> np.ndarray:
        got = self._rows[key]
        return np.ascontiguousarray(got).view(self.dtype).reshape(got.shape[:-1])

    def close(self) -> None:
        self._rows.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_all(fd: int, a: np.ndarray, offset: int) -> None:
    view = a.data.cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


Vectors: TypeAlias = "np.ndarray | VectorStore"  # unit rows in memory, or in a scratch file


def read_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill contiguous ``out`` from ``fd`` at ``offset`` (reads may come back short: loop)."""
    view = out.data.cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"scratch file ended {len(view) - done} bytes early")
        done += got


def block_rows(dim: int, memory_budget: int | None, share: int = 8) -> int:
    """Rows of ``dim`` float32 values a ``1/share`` of the budget holds (at least MIN_BLOCK_ROWS)."""
    size = STORE_BLOCK_BYTES if memory_budget is None else resolve_budget(memory_budget) // share
    return max(MIN_BLOCK_ROWS, size // max(1, dim * 4))


def is_store(X: object) -> bool:
    return isinstance(X, VectorStore)


def reduce_store(
    X: VectorStore, dim: int, rows_at_a_time: int, folder: Path | None = None, seed: int = 0, sample: int = 40_000
) -> VectorStore:
    """``kinds.reduce_dims`` over a store, a block at a time: the rows projected on their ``dim``
    principal components (PCA fitted on the same seeded sample), renormalised, in a new store."""
    from imgfeat.index.kinds import import_faiss

    faiss = import_faiss()
    pca = faiss.PCAMatrix(X.shape[1], dim)
    rows = np.sort(np.random.default_rng(seed).permutation(len(X))[:sample])
    pca.train(np.ascontiguousarray(X[rows]))
    out = VectorStore(dim, folder)
    try:
        for _, B in X.blocks(rows_at_a_time):
            Y = pca.apply(np.ascontiguousarray(B))
            norms = np.linalg.norm(Y, axis=1, keepdims=True)
            np.divide(Y, norms, out=Y, where=norms > 0)
            out.append(Y)
    except BaseException:
        out.close()
        raise
    return out


def rescore_block(Q: np.ndarray, X: Vectors, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``kinds.rescore`` for queries ``Q`` (unit rows) whose candidates ``rows`` (-1: none) are rows
    of ``X``: exact cosines, re-sorted best first. The candidates' rows are read once each."""
    safe = np.maximum(rows, 0)
    C = X[safe]
    s = np.einsum("cd,ckd->ck", Q, C)
    s[rows < 0] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(rows, order, axis=1)


def similarities_to(X: Vectors, q: np.ndarray, rows_at_a_time: int = 65_536) -> np.ndarray:
    """``X @ q`` for a matrix or a store (a block of the store at a time)."""
    if not isinstance(X, VectorStore):
        return X @ q
    out = np.empty(len(X), np.float32)
    for lo, B in X.blocks(rows_at_a_time):
        out[lo : lo + len(B)] = B @ q
    return out
