"""Dedup's search at millions of images, shrunk: lists proportional to the images, found through a
two-level quantizer (``kinds.two_level_index``), in memory and over a vector store, find the planted
near-copies the exact search finds. The thresholds are lowered so that a few thousand rows take
the path a million would."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import nearest_other

from imgfeat.index import dedup
from imgfeat.index.kinds import (
    MIN_POINTS_PER_LIST,
    IndexParams,
    streamed_two_level_centroids,
    two_level_centroids,
    two_level_index,
)
from imgfeat.index.scratch import VectorStore

pytestmark = pytest.mark.quick


def blobs_with_copies(n: int = 4000, dim: int = 32, copies: int = 200, seed: int = 0):
    """Unit rows around 40 centres (neighbours share lists, as photos of a kind do) and near-copies
    (cosine ~0.99) of ``copies`` of them appended; returns ``(X, source of each copy)``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    X = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    src = rng.choice(n, copies, replace=False)
    X = np.concatenate([X, X[src] + 0.05 * rng.standard_normal((copies, dim)).astype(np.float32)])
    return X / np.linalg.norm(X, axis=1, keepdims=True), src


def test_two_level_centroids_are_seeded_unit_rows_spread_over_the_data():
    X, _ = blobs_with_copies()
    C = two_level_centroids(X, 200, seed=3)
    assert 180 <= len(C) <= 200 and C.shape[1] == X.shape[1]
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(C, two_level_centroids(X, 200, seed=3))  # a rerun trains the same lists
    # every row has a centroid close to it (no region of the data left without a list)
    assert float((X @ C.T).max(axis=1).min()) > 0.5
    assert len(two_level_centroids(X[:50], 200, seed=0)) == 50  # fewer rows than lists: the rows


def test_streamed_centroids_do_not_depend_on_how_the_sample_is_spilled_or_read(tmp_path):
    """Past the budget the fine sample goes through scratch stores: the lists are the same whether it
    stays in one or is spread over several, and whether the rows are read in big blocks or small
    (while no cluster is larger than a store: see the next test)."""
    X, _ = blobs_with_copies()
    n, dim = X.shape
    made = []

    def spill():
        made.append(VectorStore(dim, tmp_path))
        return made[-1]

    def streamed(Y, spill_bytes, block):
        return streamed_two_level_centroids(Y, 60, seed=3, block_rows=block, spill_bytes=spill_bytes, spill=spill)

    C, trained_on = streamed(X, 1 << 30, 10**6)
    assert len(made) == 1 and trained_on == MIN_POINTS_PER_LIST * 60 < n  # a sample, not every row
    assert 54 <= len(C) <= 60 and C.shape[1] == dim
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)
    # every row has a list near it, about as near as lists trained in memory on every row put one
    near, near_in_memory = (X @ C.T).max(axis=1), (X @ two_level_centroids(X, 60, seed=3).T).max(axis=1)
    assert near.min() > 0.4 and near.mean() >= near_in_memory.mean() - 0.02
    with VectorStore(dim, tmp_path) as store:
        store.append(X)
        for spill_bytes, block in ((1 << 30, 10**6), (100_000, 333), (100_000, 1000)):
            made.clear()
            again, _ = streamed(store, spill_bytes, block)
            assert np.array_equal(C, again)
            assert len(made) == -(-trained_on * dim * 4 // spill_bytes)  # the sample spread over this many
            assert all(m._file.closed for m in made)  # every scratch store closed (its file had no name)


def skewed(n: int = 6000, dim: int = 32, seed: int = 1) -> np.ndarray:
    """Unit rows of which nine in ten are one kind of picture shot alike (one tight region), the rest spread."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(dim).astype(np.float32)
    big = centre + 0.15 * rng.standard_normal((n * 9 // 10, dim)).astype(np.float32)
    X = np.concatenate([big, rng.standard_normal((n - len(big), dim)).astype(np.float32)])
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_a_dominant_cluster_neither_fills_one_store_nor_takes_one_huge_kmeans(tmp_path, monkeypatch):
    """A collection where one kind of photo is most of the rows: no scratch store read back holds
    much over the budget's rows (a cluster larger than that keeps only that many), and the big
    cluster's many lists are found two-level in turn, no k-means asked for more than
    CELL_MAX_LISTS centroids, while every row still has a list near it."""
    from imgfeat.index import kinds

    X = skewed()
    n, dim = X.shape
    monkeypatch.setattr(kinds, "CELL_MAX_LISTS", 12)
    asked: list[int] = []
    real_kmeans = kinds._spherical_kmeans
    monkeypatch.setattr(kinds, "_spherical_kmeans", lambda rows, k, *a: asked.append(k) or real_kmeans(rows, k, *a))
    made: list[VectorStore] = []

    def spill():
        made.append(VectorStore(dim, tmp_path))
        return made[-1]

    spill_bytes = 300 * dim * 4  # room for 300 rows a store; the sample is 39 * 100 = 3,900 rows
    C, trained_on = streamed_two_level_centroids(X, 100, seed=3, block_rows=500, spill_bytes=spill_bytes, spill=spill)
    held = [len(m) for m in made]
    assert max(held) <= 2 * 300 and sum(held) == trained_on  # each store about the room, never twice it
    assert trained_on < MIN_POINTS_PER_LIST * 100  # the big cluster kept only a store's worth of its rows
    assert 90 <= len(C) <= 100 and max(asked) <= 12  # coarse: 10 clusters; no cell k-means over 12
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)
    # in memory, the same split: the big cluster's share is found two-level, not by one k-means
    asked.clear()
    C2 = two_level_centroids(X, 100, seed=3)
    assert 90 <= len(C2) <= 100 and max(asked) <= 12
    # rows are about as near a list as with the whole sample in memory, the big cluster's closely
    near, near_in_memory = (X @ C.T).max(axis=1), (X @ C2.T).max(axis=1)
    assert near.mean() >= near_in_memory.mean() - 0.02 and near[: n * 9 // 10].mean() > 0.85


def test_rows_that_do_not_split_take_one_kmeans_not_endless_levels():
    X = np.tile(skewed(n=10)[:1], (400, 1))  # 400 copies of one row
    C = two_level_centroids(X, 100, seed=0)
    assert 1 <= len(C) <= 100 and np.allclose(C @ X[0], 1.0, atol=1e-4)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_a_two_level_index_finds_what_a_flat_quantizer_finds(kind):
    X, src = blobs_with_copies()
    n = len(X)
    params = IndexParams(kind, nlist=100, nprobe=8, seed=0, pq_m=16 if kind == "ivfpq" else None, pq_bits=8)
    index, built = two_level_index(params, X, n)
    index.add(X)
    assert built.trained_on == n and 90 <= built.lists <= 100 and index.nprobe == 8 and index.ntotal == n
    _, rows = index.search(X[n - len(src) :], 5)
    found = np.mean([s in r for s, r in zip(src, rows)])
    assert found >= 0.99, found


def test_the_fine_search_finds_the_copies_in_memory_and_over_a_store_alike(tmp_path, monkeypatch):
    X, src = blobs_with_copies()
    n, dim = X.shape
    monkeypatch.setattr(dedup, "FINE_LISTS", 16)  # a few thousand rows take the million-row path
    monkeypatch.setattr(dedup, "LIST_ROWS", 20)
    built, streamed = [], []
    real, real_streamed = dedup.two_level_index, dedup.streamed_two_level_centroids
    monkeypatch.setattr(dedup, "two_level_index", lambda *a: built.append(a[0]) or real(*a))
    monkeypatch.setattr(
        dedup, "streamed_two_level_centroids", lambda *a, **k: streamed.append(1) or real_streamed(*a, **k)
    )
    exact = dedup.nearest_neighbours(X, 10, exact_max=10**6)
    for budget in (None, 1 << 20):  # ivf over the vectors; ivfpq codes (the budget's quarter is too small)
        mine = dedup.nearest_neighbours(X, 10, exact_max=10, memory_budget=budget)
        with VectorStore(dim, tmp_path) as store:
            store.append(X)
            stored = dedup.nearest_neighbours(store, 10, exact_max=10, memory_budget=budget or 1 << 30)
        assert mine.kind == stored.kind == ("ivf" if budget is None else "ivfpq")
        assert np.array_equal(mine.rows, stored.rows)
        np.testing.assert_allclose(mine.sims, stored.sims, atol=1e-6)
        copies = np.arange(n - len(src), n)
        (near, sim), (near_exact, sim_exact) = (
            nearest_other(mine.rows, mine.sims),
            nearest_other(exact.rows, exact.sims),
        )
        assert np.array_equal(near[copies], near_exact[copies])  # each copy's nearest: its source
        assert np.array_equal(near[copies], src)
        np.testing.assert_allclose(sim[copies], sim_exact[copies], atol=1e-6)  # exact cosines
        top = [[r for r in rows if r >= 0][:5] for rows in mine.rows]
        recall = np.mean([len(set(a) & set(b[b >= 0][:5])) / len(a) for a, b in zip(top, exact.rows)])
        assert recall >= 0.8, recall  # the other neighbours too, mostly
    assert len(built) == 4 and all(p.lists >= 16 and p.nprobe == dedup.FINE_NPROBE for p in built)
    # under the small budget the training sample (39 rows a list) did not fit its share: streamed, both times
    assert len(streamed) == 2
