"""Compact id keys (core/keys.py): the same answers as Python sets and dicts, on any ids."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from imgfeat.core.keys import PACKED, KeyIndex, KeySet, as_strings, keys_of

pytestmark = pytest.mark.quick


def _ids(rng: np.random.Generator, n: int) -> list[str]:
    return [f"{v:032x}" for v in rng.integers(0, 2**62, size=n)]


def test_keys_of_reads_arrow_columns_sliced_chunked_and_uneven() -> None:
    ids = ["a" * 32, "b" * 32, "c" * 32, "d" * 32]
    arr = pa.array(ids)
    assert as_strings(keys_of(arr)) == ids
    assert as_strings(keys_of(arr.slice(1, 2))) == ["b" * 32, "c" * 32]
    assert as_strings(keys_of(pa.chunked_array([arr.slice(0, 1), arr.slice(2)]))) == [ids[0], *ids[2:]]
    uneven = ["é", "xyz", "ab"]  # not one width: through Python strings, UTF-8 bytes
    assert keys_of(pa.array(uneven)).tolist() == [u.encode() for u in uneven]
    assert keys_of(uneven).tolist() == [u.encode() for u in uneven]
    assert len(keys_of(pa.array([], pa.string()))) == 0
    with pytest.raises(ValueError):
        keys_of(pa.array(["a", None]))


def test_keyset_matches_a_python_set_when_grown_in_batches() -> None:
    rng = np.random.default_rng(0)
    pool = _ids(rng, 5000)
    members: set[str] = set()
    ks = KeySet()
    for _ in range(40):  # batches with repeats within and across them
        batch = [pool[k] for k in rng.integers(0, len(pool), size=int(rng.integers(1, 300)))]
        ks.add(pa.array(batch))
        members.update(batch)
        assert len(ks) == len(members)
    assert ks.contains(pool).tolist() == [p in members for p in pool]
    assert as_strings(ks.keys()) == sorted(members)


def test_keyset_compares_ids_of_other_widths_exactly() -> None:
    ks = KeySet(["abc", "abcd"])
    assert ks.contains(["ab", "abc", "abcd", "abcde", "abce"]).tolist() == [False, True, True, False, False]
    assert KeySet(["ab"]).contains(["abc", "ab"]).tolist() == [False, True]


def test_keyindex_gives_first_positions_and_minus_one_for_strangers() -> None:
    rng = np.random.default_rng(1)
    ids = _ids(rng, 1000)
    seq = ids + ids[:10]  # repeated ids: their first position
    index = KeyIndex(pa.array(seq))
    queries = [*ids[::7], "f" * 32, "short"]
    want = [ids.index(q) if q in ids else -1 for q in queries]
    assert index.positions(queries).tolist() == want
    assert len(index) == len(ids)


def test_keyindex_ranks_are_dense_and_contains_agrees() -> None:
    ids = ["d", "b", "a", "b", "c"]
    index = KeyIndex(ids)
    assert len(index) == 4
    assert index.ranks(["a", "b", "c", "d", "e"]).tolist() == [0, 1, 2, 3, -1]
    assert index.positions(["b", "c", "zz"]).tolist() == [1, 4, -1]
    assert index.contains(["c", "x"]).tolist() == [True, False]
    assert KeyIndex(["a", "b", "c"]).positions(["c", "a"]).tolist() == [2, 0]  # sorted input: its own order
    assert KeyIndex([]).positions(["a"]).tolist() == [-1]


def test_keys_go_back_to_arrow_strings_and_sorted_unique_is_np_unique() -> None:
    from imgfeat.core.keys import keys_to_arrow, sorted_unique

    rng = np.random.default_rng(2)
    ids = _ids(rng, 300)
    keys = keys_of(pa.array(ids))
    back = keys_to_arrow(keys[::3])
    assert back.type == pa.string() and back.to_pylist() == ids[::3]
    assert keys_to_arrow(keys_of(["a", "bcd", "é"])).to_pylist() == ["a", "bcd", "é"]
    assert keys_to_arrow(keys[:0]).to_pylist() == []
    repeated = np.concatenate([keys, keys[:50]])
    assert as_strings(sorted_unique(repeated)) == sorted(set(ids))
    assert len(repeated) == 350  # not sorted in place unless owned


def test_content_ids_pack_to_16_bytes_in_their_order_and_mix_with_other_ids() -> None:
    """Content ids (32 lowercase hex digits) take 16 bytes a key, sort as their strings do, and
    a set or index of them answers queries of any other ids (and the other way round) exactly."""
    rng = np.random.default_rng(3)
    ids = [*_ids(rng, 2000), "0" * 32, "f" * 32, "00" * 15 + "0f", "10" + "0" * 30]  # NUL bytes once packed
    keys = keys_of(pa.array(ids))
    assert keys.dtype == PACKED and keys.nbytes == 16 * len(ids)
    assert keys_of(ids).dtype == PACKED and as_strings(keys_of(ids)) == ids
    assert as_strings(KeyIndex(keys).keys()) == sorted(ids)  # the packed order is the strings' order
    not_content = ["F" * 32, "g" * 32, "a" * 31, "a" * 33, "x", "é" * 16]  # upper case, not hex, other lengths
    for other in not_content:
        assert keys_of([other, ids[0]]).dtype != PACKED  # one id that is no content id: plain keys
    index = KeyIndex(keys)
    assert index.positions([*ids[::-50], *not_content]).tolist() == [*range(len(ids) - 1, -1, -50), *[-1] * 6]
    plain = KeyIndex([*not_content, *ids])  # the same ids among others: plain keys, queried packed
    assert plain.keys().dtype != PACKED
    assert plain.positions(keys[:5]).tolist() == [6, 7, 8, 9, 10]
    grown = KeySet(ids[:10])
    grown.add(not_content)
    grown.add(keys[5:20])
    assert len(grown) == 26 and grown.contains(keys[:30]).sum() == 20
    assert set(as_strings(grown.keys())) == {*ids[:20], *not_content}


def test_release_freed_memory_hands_pages_back_and_is_safe_to_repeat() -> None:
    """glibc keeps freed small blocks in its heap; malloc_trim returns them (RSS does not grow)."""
    from imgfeat.core.sizes import release_freed_memory

    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    junk = [bytearray(4000) for _ in range(50_000)]  # ~200 MB of small heap blocks, then freed
    del junk[::2]
    before = rss_kib()
    del junk
    release_freed_memory()
    release_freed_memory()
    assert rss_kib() < before


def test_filled_keys_are_the_batches_in_order_whatever_their_shapes() -> None:
    from imgfeat.core.keys import filled

    rng = np.random.default_rng(4)
    ids = _ids(rng, 500)
    batches = [pa.array(ids[:200]), pa.array(ids[200:300]), ["odd", *ids[300:400]], pa.array(ids[400:])]
    want = [*ids[:300], "odd", *ids[300:]]
    assert as_strings(filled(batches, len(want))) == want  # packed, then plain from the odd id on
    assert as_strings(filled(batches, 10)) == want  # more than promised: grown
    assert filled([pa.array(ids)], len(ids)).dtype == PACKED
    assert len(filled([], 5)) == 0


@pytest.mark.parametrize("crowded", [False, True])
def test_lookups_from_the_ids_first_bits_find_what_a_binary_search_finds(monkeypatch, crowded) -> None:
    """Millions of content ids are searched within the bucket of their first bits: the same ranks
    as one binary search over all, for members, strangers, ids before the first and after the last,
    and buckets far fuller than the average (ids that share their first bytes)."""
    import imgfeat.core.keys as K

    monkeypatch.setattr(K, "BUCKET_MIN_KEYS", 1000)
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (20_000, 16), dtype=np.uint8)
    if crowded:
        raw[:3000, :5] = raw[0, :5]  # 3,000 ids in one bucket
        raw[3000:3010, :16] = raw[3000]  # a repeated id
    ids = ["".join(f"{b:02x}" for b in row) for row in raw.tolist()]
    index = KeyIndex(ids[:15_000])
    starts = K.bucket_starts(index.keys())
    assert starts is not None and starts[0] == 0 and starts[-1] == len(index) and np.all(np.diff(starts) >= 0)
    queries = [*ids, "0" * 32, "f" * 32, "not-a-content-id"]
    want = K._rank_in(index.keys(), keys_of(queries))  # no buckets
    got = index.ranks(queries)
    assert np.array_equal(got, want)
    assert (got[:15_000] >= 0).all() and (got[15_010:20_000] == -1).all()  # members found, strangers not
    assert np.array_equal(index.positions(ids[:100]), np.arange(100))
    assert index.contains(queries).tolist() == (want >= 0).tolist()
    assert K.bucket_starts(index.keys()[:999]) is None  # few ids: one binary search
