"""Dedup's bounded-memory pieces: the scratch look store, the looks cache written and read a row group
at a time (and the older float16-list cache still read), candidate pairs gathered by ranges of scratch files,
written in batches and read back a row group at a time, nearest group members by blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgfeat.core import schemas as S
from imgfeat.core.keys import as_strings, keys_of
from imgfeat.index import dedup
from imgfeat.index.looks import LOOK_VERSION, SIDE, VARIANTS, LookStore, look_similarity

pytestmark = pytest.mark.quick


def _looks(n: int, seed: int = 0) -> np.ndarray:
    L = np.random.default_rng(seed).standard_normal((n, VARIANTS, SIDE * SIDE)).astype(np.float32)
    return (L / np.linalg.norm(L, axis=2, keepdims=True)).astype(np.float16)


def test_the_store_gives_each_node_its_look_as_a_matrix_would(tmp_path):
    L = _looks(7)
    store = LookStore(5, tmp_path)
    store.append(["x", "y"], L[:2], [3, -1])  # y: a cached image no longer in the dataset
    store.append(["a", "b", "c"], L[2:5], [0, 4, 1])
    assert as_strings(store.ids()) == ["x", "y", "a", "b", "c"] and store.ok.tolist() == [True, True, False, True, True]
    M = np.zeros((5, VARIANTS, SIDE * SIDE), np.float16)
    M[[3, 0, 4, 1]] = L[[0, 2, 3, 4]]
    nodes = np.array([0, 1, 3, 4, 0])
    assert np.array_equal(store[nodes], M[nodes])
    a, b = np.array([0, 1, 3, 0]), np.array([4, 3, 4, 1])
    for got, want in zip(look_similarity(store, a, b), look_similarity(M, a, b)):
        assert np.array_equal(got, want)
    blocks = list(store.blocks(2))
    assert [ids.to_pylist() for ids, _ in blocks] == [["x", "y"], ["a", "b"], ["c"]]
    assert np.array_equal(np.concatenate([x for _, x in blocks]), L[:5])
    assert list(tmp_path.iterdir()) == []  # the scratch file has no name: a crash leaves nothing
    store.clear()
    assert len(store) == 0 and not store.ok.any() and store[np.zeros(0, np.int64)].shape == (0, VARIANTS, SIDE * SIDE)
    store.close()


def test_the_looks_cache_round_trips_a_row_group_at_a_time_and_old_caches_still_read(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "CACHE_ROWS", 3)
    L = _looks(8, seed=1)
    ids = [f"id{k}" for k in range(8)]
    store = LookStore(8, tmp_path)
    store.append(ids, L, np.arange(8))
    path = tmp_path / "looks.parquet"
    dedup._write_looks(store, path)
    assert pq.ParquetFile(path).num_row_groups == 3
    node = keys_of(["id5", "id1", "new"])  # every image's id: node k is node[k]
    again = LookStore(3, tmp_path)
    dedup._read_looks(path, again, dedup.NodeOf(node))
    assert as_strings(again.ids()) == ids and again.ok.tolist() == [True, True, False]
    assert np.array_equal(again[np.array([0, 1])], L[[5, 1]])

    old = tmp_path / "old.parquet"  # the layout before: each look a list of float16
    col = pa.FixedSizeListArray.from_arrays(pa.array(L.reshape(-1), pa.float16()), VARIANTS * SIDE * SIDE)
    pq.write_table(pa.table({S.IMAGE_ID: ids, "look": col}, metadata={"look_version": LOOK_VERSION}), old)
    was = LookStore(3, tmp_path)
    dedup._read_looks(old, was, dedup.NodeOf(node))
    assert np.array_equal(was[np.array([0, 1])], L[[5, 1]])

    path.write_bytes(b"PAR1 not really")  # damaged: nothing, and the looks are computed again
    bad = LookStore(3, tmp_path)
    bad.append(["id0"], L[:1], [0])
    dedup._read_looks(path, bad, dedup.NodeOf(node))
    assert len(bad) == 0 and not bad.ok.any()


def test_candidate_pairs_are_written_in_batches_and_read_back_a_row_group_at_a_time(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(dedup, "PAIRS_BATCH", 4)
    monkeypatch.setattr(dedup, "PAIR_CHUNK", 3)  # the pairs read back go to several ranges
    ids = [f"id{k}" for k in range(6)]
    im = dedup.images_of(ids, np.zeros((6, 2), np.float32), ids, ids, [None] * 6)
    a, b = np.array([0, 0, 1, 2, 2, 3, 4, 4, 5]), np.array([1, 2, 3, 3, 5, 4, 5, 1, 0])
    sim = np.linspace(0.1, 0.9, len(a)).astype(np.float32)
    dedup._write_pairs(tmp_path, im, dedup.Graph(a, b, sim))
    assert pq.ParquetFile(tmp_path / dedup.PAIRS_FILE).num_row_groups == 3
    want = sorted((min(x, y), max(x, y), s) for x, y, s in zip(a.tolist(), b.tolist(), sim.tolist()))

    cache = pq.read_table(tmp_path / dedup.PAIRS_FILE)
    assert cache.schema.field("a").type == pa.int32()  # node numbers: rows of the searched images' list

    def read(known: list[str]) -> tuple[list[int], list[tuple[int, int, float]]]:
        found = dedup._last_search(tmp_path, dedup.NodeOf(pa.array(known)), len(known))
        assert found is not None
        new, now, token = found
        cached = dedup._cached_pairs(tmp_path, now, token, len(known), 0)
        assert cached is not None
        with cached:
            g = cached.graph()
        return new.tolist(), list(zip(g.a.tolist(), g.b.tolist(), g.sim.tolist()))

    assert read(ids) == ([], want)
    # id0 has left and id9 arrived: id0's pairs are dropped, id9 is new
    assert read(["id9", *ids[1:]]) == ([0], [p for p in want if 0 not in p[:2]])
    # the images in another order (a rescan, features re-extracted): the pairs follow their ids
    moved = [ids[k] for k in (3, 5, 0, 1, 4, 2)]
    again = {(min(moved.index(ids[a]), moved.index(ids[b])), max(moved.index(ids[a]), moved.index(ids[b])), s)
             for a, b, s in want}  # fmt: skip
    new, got = read(moved)
    assert new == [] and set(got) == again

    found = dedup._last_search(tmp_path, dedup.NodeOf(pa.array(ids)), 6)
    assert found is not None
    searched = pq.read_table(tmp_path / dedup.SEARCHED_FILE)
    dedup._write_pairs(tmp_path / "other", im, dedup.Graph(a[:2], b[:2], sim[:2]))  # another run's files
    (tmp_path / dedup.PAIRS_FILE).write_bytes((tmp_path / "other" / dedup.PAIRS_FILE).read_bytes())
    assert dedup._cached_pairs(tmp_path, found[1], found[2], 6, 0) is None  # not of this list: not joined
    (tmp_path / dedup.PAIRS_FILE).write_bytes(b"PAR1 not really")  # damaged: every image is searched
    assert dedup._cached_pairs(tmp_path, found[1], found[2], 6, 0) is None
    pq.write_table(searched.replace_schema_metadata(None), tmp_path / dedup.SEARCHED_FILE)  # an older run's list
    assert dedup._last_search(tmp_path, dedup.NodeOf(pa.array(ids)), 6) is None
    (tmp_path / dedup.SEARCHED_FILE).unlink()
    assert dedup._last_search(tmp_path, dedup.NodeOf(pa.array(ids)), 6) is None


@pytest.mark.parametrize("chunk", [1_000_000, 1, 5])  # one range, a range per listing, a few listings a range
def test_pair_ranges_keep_each_pair_once_with_its_first_listing_in_pair_order(tmp_path, chunk, monkeypatch):
    monkeypatch.setattr(dedup, "PAIR_CHUNK", chunk)
    rng = np.random.default_rng(7)
    listed = [(rng.integers(0, 30, 40), rng.integers(0, 30, 40), rng.random(40).astype(np.float32)) for _ in range(5)]
    want: dict[tuple[int, int], float] = {}
    for a, b, s in listed:
        for x, y, v in zip(a.tolist(), b.tolist(), s.tolist()):
            want.setdefault((min(x, y), max(x, y)), v)
    with dedup.PairRanges(30, 200, tmp_path) as pairs:
        for a, b, s in listed:
            pairs.add(a, b, s)
        for _ in range(2):  # read twice: the second time from the reduced files
            parts = list(pairs.chunks())
            g = dedup.concat_graphs(parts)
            got = {(x, y): v for x, y, v in zip(g.a.tolist(), g.b.tolist(), g.sim.tolist())}
            assert got == want and list(got) == sorted(want)
        assert len(parts) == min(30, 200 // chunk + 1)
        with pytest.raises(RuntimeError):
            pairs.add(np.array([1]), np.array([2]), np.array([0.5], np.float32))
    assert list(tmp_path.iterdir()) == []  # scratch files have no name


@pytest.mark.parametrize("clash, buckets", [(False, False), (True, False), (False, True)])
def test_ids_map_to_their_nodes_as_a_key_index_maps_them(monkeypatch, clash, buckets):
    import imgfeat.core.keys as K

    if clash:  # every id folds alike: the key index answers
        monkeypatch.setattr(dedup, "_fold", lambda keys: np.zeros(len(keys), np.uint64))
    if buckets:  # as for millions of ids: searched within the bucket of their folded first bits
        monkeypatch.setattr(K, "BUCKET_MIN_KEYS", 2)
        rng = np.random.default_rng(5)
        many = [f"{v:032x}" for v in rng.integers(0, 2**62, 5000)]
        node = dedup.NodeOf(pa.array(many))
        assert node._starts is not None
        asked = [*many[::-1], *(f"{v:032x}" for v in rng.integers(0, 2**62, 500)), "not-an-id"]
        assert node.positions(pa.array(asked)).tolist() == [*range(4999, -1, -1), *[-1] * 501]
    ids = ["b", "a2", "c33", "a", "ddd4"]
    node = dedup.NodeOf(pa.array(ids))
    asked = ["a", "zz", "ddd4", "b", "a22", "c33", "ddd44", "", "a2"]
    assert node.positions(pa.array(asked)).tolist() == [3, -1, 4, 0, -1, 2, -1, -1, 1]
    assert node.positions(pa.chunked_array([["ddd4", "longer-than-all"], ["c33"]])).tolist() == [4, -1, 2]


def test_new_images_ranked_a_few_at_a_time_get_the_neighbours_ranked_all_at_once(monkeypatch):
    rng = np.random.default_rng(11)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    X[150:200] = X[100:150]  # exact copies: equal similarities, ties to break alike
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    new = np.array([0, 5, 101, 120, 160, 299, 42], np.int64)
    monkeypatch.setattr(dedup, "BLOCK_ROWS", 64)
    want = dedup._top_k_blocked(X, new, 6)
    monkeypatch.setattr(dedup, "SELECT_ROWS", 2)
    got = dedup._top_k_blocked(X, new, 6)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_nearest_members_by_blocks_equal_the_per_node_search(monkeypatch):
    monkeypatch.setattr(dedup, "MEMBER_BLOCK", 7)  # a few nodes a product
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    comp = rng.integers(0, 4, 40)
    members = {c: [int(u) for u in np.flatnonzero(comp == c)[::2]] for c in (0, 1, 3)}
    nodes = [int(u) for u in rng.permutation(40)[:25]] + [5, 5]
    got = dedup.nearest_members(X, comp, members, nodes)
    want = {}
    for u in nodes:
        m = members.get(int(comp[u]))
        if m:
            sims = X[m] @ X[u]
            want[u] = (m[int(np.argmax(sims))], float(sims.max()))
    assert got.keys() == want.keys()
    for u, (b, s) in want.items():
        assert got[u][0] == b and got[u][1] == pytest.approx(s, abs=1e-5)


def test_components_label_paired_images_together_and_every_other_image_alone():
    rng = np.random.default_rng(9)
    n = 2000
    a = rng.integers(0, n, 300)
    b = rng.integers(0, n, 300)
    comp = dedup.components(n, dedup.Graph(a, b, np.ones(300, np.float32)))
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, want = connected_components(coo_matrix((np.ones(300), (a, b)), shape=(n, n)), directed=False)
    # the same partition: two nodes share a label exactly when scipy over all nodes gives them one
    pairs = rng.integers(0, n, (20_000, 2))
    pairs = np.concatenate([pairs, np.stack([a, b], axis=1)])
    assert np.array_equal(comp[pairs[:, 0]] == comp[pairs[:, 1]], want[pairs[:, 0]] == want[pairs[:, 1]])
    assert len(np.unique(np.asarray(comp))) == len(np.unique(want))
    assert np.array_equal(comp.paired, np.unique(np.concatenate([a, b])))  # a label kept for paired nodes only
    assert np.array_equal(
        dedup.components(5, dedup.Graph(*(np.zeros(0, np.int64),) * 2, np.zeros(0, np.float32))), np.arange(5)
    )
    assert (
        len(dedup.components(0, dedup.Graph(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))))
        == 0
    )


@pytest.mark.parametrize("scan", [1, 7, 1 << 20])
def test_the_nth_readable_image_is_counted_a_block_at_a_time(monkeypatch, scan):
    monkeypatch.setattr(dedup, "GROUP_SCAN", scan)
    mask = np.random.default_rng(4).random(500) < 0.3
    ranks = np.random.default_rng(5).permutation(int(mask.sum()))[:40]
    assert np.array_equal(dedup._nth_true(mask, ranks), np.flatnonzero(mask)[ranks])


def test_a_sample_of_rows_holds_only_its_rows_not_the_permutation_it_was_cut_from():
    from imgfeat.index.kinds import sample_rows

    rows = sample_rows(100_000, 50, seed=3)
    assert len(rows) == 50 and np.all(np.diff(rows) > 0) and rows.max() < 100_000
    assert rows.base is None or rows.base.nbytes == rows.nbytes  # (a view of all 100,000 held 800 KB)
    assert np.array_equal(rows, sample_rows(100_000, 50, seed=3))
