"""Image ids as compact NumPy keys: sets and lookups over millions of ids without a Python object each.

A Python ``set`` of a million 32-character ids costs about 130 MB (a str object and a hash slot
each); the same ids as one fixed-width bytes array (NumPy ``S32``) cost 32 MB and are read from an
Arrow column without making a Python object per id. ``KeySet`` (membership) and ``KeyIndex`` (id
-> position) keep them sorted and answer a batch of queries with one binary search each, so the
stages that join feature rows to manifest rows (predict, report, index, the featureset reader)
hold a few tens of bytes per image, not hundreds.

Keys are the ids' UTF-8 bytes, padded to the longest; two ids are the same key exactly when they
are the same string (ids hold no NUL bytes, which is what NumPy's padding would blur).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KeyLike: TypeAlias = "pa.Array | pa.ChunkedArray | np.ndarray | Sequence[str]"


def keys_of(values: KeyLike) -> np.ndarray:
    """The ids as a 1-D fixed-width bytes array (``S<n>``, n the longest id in bytes, at least 1).

    An Arrow string column whose ids all have one length (content ids always do) is read straight
    from its data buffer; anything else goes through Python strings. Nulls are not ids: an Arrow
    column must have none.
    """
    if isinstance(values, np.ndarray) and values.dtype.kind == "S":
        return values
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        if values.null_count:
            raise ValueError("image ids cannot be null")
        if pa.types.is_large_string(values.type) or pa.types.is_string_view(values.type):
            values = values.cast(pa.string())
        fixed = _fixed_width(values)
        if fixed is not None:
            return fixed
        values = values.to_pylist()
    items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    width = max((len(b) for b in items), default=1) or 1
    return np.array(items, dtype=f"S{width}")


def _fixed_width(values: pa.Array) -> np.ndarray | None:
    """The ids read from the string array's buffers when every one has the same byte length."""
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype="S1")
    lengths = pc.binary_length(values)
    lo, hi = pc.min_max(lengths).values()
    width = lo.as_py()
    if width is None or width != hi.as_py() or width == 0:
        return None
    _, offsets, data = values.buffers()
    start = np.frombuffer(offsets, dtype=np.int32, count=1, offset=values.offset * 4)[0]
    raw = np.frombuffer(data, dtype=np.uint8, count=n * width, offset=int(start))
    return raw.view(f"S{width}").copy()  # a copy: the result must not pin the whole Arrow buffer


def _same_width(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.dtype.itemsize == b.dtype.itemsize:
        return a, b
    width = max(a.dtype.itemsize, b.dtype.itemsize)
    return a.astype(f"S{width}"), b.astype(f"S{width}")


def concat_keys(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Key arrays as one (padded to the widest)."""
    if not parts:
        return np.zeros(0, dtype="S1")
    width = max(p.dtype.itemsize for p in parts)
    return np.concatenate([p.astype(f"S{width}", copy=False) for p in parts])


def sorted_unique(keys: np.ndarray, owned: bool = False) -> np.ndarray:
    """The distinct keys, sorted: ``np.unique`` with one copy at most (none when ``owned``: the
    array is sorted in place), where ``np.unique`` of a million keys briefly holds three or four."""
    a = keys if owned else keys.copy()
    a.sort()
    if len(a) < 2:
        return a
    distinct = np.empty(len(a), dtype=bool)
    distinct[0] = True
    np.not_equal(a[1:], a[:-1], out=distinct[1:])
    return a if distinct.all() else a[distinct]


def keys_to_arrow(keys: np.ndarray) -> pa.Array:
    """Keys back as an Arrow string column, without a Python string each when they share one width."""
    if not len(keys):
        return pa.array([], pa.string())
    width = keys.dtype.itemsize
    if len(keys) * width < 2**31 and bool(np.all(np.char.str_len(keys) == width)):
        data = pa.py_buffer(np.ascontiguousarray(keys))
        offsets = pa.py_buffer(np.arange(0, (len(keys) + 1) * width, width, dtype=np.int32))
        return pa.StringArray.from_buffers(len(keys), offsets, data)
    return pa.array(as_strings(keys), pa.string())


class KeySet:
    """A set of ids held as sorted keys, grown a batch at a time.

    ``add`` appends a sorted run and merges runs of similar size (as a log-structured merge tree
    does), so adding N ids in batches costs O(N log N) and a lookup searches O(log N) runs.
    """

    def __init__(self, ids: KeyLike | None = None, owned: bool = False) -> None:
        """``owned``: ``ids`` is a key array no one else uses, sorted in place rather than copied."""
        self._runs: list[np.ndarray] = []
        self._size = 0
        if ids is not None:
            keys = sorted_unique(keys_of(ids), owned=owned or not isinstance(ids, np.ndarray))
            if len(keys):
                self._runs, self._size = [keys], len(keys)

    def __len__(self) -> int:
        return self._size

    def add(self, ids: KeyLike) -> None:
        """Add ids (already present ones are kept once)."""
        keys = sorted_unique(keys_of(ids), owned=not isinstance(ids, np.ndarray))
        if len(keys):
            keys = keys[~self.contains(keys)]
        if not len(keys):
            return
        self._runs.append(keys)
        self._size += len(keys)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            b, a = _same_width(self._runs.pop(), self._runs.pop())
            self._runs.append(np.sort(np.concatenate([a, b]), kind="stable"))

    def without(self, ids: KeyLike) -> KeySet:
        """These ids less ``ids`` (a new set, or this one when ``ids`` is empty)."""
        keys = self.keys()
        return KeySet(keys[~KeySet(ids).contains(keys)], owned=True) if len(ids) else self

    def contains(self, ids: KeyLike) -> np.ndarray:
        """A bool array: whether each of ``ids`` is in the set."""
        keys = keys_of(ids)
        found = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            found |= _member(run, keys)
        return found

    def keys(self) -> np.ndarray:
        """Every key, sorted."""
        if len(self._runs) > 1:
            merged = self._runs[0]
            for run in self._runs[1:]:
                merged, run = _same_width(merged, run)
                merged = np.concatenate([merged, run])
            self._runs = [np.sort(merged, kind="stable")]
        return self._runs[0] if self._runs else np.zeros(0, dtype="S1")


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return _rank_in(sorted_keys, keys) >= 0


def _rank_in(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each key's position in ``sorted_keys`` (distinct, sorted), -1 where absent: one binary search
    each (the costly part of joining millions of ids)."""
    out = np.full(len(keys), -1, dtype=np.int64)
    if not len(sorted_keys) or not len(keys):
        return out
    if keys.dtype.itemsize > sorted_keys.dtype.itemsize:
        # a query longer than every member is no member; a shorter one compares padded
        short = np.char.str_len(keys) <= sorted_keys.dtype.itemsize
        out[short] = _rank_in(sorted_keys, keys[short].astype(sorted_keys.dtype))
        return out
    keys = keys.astype(sorted_keys.dtype, copy=False)
    at = np.searchsorted(sorted_keys, keys)
    at[at == len(sorted_keys)] = 0
    found = sorted_keys[at] == keys
    out[found] = at[found]
    return out


class KeyIndex:
    """ids -> their positions in the sequence it was built from (the first position of a repeated id),
    and each distinct id's rank (0 .. len-1, in key order): a bitmap indexed by rank marks ids
    (one byte an id, where a growing set costs tens)."""

    def __init__(self, ids: KeyLike) -> None:
        keys = keys_of(ids)
        if len(keys) > 1 and bool(np.all(keys[1:] > keys[:-1])):
            self._keys, self._pos = keys, np.arange(len(keys), dtype=np.int64)  # sorted and distinct already
            return
        order = np.argsort(keys, kind="stable")  # stable: a repeated id's first position comes first
        self._keys = keys[order]
        self._pos = order.astype(np.int64)
        if len(self._keys) > 1:  # keep one entry per key, its first position
            first = np.ones(len(self._keys), dtype=bool)
            first[1:] = self._keys[1:] != self._keys[:-1]
            if not first.all():
                self._keys, self._pos = self._keys[first], self._pos[first]

    def __len__(self) -> int:
        return len(self._keys)

    def ranks(self, ids: KeyLike) -> np.ndarray:
        """Each id's rank among the distinct ids (int64), -1 for an id that is not in it."""
        return _rank_in(self._keys, keys_of(ids))

    def positions(self, ids: KeyLike) -> np.ndarray:
        """Each id's position (int64), -1 for an id that is not in it."""
        r = self.ranks(ids)
        return np.where(r >= 0, self._pos[np.maximum(r, 0)], -1) if len(self._pos) else r

    def contains(self, ids: KeyLike) -> np.ndarray:
        """A bool array: whether each of ``ids`` is in it."""
        return _member(self._keys, keys_of(ids))

    def keys(self) -> np.ndarray:
        """The distinct keys, sorted: ``keys()[rank]`` is the key of that rank."""
        return self._keys

    @property
    def order(self) -> np.ndarray:
        """Each rank's position (int64): ``order[rank]``, the sequence's ids in key order."""
        return self._pos


def as_keyindex(ids: Iterable[str] | KeySet | KeyIndex | None) -> KeyIndex | None:
    """``ids`` as a KeyIndex (None stays None; a KeyIndex is returned as it is)."""
    if ids is None or isinstance(ids, KeyIndex):
        return ids
    if isinstance(ids, KeySet):
        return KeyIndex(ids.keys())
    if isinstance(ids, pa.Array | pa.ChunkedArray | np.ndarray):
        return KeyIndex(ids)
    return KeyIndex(list(ids))


def as_strings(keys: np.ndarray) -> list[str]:
    """Keys back as Python strings (for the few ids a sample or a page needs)."""
    return [k.decode("utf-8") for k in keys.tolist()]
