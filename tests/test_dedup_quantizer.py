"""The quantizer over the lists' centroids (``kinds.list_quantizer``) with three levels, shrunk: the
threshold is lowered so that a few hundred lists take the path ~60,000 (10M images) take. It must
find the lists a flat search finds, the planted near-copies, and come back whole from its file."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from synthetic import nearest_other
from test_dedup_fine import blobs_with_copies

from imgfeat.index import dedup, kinds
from imgfeat.index.files import write_faiss
from imgfeat.index.kinds import IndexParams, list_quantizer, two_level_centroids, two_level_index
from imgfeat.index.scratch import VectorStore

pytestmark = pytest.mark.quick

LISTS = 400  # lists of the shrunk index: 54 groups of ~7 centroids, in 7 groups of groups


def levels(index) -> list:
    """The IVF levels of a quantizer, outermost first, then the flat index at the bottom (views
    into ``index``: the caller keeps it)."""
    out = [faiss.downcast_index(index)]
    while isinstance(out[-1], faiss.IndexIVF):
        out.append(faiss.downcast_index(out[-1].quantizer))
    return out


def test_three_levels_from_the_threshold_each_a_partition_of_the_level_above(monkeypatch):
    X, _ = blobs_with_copies()
    C = two_level_centroids(X, LISTS, seed=0)
    quantizer = list_quantizer(C, seed=0)
    two = levels(quantizer)  # under THREE_LEVEL_LISTS: as before, sqrt(nlist) groups searched flat
    assert [type(q).__name__ for q in two] == ["IndexIVFFlat", "IndexFlatIP"]
    assert two[0].ntotal == len(C) and two[0].nlist == int(np.sqrt(len(C))) == two[1].ntotal
    monkeypatch.setattr(kinds, "THREE_LEVEL_LISTS", 64)
    quantizer = list_quantizer(C, seed=0)
    three = levels(quantizer)
    assert [type(q).__name__ for q in three] == ["IndexIVFFlat", "IndexIVFFlat", "IndexFlatIP"]
    groups = round(len(C) ** (2 / 3))
    assert (three[0].ntotal, three[0].nlist) == (len(C), groups)  # the lists' centroids, in ~nlist^(2/3) groups
    assert (three[1].ntotal, three[1].nlist) == (groups, int(np.sqrt(groups)))  # the groups', in groups of groups
    assert three[2].ntotal == three[1].nlist
    assert [q.nprobe for q in three[:2]] == [kinds.QUANTIZER_NPROBE, min(kinds.QUANTIZER_NPROBE, three[1].nlist)]
    for q in three[:2]:  # every entry in one list, each list holding some
        sizes = [q.invlists.list_size(i) for i in range(q.nlist)]
        assert sum(sizes) == q.ntotal and sum(s > 0 for s in sizes) >= 0.9 * q.nlist
    np.testing.assert_array_equal(three[0].reconstruct_n(0, len(C)), C)  # read back by list number
    # seeded: built again, it answers the same
    again = list_quantizer(C, seed=0)
    assert np.array_equal(again.search(X[:500], 3)[1], three[0].search(X[:500], 3)[1])


@pytest.mark.parametrize("probes", [kinds.QUANTIZER_NPROBE, 3])
def test_three_levels_find_the_list_a_flat_search_finds(monkeypatch, probes):
    """Most rows' nearest list, also when a few of the groups of groups are searched (3 of 7)."""
    X, _ = blobs_with_copies()
    C = two_level_centroids(X, LISTS, seed=0)
    exact = np.argmax(X @ C.T, axis=1)
    monkeypatch.setattr(kinds, "THREE_LEVEL_LISTS", 64)
    monkeypatch.setattr(kinds, "QUANTIZER_NPROBE", probes)
    q = list_quantizer(C, seed=0)
    mid = faiss.downcast_index(q.quantizer)
    assert mid.nprobe == min(probes, mid.nlist) and (probes > 3 or mid.nprobe < mid.nlist)
    agreement = np.mean(q.search(X, 1)[1][:, 0] == exact)
    assert agreement >= (0.99 if probes > 3 else 0.97), agreement


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_a_three_level_index_finds_every_copy_and_round_trips_through_its_file(monkeypatch, tmp_path, kind):
    X, src = blobs_with_copies()
    n = len(X)
    monkeypatch.setattr(kinds, "THREE_LEVEL_LISTS", 64)
    params = IndexParams(kind, nlist=LISTS, nprobe=8, seed=0, pq_m=16 if kind == "ivfpq" else None, pq_bits=8)
    index, built = two_level_index(params, X, n)
    index.add(X)
    assert len(levels(index.quantizer)) == 3 and index.nlist == built.lists == index.quantizer.ntotal
    copies = X[n - len(src) :]
    _, rows = index.search(copies, 5)
    assert np.mean([s in r for s, r in zip(src, rows)]) == 1.0  # every copy has its source among its 5 nearest
    path = tmp_path / "three.faiss"
    write_faiss(index, path)  # as an index file is written, and read (FAISS' own format: no pickles)
    back = faiss.read_index(str(path))
    assert [type(q).__name__ for q in levels(back.quantizer)] == ["IndexIVFFlat", "IndexIVFFlat", "IndexFlatIP"]
    assert [q.nprobe for q in levels(back.quantizer)[:2]] == [q.nprobe for q in levels(index.quantizer)[:2]]
    assert back.ntotal == n and back.nprobe == index.nprobe
    assert np.array_equal(back.search(copies, 5)[1], rows)


def test_dedup_finds_the_copies_through_three_levels_in_memory_and_over_a_store(tmp_path, monkeypatch):
    """The whole neighbour search, its sample in memory and streamed (``trained_index``' two paths)."""
    X, src = blobs_with_copies()
    n, dim = X.shape
    monkeypatch.setattr(dedup, "FINE_LISTS", 16)  # a few thousand rows take the ten-million-row path
    monkeypatch.setattr(dedup, "LIST_ROWS", 20)
    monkeypatch.setattr(kinds, "THREE_LEVEL_LISTS", 64)
    built, streamed = [], []
    real, real_streamed = dedup.two_level_index, dedup.streamed_two_level_centroids
    monkeypatch.setattr(dedup, "two_level_index", lambda *a: built.append(real(*a)) or built[-1])
    monkeypatch.setattr(
        dedup, "streamed_two_level_centroids", lambda *a, **k: streamed.append(1) or real_streamed(*a, **k)
    )
    copies = np.arange(n - len(src), n)
    mine = dedup.nearest_neighbours(X, 10, exact_max=10)
    with VectorStore(dim, tmp_path) as store:
        store.append(X)
        stored = dedup.nearest_neighbours(store, 10, exact_max=10, memory_budget=1 << 20)  # sample streamed
    assert streamed == [1] and len(built) == 2
    assert all(len(levels(index.quantizer)) == 3 and p.lists >= 64 for index, p in built)
    assert np.array_equal(nearest_other(mine.rows, mine.sims)[0][copies], src)
    assert np.array_equal(nearest_other(stored.rows, stored.sims)[0][copies], src)


@pytest.mark.parametrize("three", [False, True])
def test_rows_grouped_by_their_top_centroid_get_the_lists_the_quantizer_gives_them(monkeypatch, three):
    """The fill asks for each row's 12 nearest lists with the rows grouped by their top-level
    centroid (for the CPU's cache): each row still gets its own lists, in its own place."""
    X, _ = blobs_with_copies()
    C = two_level_centroids(X, LISTS, seed=0)
    if three:
        monkeypatch.setattr(kinds, "THREE_LEVEL_LISTS", 64)
    q = list_quantizer(C, seed=0)
    index = faiss.IndexIVFFlat(q, X.shape[1], len(C), faiss.METRIC_INNER_PRODUCT)
    top = dedup._top_level(index.quantizer)
    assert type(top).__name__ == "IndexFlatIP"
    assert top.ntotal == levels(q)[-1].ntotal and top.ntotal < len(C)
    rows = X[np.random.default_rng(0).permutation(len(X))[:3000]]  # unsorted, as a block of the store is
    got = dedup.nearest_lists(index, rows, 12)
    want = q.search(rows, 12)[1]
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert len(np.unique(got[:, 0])) > 50  # many lists: the grouping had something to reorder
    flat = faiss.IndexIVFFlat(faiss.IndexFlatIP(X.shape[1]), X.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    flat.train(X)
    assert dedup._top_level(flat.quantizer) is None  # a flat quantizer: searched as it is
    assert np.array_equal(dedup.nearest_lists(flat, rows, 4), flat.quantizer.search(rows, 4)[1])
