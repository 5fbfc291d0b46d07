"""Image ids as compact NumPy keys: sets and lookups over millions of ids without a Python object each.

A Python ``set`` of a million 32-character ids costs about 130 MB (a str object and a hash slot
each); the same ids as one fixed-width bytes array (NumPy ``S32``) cost 32 MB and are read from an
Arrow column without making a Python object per id. ``KeySet`` (membership) and ``KeyIndex`` (id
-> position) keep them sorted and answer a batch of queries with one binary search each, so the
stages that join feature rows to manifest rows (predict, report, index, the featureset reader)
hold a few tens of bytes per image, not hundreds.

Keys are the ids' UTF-8 bytes, padded to the longest; two ids are the same key exactly when they
are the same string (ids hold no NUL bytes, which is what NumPy's padding would blur). Content ids
(BLAKE2b-128 as 32 lowercase hex digits, every id imgfeat makes) are packed two digits a byte
into 16-byte keys of their own dtype (``V16``, "packed"): half the memory, and the same order,
since hex digits sort as their values. An array is packed only when every id in it is a content
id; the functions here compare packed and plain keys as the strings they stand for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KeyLike: TypeAlias = "pa.Array | pa.ChunkedArray | np.ndarray | Sequence[str]"

HEX_WIDTH = 32  # a content id: 16 bytes as lowercase hex
PACKED = np.dtype("V16")  # a content id's key: its 16 bytes
PACK_ROWS = 1 << 20  # ids packed or unpacked at a time (bounds the uint8 temporaries)
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_NIBBLE = np.full(256, 255, np.uint8)  # ASCII -> a lowercase hex digit's value, 255 for anything else
_NIBBLE[_HEX_DIGITS] = np.arange(16, dtype=np.uint8)


def is_packed(keys: np.ndarray) -> bool:
    """Whether these keys are packed content ids (``PACKED``)."""
    return keys.dtype.kind == "V"


def _cmp(keys: np.ndarray) -> np.ndarray:
    """Keys as a bytes array NumPy sorts and compares: packed keys viewed as ``S16``. Within one
    width, ``S`` compares like ``memcmp`` (NUL bytes included) and equal means the same bytes."""
    return keys.view(f"S{keys.dtype.itemsize}") if is_packed(keys) else keys


def keys_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: whether two key arrays of one dtype hold the same keys."""
    return np.asarray(_cmp(a) == _cmp(b), dtype=bool)


def _pack(raw: np.ndarray) -> np.ndarray | None:
    """``(n, 32)`` uint8 digits as packed keys, or None when any is not a lowercase hex digit."""
    out = np.empty((len(raw), 16), np.uint8)
    for lo in range(0, len(raw), PACK_ROWS):
        v = _NIBBLE[raw[lo : lo + PACK_ROWS]]
        if (v == 255).any():
            return None
        np.left_shift(v[:, 0::2], 4, out=out[lo : lo + PACK_ROWS])
        out[lo : lo + PACK_ROWS] |= v[:, 1::2]
    return out.view(PACKED).reshape(len(raw))


def unpack(keys: np.ndarray) -> np.ndarray:
    """Packed keys as their ids' plain keys (``S32``); plain keys as they are."""
    if not is_packed(keys):
        return keys
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), 16)
    out = np.empty((len(keys), HEX_WIDTH), np.uint8)
    for lo in range(0, len(keys), PACK_ROWS):
        part = raw[lo : lo + PACK_ROWS]
        out[lo : lo + PACK_ROWS, 0::2] = _HEX_DIGITS[part >> 4]
        out[lo : lo + PACK_ROWS, 1::2] = _HEX_DIGITS[part & 15]
    return out.view(f"S{HEX_WIDTH}").reshape(len(keys))


def pack_where_possible(keys: np.ndarray) -> np.ndarray:
    """Plain keys packed when every one is a content id; anything else as it is."""
    if is_packed(keys) or keys.dtype.itemsize != HEX_WIDTH or not len(keys):
        return keys
    packed = _pack(np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), HEX_WIDTH))
    return keys if packed is None else packed


def like(keys: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``keys`` in ``other``'s kind and width, to compare with it, and which of them could be
    (None: all). A key longer than ``other``'s width, or an id that is no content id against
    packed keys, is none of ``other``'s."""
    if is_packed(other):
        if is_packed(keys):
            return keys, None
        width = keys.dtype.itemsize
        if width < HEX_WIDTH:
            return np.zeros(len(keys), PACKED), np.zeros(len(keys), bool)
        raw = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), width)
        ok = (_NIBBLE[raw[:, :HEX_WIDTH]] != 255).all(axis=1)  # 32 hex digits ...
        if width > HEX_WIDTH:
            ok &= (raw[:, HEX_WIDTH:] == 0).all(axis=1)  # ... and nothing after them
        raw = np.where(ok[:, None], raw[:, :HEX_WIDTH], np.uint8(ord("0")))
        packed = _pack(raw)
        assert packed is not None
        return packed, None if ok.all() else ok
    keys = unpack(keys)
    if keys.dtype.itemsize > other.dtype.itemsize:
        fits = np.char.str_len(keys) <= other.dtype.itemsize
        return keys.astype(other.dtype), None if fits.all() else fits  # a longer id is cut, then ruled out
    return keys.astype(other.dtype, copy=False), None


def keys_of(values: KeyLike) -> np.ndarray:
    """The ids as a 1-D fixed-width array: packed (``PACKED``) when every id is a content id, else
    their bytes (``S<n>``, n the longest id in bytes, at least 1).

    An Arrow string column whose ids all have one length (content ids always do) is read straight
    from its data buffer; anything else goes through Python strings. Nulls are not ids: an Arrow
    column must have none.
    """
    if isinstance(values, np.ndarray) and values.dtype.kind in "SV":
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
    return pack_where_possible(np.array(items, dtype=f"S{width}"))


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
    if width == HEX_WIDTH:
        packed = _pack(raw.reshape(n, width))
        if packed is not None:
            return packed
    return raw.view(f"S{width}").copy()  # a copy: the result must not pin the whole Arrow buffer


def _same_width(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.dtype == b.dtype:
        return a, b
    a, b = unpack(a), unpack(b)  # a packed and a plain array: both plain
    width = max(a.dtype.itemsize, b.dtype.itemsize)
    return a.astype(f"S{width}", copy=False), b.astype(f"S{width}", copy=False)


def concat_keys(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Key arrays as one (packed when every part is, else plain and padded to the widest)."""
    if not parts:
        return np.zeros(0, dtype="S1")
    if all(is_packed(p) for p in parts):
        return np.concatenate(parts)
    parts = [unpack(p) for p in parts]
    width = max(p.dtype.itemsize for p in parts)
    return np.concatenate([p.astype(f"S{width}", copy=False) for p in parts])


def room_for(dest: np.ndarray, got: np.ndarray) -> np.ndarray:
    """``dest`` (keys filled in place) in a dtype that holds ``got``'s keys too: as it is when it
    does, else widened, or unpacked when one is packed and the other not (a copy)."""
    if dest.dtype == got.dtype:
        return dest
    width = max(unpack(dest[:0]).dtype.itemsize, unpack(got[:0]).dtype.itemsize)
    if not is_packed(dest) and width == dest.dtype.itemsize:
        return dest
    return unpack(dest).astype(f"S{width}", copy=False)


def filled(batches: Iterable[KeyLike], total: int) -> np.ndarray:
    """Batches of ids as one key array, written into one allocation of ``total`` keys (an upper
    bound on their number) rather than a list of parts and their concatenation (twice the keys)."""
    out = np.zeros(0, PACKED)
    n = 0
    for batch in batches:
        got = keys_of(batch)
        if not n:
            out = np.empty(max(total, len(got)), got.dtype)
        out = room_for(out, got)
        if n + len(got) > len(out):  # more than promised: grown (a copy)
            out = np.concatenate([out[:n], np.empty(n + len(got), out.dtype)])
        out[n : n + len(got)] = got if got.dtype == out.dtype else unpack(got)
        n += len(got)
    return out[:n]


def sorted_unique(keys: np.ndarray, owned: bool = False) -> np.ndarray:
    """The distinct keys, sorted: ``np.unique`` with one copy at most (none when ``owned``: the
    array is sorted in place), where ``np.unique`` of a million keys briefly holds three or four."""
    a = keys if owned else keys.copy()
    _cmp(a).sort()
    if len(a) < 2:
        return a
    distinct = np.empty(len(a), dtype=bool)
    distinct[0] = True
    c = _cmp(a)
    np.not_equal(c[1:], c[:-1], out=distinct[1:])
    return a if distinct.all() else a[distinct]


def distinct_ascending(keys: np.ndarray) -> bool:
    """Whether the keys are sorted and each is there once."""
    c = _cmp(keys)
    return len(c) < 2 or bool(np.all(c[1:] > c[:-1]))


def argsort_keys(keys: np.ndarray) -> np.ndarray:
    """The stable order that sorts the keys (int64)."""
    return np.argsort(_cmp(keys), kind="stable")


def first_of_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """A bool for each of sorted keys: whether it is the first of its run of equal keys."""
    first = np.ones(len(sorted_keys), dtype=bool)
    c = _cmp(sorted_keys)
    if len(c) > 1:
        np.not_equal(c[1:], c[:-1], out=first[1:])
    return first


def unique_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(keys, return_index=True, return_counts=True)`` for keys of either kind: the
    distinct keys sorted, each one's first index, and how often each occurs."""
    uniq, first_at, counts = np.unique(_cmp(keys), return_index=True, return_counts=True)
    return uniq.view(keys.dtype), first_at, counts


def keys_to_arrow(keys: np.ndarray) -> pa.Array:
    """Keys back as an Arrow string column, without a Python string each when they share one width."""
    if not len(keys):
        return pa.array([], pa.string())
    keys = unpack(keys)
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
            merged = np.concatenate([a, b])
            _cmp(merged).sort(kind="stable")
            self._runs.append(merged)

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
            # one copy of all the runs, which are let go before it is sorted (concatenated one by
            # one, with the runs still held, 10M keys took ~3.5x their bytes at once)
            merged = concat_keys(self._runs)
            self._runs = []
            _cmp(merged).sort(kind="stable")  # a merge of sorted runs (timsort)
            self._runs = [merged]
        return self._runs[0] if self._runs else np.zeros(0, dtype="S1")

    def take(self) -> np.ndarray:
        """Every key, sorted, and the set left empty: the array is the caller's alone (a set that
        stays referenced elsewhere holds no copy of it)."""
        keys = self.keys()
        self._runs, self._size = [], 0
        return keys


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return _rank_in(sorted_keys, keys) >= 0


def _rank_in(sorted_keys: np.ndarray, keys: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
    """Each key's position in ``sorted_keys`` (distinct, sorted), -1 where absent: one binary search
    each (the costly part of joining millions of ids), within its bucket where ``starts`` gives the
    packed keys' buckets (``bucket_starts``)."""
    out = np.full(len(keys), -1, dtype=np.int64)
    if not len(sorted_keys) or not len(keys):
        return out
    keys, ok = like(keys, sorted_keys)  # a query that cannot be a member is none
    s, q = _cmp(sorted_keys), _cmp(keys)
    at = np.searchsorted(s, q) if starts is None else search_buckets(s, q, starts, bucket_of(keys, starts))
    at[at == len(s)] = 0
    found = s[at] == q
    if ok is not None:
        found &= ok
    out[found] = at[found]
    return out


BUCKET_MIN_KEYS = 1 << 20  # from this many sorted content ids on, a lookup starts from the ids' first bits
BUCKET_KEYS = 8  # ids a bucket holds on average


def bucket_starts(sorted_keys: np.ndarray) -> np.ndarray | None:
    """For many sorted packed keys (content ids: hashes, spread evenly over their first bits), where
    each bucket of their first ``b`` bits starts (``2**b + 1`` positions; ``b`` such that a bucket
    holds about BUCKET_KEYS), else None. A binary search over ten million keys (160 MB) reads ~23
    of them from all over memory; within a bucket it reads ~4 (``search_buckets``)."""
    if len(sorted_keys) < BUCKET_MIN_KEYS or not is_packed(sorted_keys):
        return None
    return _starts(sorted_keys, _bucket_bits(len(sorted_keys)), lambda k, bits: _first_word(k) >> np.uint32(32 - bits))


def word_bucket_starts(sorted_words: np.ndarray) -> np.ndarray | None:
    """``bucket_starts`` for sorted uint64 hashes (their first bits)."""
    if len(sorted_words) < BUCKET_MIN_KEYS:
        return None
    return _starts(sorted_words, _bucket_bits(len(sorted_words)), lambda w, bits: w >> np.uint64(64 - bits))


def _bucket_bits(n: int) -> int:
    return min(31, max(1, int(np.log2(n / BUCKET_KEYS))))


def _starts(values: np.ndarray, bits: int, top: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """Where each bucket starts among sorted ``values``: the values before it, counted a block at
    a time (a bucket number per value, all at once, took 40 MB at ten million)."""
    counts = np.zeros(2**bits, np.int64)
    for lo in range(0, len(values), PACK_ROWS):
        counts += np.bincount(top(values[lo : lo + PACK_ROWS], bits).astype(np.int64), minlength=2**bits)
    starts = np.zeros(2**bits + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    return starts


def bucket_of(keys: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each packed key's bucket among ``starts`` (``bucket_starts``)."""
    return (_first_word(keys) >> np.uint32(32 - _bits_of(starts))).astype(np.int64)


def word_bucket_of(words: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each uint64 hash's bucket among ``starts`` (``word_bucket_starts``)."""
    return (words >> np.uint64(64 - _bits_of(starts))).astype(np.int64)


def _bits_of(starts: np.ndarray) -> int:
    return (len(starts) - 1).bit_length() - 1


def _first_word(keys: np.ndarray) -> np.ndarray:
    """Each packed key's first four bytes as a big-endian number (uint32): they sort as the keys do."""
    first = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), -1)[:, :4].copy()
    return first.view(">u4")[:, 0].astype(np.uint32)


def search_buckets(s: np.ndarray, q: np.ndarray, starts: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """``np.searchsorted(s, q)`` for values ``q`` whose buckets in ``s`` are ``bucket``: a binary
    search between the bucket's start and the next's (every value before it is smaller, every
    value after it larger), a step for all the queries at a time."""
    lo, hi = starts[bucket], starts[bucket + 1]
    last = len(s) - 1
    for _ in range(int((hi - lo).max(initial=0)).bit_length()):
        mid = (lo + hi) >> 1
        less = s[np.minimum(mid, last)] < q
        open_ = lo < hi
        lo = np.where(open_ & less, mid + 1, lo)
        hi = np.where(open_ & ~less, mid, hi)
    return np.asarray(lo, np.int64)


class KeyIndex:
    """ids -> their positions in the sequence it was built from (the first position of a repeated id),
    and each distinct id's rank (0 .. len-1, in key order): a bitmap indexed by rank marks ids
    (one byte an id, where a growing set costs tens)."""

    def __init__(self, ids: KeyLike) -> None:
        keys = keys_of(ids)
        self._pos: np.ndarray | None
        if distinct_ascending(keys):
            self._keys, self._pos = keys, None  # sorted and distinct already: a key's position is its rank
            return
        order = argsort_keys(keys)  # stable: a repeated id's first position comes first
        self._keys = keys[order]
        self._pos = order.astype(np.int64, copy=False)
        first = first_of_runs(self._keys)  # keep one entry per key, its first position
        if not first.all():
            self._keys, self._pos = self._keys[first], self._pos[first]

    def __len__(self) -> int:
        return len(self._keys)

    def ranks(self, ids: KeyLike) -> np.ndarray:
        """Each id's rank among the distinct ids (int64), -1 for an id that is not in it."""
        return _rank_in(self._keys, keys_of(ids), self._buckets())

    def _buckets(self) -> np.ndarray | None:
        if not hasattr(self, "_starts"):  # made at the first lookup: an index built and not searched costs nothing
            self._starts = bucket_starts(self._keys)
        return self._starts

    def positions(self, ids: KeyLike) -> np.ndarray:
        """Each id's position (int64), -1 for an id that is not in it."""
        r = self.ranks(ids)
        return np.where(r >= 0, self._pos[np.maximum(r, 0)], -1) if self._pos is not None and len(self._pos) else r

    def contains(self, ids: KeyLike) -> np.ndarray:
        """A bool array: whether each of ``ids`` is in it."""
        return self.ranks(ids) >= 0

    def keys(self) -> np.ndarray:
        """The distinct keys, sorted: ``keys()[rank]`` is the key of that rank."""
        return self._keys

    @property
    def order(self) -> np.ndarray:
        """Each rank's position (int64): ``order[rank]``, the sequence's ids in key order."""
        return np.arange(len(self._keys), dtype=np.int64) if self._pos is None else self._pos

    @property
    def in_order(self) -> bool:
        """Whether the sequence was sorted and distinct (each position is its rank)."""
        return self._pos is None


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
    return [k.decode("utf-8") for k in unpack(keys).tolist()]
