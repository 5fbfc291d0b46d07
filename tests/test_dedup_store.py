"""Dedup over vectors that do not fit the memory budget: the scratch vector store gives back the rows
written, the blocked reduction and rescoring equal the in-memory ones, the search over a store finds
what the search in memory finds, and a run under a tiny budget writes the tables a large one does."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic import fake_image_id, write_featureset
from test_dedup import planted

from imgfeat.core import schemas as S
from imgfeat.index import dedup
from imgfeat.index.kinds import reduce_dims, rescore
from imgfeat.index.scratch import VectorStore, reduce_store, rescore_block, similarities_to
from imgfeat.scan.manifest import write_manifest

pytestmark = pytest.mark.quick


def _rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_the_store_gives_back_the_rows_written_as_a_matrix_would(tmp_path):
    X = _rows(50, 6)
    store = VectorStore(6, tmp_path)
    for lo in range(0, 50, 7):
        store.append(X[lo : lo + 7])
    with store:
        assert len(store) == 50 and store.shape == (50, 6)
        assert list(tmp_path.iterdir()) == []  # no name: a crash leaves nothing
        assert np.array_equal(store[:], X) and np.array_equal(store[10:13], X[10:13])
        assert np.array_equal(store[45:99], X[45:]) and store[60:70].shape == (0, 6)
        rows = np.array([[3, 4, 5], [49, 0, 3]])  # repeated, unsorted, 2-d
        assert np.array_equal(store[rows], X[rows]) and np.array_equal(store[[-1, 2]], X[[-1, 2]])
        assert np.array_equal(store[7], X[7]) and np.array_equal(store[::5], X[::5])
        assert np.array_equal(np.concatenate([b for _, b in store.blocks(16)]), X)
        assert [lo for lo, _ in store.blocks(16)] == [0, 16, 32, 48]
        np.testing.assert_allclose(similarities_to(store, X[4], 8), X @ X[4], atol=1e-6)
        with pytest.raises(IndexError):
            store[np.array([50])]


def test_blocked_rescoring_and_reduction_equal_the_in_memory_ones(tmp_path):
    X = _rows(300, 40, seed=1)
    rows = np.random.default_rng(2).integers(-1, 300, (300, 6))
    want_s, want_r = rescore(X, rows)
    with VectorStore(40, tmp_path) as store:
        store.append(X)
        for lo in range(0, 300, 64):
            s, r = rescore_block(X[lo : lo + 64], store, rows[lo : lo + 64])
            assert np.array_equal(r, want_r[lo : lo + 64]) and np.array_equal(s, want_s[lo : lo + 64])
        with reduce_store(store, 8, 64, tmp_path) as Y:
            np.testing.assert_allclose(Y[:], reduce_dims(X, 8), atol=1e-5)


@pytest.mark.parametrize("exact_max, dim", [(10, 272), (10, 64)])
def test_the_search_over_a_store_finds_the_neighbours_the_search_in_memory_finds(tmp_path, monkeypatch, exact_max, dim):
    monkeypatch.setattr(dedup, "QUERY_ROWS", 100)  # rescoring steps (23 rows) that do not divide a query block
    X, _ = planted(n=400, dim=dim)
    want = dedup.nearest_neighbours(X, 10, exact_max=exact_max)
    with VectorStore(dim, tmp_path) as store:
        store.append(X)
        got = dedup.nearest_neighbours(store, 10, exact_max=exact_max, memory_budget=1 << 20)  # ivf, blocks of 256 rows
    assert got.kind == want.kind == "ivf"
    assert np.array_equal(got.rows, want.rows)
    np.testing.assert_allclose(got.sims, want.sims, atol=1e-6)


def test_a_tiny_memory_budget_stores_the_vectors_and_finds_the_same_groups(ws, monkeypatch):
    X, copies = planted(n=400, dim=272)
    ids = [fake_image_id("d", k) for k in range(len(X))]
    write_featureset(ws, "fs", ids, X, dtype="float32")
    n = len(X) - len(copies)
    rows = [
        {"image_id": i, "path": f"img/{k:03d}.png", "split": "test" if k >= n else "train", "status": "ok"}
        for k, i in enumerate(ids)
    ]
    rows.append({"image_id": ids[3], "path": "img/copy-of-003.png", "split": "train", "status": "ok"})
    write_manifest(ws, "d", rows, ws.root / "images")
    stored = []
    real = dedup._ids_in_node_order
    monkeypatch.setattr(dedup, "_ids_in_node_order", lambda *a: stored.append(a[-1] is not None) or real(*a))
    out = {}
    for name, budget in (("big", 1 << 30), ("tiny", 600_000)):
        cfg = dedup.DedupConfig(featureset="fs", dataset="d", name=name, memory_budget=budget, exact_max=10)
        s = dedup.run_dedup(ws, cfg, "run").to_json()
        out[name] = (pq.read_table(s["groups_table"]), pq.read_table(s["leaks_table"]), s["search"], s["groups"])
    assert stored == [False, True]  # only the tiny budget wrote scratch files (the vectors, the ids)
    assert out["tiny"][2] == out["big"][2] == "approximate (ivf)" and out["big"][3] == 4
    assert out["tiny"][0].equals(out["big"][0]) and out["tiny"][1].equals(out["big"][1])
    assert out["big"][1].num_rows == len(copies)


def test_candidates_in_many_small_ranges_give_the_same_results_and_cache_first_run_and_rerun(ws, monkeypatch):
    """Pairs gathered through many small scratch ranges, queries a few at a time, a vector store:
    the same groups, leaks and pairs cache as one range, on a first run and on an incremental rerun."""
    X, copies = planted(n=400, dim=272)
    ids = [fake_image_id("d", k) for k in range(len(X))]
    n = len(X) - len(copies)
    rows = [
        {"image_id": i, "path": f"img/{k:03d}.png", "split": "test" if k >= n else "train", "status": "ok"}
        for k, i in enumerate(ids)
    ]
    write_featureset(ws, "fs", ids[:-30], X[:-30], dtype="float32")
    write_manifest(ws, "d", rows[:-30], ws.root / "images")

    def run(name: str, budget: int) -> tuple[object, ...]:
        cfg = dedup.DedupConfig(featureset="fs", dataset="d", name=name, memory_budget=budget, exact_max=10)
        s = dedup.run_dedup(ws, cfg, "run").to_json()
        cache = ws.dedup_dir(name) / "_cache"
        tables = (pq.read_table(s["groups_table"]), pq.read_table(s["leaks_table"]))
        return (*tables, pq.read_table(cache / "pairs.parquet"), s["criterion"], s["search"])

    def runs(out: dict[tuple[str, int], list[tuple[object, ...]]]) -> None:
        for name, budget in out:  # vectors in memory, in a store
            with monkeypatch.context() as m:
                if name == "many":
                    m.setattr(dedup, "PAIR_CHUNK", 50)
                    m.setattr(dedup, "QUERY_ROWS", 37)
                out[name, budget].append(run(f"{name}-{budget}", budget))

    out: dict[tuple[str, int], list[tuple[object, ...]]] = {
        (a, b): [] for a in ("one", "many") for b in (1 << 30, 600_000)
    }
    runs(out)
    write_featureset(ws, "fs", ids[-30:], X[-30:], dtype="float32", run_id="more")
    write_manifest(ws, "d", rows, ws.root / "images")  # 30 new images, the copies among them
    runs(out)
    for budget in (1 << 30, 600_000):
        (first, rerun), (first_many, rerun_many) = out["one", budget], out["many", budget]
        assert first[4] == "approximate (ivf)"  # rescored on the full vectors
        assert rerun[4].startswith("exact, new images") and rerun[3]["images_searched"] == 30
        assert first[1].num_rows == 0 and rerun[1].num_rows == len(copies)
        for got, want in ((first_many, first), (rerun_many, rerun)):
            assert all(g.equals(w) for g, w in zip(got[:3], want[:3])) and got[3:] == want[3:]


@pytest.mark.parametrize("chunk", [2_000_000, 17])  # one sort, or many ranges of the smaller node
def test_similar_pairs_by_keys_are_each_listed_pair_once_with_its_first_similarity(monkeypatch, chunk):
    monkeypatch.setattr(dedup, "PAIR_CHUNK", chunk)
    rng = np.random.default_rng(4)
    rows = rng.integers(-1, 50, (50, 7))
    sims = rng.random((50, 7)).astype(np.float32)
    g = dedup.similar_pairs(dedup.Neighbours(sims, rows, "flat"), 0.3)
    want: dict[tuple[int, int], float] = {}
    for a in range(50):
        for b, s in zip(rows[a].tolist(), sims[a].tolist()):
            if b >= 0 and s >= 0.3:
                want.setdefault((min(a, b), max(a, b)), s)
    got = {(a, b): s for a, b, s in zip(g.a.tolist(), g.b.tolist(), g.sim.tolist())}
    assert got == want and list(got) == sorted(want)
    assert g.a.dtype == g.b.dtype == np.int64 and g.sim.dtype == np.float32
    empty = dedup.similar_pairs(dedup.Neighbours(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64), "flat"), 0)
    assert len(empty.a) == len(empty.b) == len(empty.sim) == 0


def test_a_full_disk_under_the_scratch_stores_is_one_line(tmp_path, monkeypatch):
    """A scratch store that cannot be written says which folder and why, not a traceback."""
    import errno

    from imgfeat.core.errors import ImgfeatError
    from imgfeat.index import scratch
    from imgfeat.index.looks import LOOK_BYTES, LookStore

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with VectorStore(4, tmp_path / "cache") as store:
        monkeypatch.setattr(scratch.os, "pwrite", full)
        with pytest.raises(ImgfeatError, match=r"cache/\(scratch file\): the disk is full"):
            store.append(np.zeros((2, 4), np.float32))
    looks = LookStore(1, tmp_path / "looks")
    monkeypatch.setattr(looks, "_file", _FullFile(looks._file))
    with pytest.raises(ImgfeatError, match="the disk is full"):
        looks.append(["a"], np.zeros((1, LOOK_BYTES // 2), np.float16))


class _FullFile:
    def __init__(self, inner):
        self._inner = inner

    def seek(self, *a):
        return self._inner.seek(*a)

    def write(self, _data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")


def test_the_manifest_read_a_row_group_at_a_time_gives_the_tables_of_the_whole_rows(ws):
    """Dedup keeps keys and codes, reading paths, splits and labels back from the manifest: over
    many row groups, with unreadable rows, repeated images and every kind of split between them,
    its tables are those of the same readable rows held in memory; and a manifest replaced during
    the run (a rescan) does not change the paths it reads back."""
    import os

    import pyarrow as pa

    X, copies = planted(n=60, dim=32)
    ids = [fake_image_id("d", k) for k in range(len(X))]
    write_featureset(ws, "fs", ids, X, dtype="float32")
    splits = ["train", "test", None, "val", "extra", ""]
    rows = []
    for k, i in enumerate(ids):
        rows.append({"image_id": i, "path": f"img/{k:03d}a.png", "split": splits[k % 6], "label": f"c{k % 3}"})
        if k % 7 == 0:  # the same picture at a second path, its own split and label
            rows.append({"image_id": i, "path": f"img/{k:03d}b.png", "split": splits[(k + 1) % 6], "label": "other"})
        if k % 5 == 0:  # a file that could not be read, between the others
            rows.append({"image_id": None, "path": f"img/{k:03d}c.png", "split": "test", "status": "error"})
    for r in rows:
        r.setdefault("status", "ok")
    path = write_manifest(ws, "d", rows, ws.root / "images")
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=7)  # many row groups (schema and metadata kept)
    assert pq.ParquetFile(path).num_row_groups > 10
    cfg = dedup.DedupConfig(featureset="fs", dataset="d", threshold=0.9, exact_max=10_000)
    im = dedup.load_images(ws, cfg)
    try:
        ok = [r for r in rows if r["status"] == "ok"]
        ref = dedup.images_of(
            im.id_strings(np.arange(len(im.ids))), X[[ids.index(i) for i in im.id_strings(np.arange(len(im.ids)))]],
            [r["image_id"] for r in ok], [r["path"] for r in ok], [r["split"] for r in ok], 0, [r["label"] for r in ok],
        )  # fmt: skip
        assert im.readable_rows == len(ok) and im.rows_digest == ref.rows_digest
        nb = dedup.nearest_neighbours(im.X, 10)
        graph = dedup.similar_pairs(nb, 0.9)
        groups = dedup.groups_table(im, graph)
        assert groups.equals(dedup.groups_table(ref, graph)) and groups.num_rows >= 2 * len(copies)
        assert dedup.leaks_table(im, nb, 0.9).equals(dedup.leaks_table(ref, nb, 0.9))
        comp = dedup.components(len(im.ids), graph)
        leaks = dedup.group_leaks_table(im, comp)
        assert leaks.equals(dedup.group_leaks_table(ref, comp)) and leaks.num_rows > 0
        first_rows = im.first_rows(np.arange(len(im.ids)))
        first = im.column(S.PATH, first_rows)
        other = pa.table({c: table.column(c) for c in table.column_names}).slice(0, 3)
        pq.write_table(other, str(path) + ".new")
        os.replace(str(path) + ".new", path)  # a rescan replaces the manifest mid-run
        assert im.column(S.PATH, first_rows) == first and all(p.endswith("a.png") for p in first)
    finally:
        im.close()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_an_index_filled_with_its_lists_sized_first_holds_what_adding_gives(tmp_path, kind, monkeypatch):
    from imgfeat.index.kinds import IndexParams, list_of, make_index, train_on_sample

    monkeypatch.setattr(dedup, "PQ_TABLE_BYTES", 7 * 256 * 4 * 4)  # IVF-PQ codes made 7 rows at a time

    X = _rows(600, 16, seed=3)
    params = IndexParams(kind, nlist=8, nprobe=8, hnsw_m=8, ef_search=32, ef_construction=40, pq_m=4)
    indexes = [make_index(params, 16) for _ in range(2)]
    if kind in ("ivf", "ivfpq"):
        for index in indexes:
            train_on_sample(index, params, X, len(X))
    indexes[0].add(X)
    with VectorStore(16, tmp_path) as store:
        store.append(X)
        dedup.fill_presized(indexes[1], store, 64)  # blocks that do not divide the rows
    assert indexes[1].ntotal == len(X)
    (want_s, want_r), (got_s, got_r) = (index.search(X[:50], 5) for index in indexes)
    assert np.array_equal(got_r, want_r) and np.array_equal(got_s, want_s)
    assert (got_r[:, 0] == np.arange(50)).mean() > 0.9  # each row finds itself: the ids are the store's rows
    if not dedup.preassigned(indexes[1]):
        assert kind in ("flat", "hnsw")
        return
    # each row's nearest lists kept as it is added: searching with them is the search that finds them again
    again = make_index(params, 16)
    train_on_sample(again, params, X, len(X))
    again.nprobe = 3
    with VectorStore(16, tmp_path) as store, VectorStore(again.nprobe, tmp_path, np.int32) as probes:
        store.append(X)
        dedup.fill_presized(again, store, 64, probes)
        assert probes.shape == (len(X), 3)  # a row of lists per row added, in row order
        near = probes[np.arange(50)]
    assert near.dtype == np.int32
    assert np.array_equal(near[:, 0], list_of(again, X[:50]))
    want_s, want_r = again.search(X[:50], 5)
    again.parallel_mode = dedup.PARALLEL_OVER_QUERIES
    got_s, got_r = again.search_preassigned(X[:50], 5, near, None)
    assert np.array_equal(got_r, want_r) and np.array_equal(got_s, want_s)


def test_parked_arrays_leave_memory_for_the_search_and_come_back_whole(ws, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    X, copies = planted(n=300, dim=16)
    ids = [fake_image_id("d", k) for k in range(len(X))]
    paths = [f"img/{k:03d}.png" for k in range(len(X))] + ["img/again.png"]
    splits = ["train" if k % 3 else "test" for k in range(len(X))] + [None]
    im = dedup.images_of(ids, X, [*ids, ids[7]], paths, splits)
    before = {name: getattr(im, name).copy() for name in dedup.PARKED}
    monkeypatch.setattr(dedup, "PARK_MIN_BYTES", 0)
    with im.parked(scratch):
        assert all(getattr(im, name) is None for name in dedup.PARKED) and im.X is X
        assert list(scratch.iterdir()) == []  # an unnamed scratch file: a crash leaves nothing
    assert all(np.array_equal(getattr(im, name), before[name]) for name in dedup.PARKED)
    assert all(getattr(im, name).dtype == before[name].dtype for name in dedup.PARKED)
    with pytest.raises(KeyError), im.parked(scratch):
        raise KeyError("the search failed")
    assert all(np.array_equal(getattr(im, name), before[name]) for name in dedup.PARKED)  # back after an error too
    monkeypatch.setattr(dedup, "PARK_MIN_BYTES", 1 << 40)
    with im.parked(scratch):
        assert im.ids is before["ids"] or np.array_equal(im.ids, before["ids"])  # small: left where it is

    # a whole run with the arrays parked during its search gives what a run without gives
    n = len(X) - len(copies)
    rows = [
        {"image_id": i, "path": p, "split": "test" if k >= n else "train", "status": "ok"}
        for k, (i, p) in enumerate(zip(ids, paths))
    ]
    write_featureset(ws, "fs", ids, X, dtype="float32")
    write_manifest(ws, "d", rows, ws.root / "images")
    seen = []
    search, pairs_of = dedup.search_neighbours, dedup.candidate_pairs

    def spy_pairs(folder, cfg, images, previous):
        seen.append(images)
        return pairs_of(folder, cfg, images, previous)

    def spy_search(*a, **k):
        seen.append(seen[-1].row_node is None)
        return search(*a, **k)

    monkeypatch.setattr(dedup, "candidate_pairs", spy_pairs)
    monkeypatch.setattr(dedup, "search_neighbours", spy_search)
    out = {}
    for name, floor in (("kept", 1 << 40), ("parked", 0)):
        monkeypatch.setattr(dedup, "PARK_MIN_BYTES", floor)
        cfg = dedup.DedupConfig(featureset="fs", dataset="d", name=name, memory_budget=600_000, exact_max=10)
        s = dedup.run_dedup(ws, cfg, "run").to_json()
        out[name] = [pq.read_table(s[t]) for t in ("groups_table", "leaks_table")]
    assert seen[1::2] == [False, True]
    assert out["parked"][0].num_rows == len(copies) + len(set(copies)) and out["parked"][1].num_rows == len(copies)
    assert all(a.equals(b) for a, b in zip(out["parked"], out["kept"]))


@pytest.mark.parametrize("scan, size", [(1 << 20, 4), (7, 4), (5, 1000)])  # blocks of manifest rows, nodes a chunk
def test_images_without_a_look_come_in_the_order_of_their_first_rows_a_chunk_at_a_time(monkeypatch, scan, size):
    """The looks read the images' files in manifest (path) order: each wanted image once, at its
    first row, whatever the blocks the manifest is scanned in."""
    monkeypatch.setattr(dedup, "GROUP_SCAN", scan)
    X = _rows(30, 4)
    ids = [fake_image_id("o", k) for k in range(len(X))]
    order = np.random.default_rng(1).permutation(len(X))  # nodes' first rows out of node order
    row_ids = [ids[k] for k in order] + [ids[3], ids[0], ids[29]]  # and second rows of three
    paths = [f"img/{r:03d}.png" for r in range(len(row_ids))]
    im = dedup.images_of(ids, X, row_ids, paths, ["train"] * len(row_ids))
    wanted = np.ones(len(X), bool)
    wanted[[0, 5, 6, int(order[-1])]] = False  # their looks are cached
    chunks = list(dedup._by_first_row(im, wanted, size))
    got = np.concatenate([nodes for nodes, _ in chunks])
    rows = np.concatenate([rows for _, rows in chunks])
    first = np.array([row_ids.index(i) for i in ids])  # each image's first row
    want = np.flatnonzero(wanted)
    want = want[np.argsort(first[want])]
    assert np.array_equal(got, want) and len(got) == wanted.sum() and np.array_equal(rows, first[got])
    assert np.array_equal(im.first_rows(got), rows)
    assert all(len(c) == len(r) == size for c, r in chunks[:-1]) and 0 < len(chunks[-1][0]) <= size
    assert im.column(S.PATH, rows[:2]) == [paths[r] for r in sorted(first[want])[:2]]


@pytest.mark.parametrize("size", [1, 7, 64, 1000])
def test_queries_come_list_after_list_in_blocks_and_in_row_order_when_the_lists_miss_rows(size):
    """The approximate search takes its queries list by list (shared candidates): every row once,
    blocks of ``size``, in the lists' order; an index whose lists do not hold the rows: row order."""
    from imgfeat.index.kinds import IndexParams, list_of, make_index, train_on_sample

    X, _ = planted(n=300, dim=16)
    params = IndexParams(kind="ivf", nlist=8, nprobe=2)
    index = make_index(params, 16)
    train_on_sample(index, params, X, len(X))
    index.add(X)
    lists = list_of(index, X)
    want = np.concatenate([np.flatnonzero(lists == at) for at in range(8)])  # (FAISS keeps a list's rows in order)
    blocks = list(dedup._list_blocks(index, len(X), size))
    assert np.array_equal(np.concatenate(blocks), want)
    assert all(len(b) == size for b in blocks[:-1]) and 0 < len(blocks[-1]) <= size
    rows = list(dedup._list_blocks(index, len(X) + 1, size))  # a row the lists do not hold
    assert np.array_equal(np.concatenate(rows), np.arange(len(X) + 1))


@pytest.mark.parametrize("block", [7, 1 << 20])  # ids put in node order a block at a time
def test_ids_in_a_scratch_file_read_back_as_keys_and_join_a_rerun_as_ids_in_memory_do(ws, tmp_path, monkeypatch, block):
    """Past the budget the images' ids wait in a scratch file: read back by node and by block as
    the keys in memory would be, and a rerun's id -> node lookup (the sorted ids and each one's
    node, set aside there too) answers as one over every id in memory."""
    from imgfeat.core.keys import as_strings, keys_of
    from imgfeat.index.scratch import KeyStore

    keys = keys_of([fake_image_id("k", k) for k in range(40)])
    scratch = tmp_path / "scratch"
    with KeyStore(keys.dtype, scratch) as store:
        store.append(keys[:25])
        store.append(keys[25:])
        assert list(scratch.iterdir()) == [] and len(store) == 40
        assert as_strings(store[:]) == as_strings(keys) and as_strings(store[[7, 3, 7]]) == as_strings(keys[[7, 3, 7]])
        assert as_strings(store[30:35]) == as_strings(keys[30:35])
        with pytest.raises(ValueError):
            store.append(keys_of(["plain"]))  # another kind of key

    monkeypatch.setattr(dedup, "ID_BLOCK", block)
    X, _ = planted(n=300, dim=64)
    ids = [fake_image_id("d", k) for k in range(len(X))]
    order = np.random.default_rng(2).permutation(len(X))  # the featureset in another order than the manifest
    write_featureset(ws, "fs", [ids[k] for k in order[:-5]], X[order[:-5]], dtype="float32")
    rows = [{"image_id": i, "path": f"img/{k:03d}.png", "split": "train", "status": "ok"} for k, i in enumerate(ids)]
    write_manifest(ws, "d", rows, ws.root / "images")
    for budget in (1 << 30, 65_536):  # ids in memory; in scratch files
        im = dedup.load_images(ws, dedup.DedupConfig(featureset="fs", dataset="d", memory_budget=budget))
        try:
            assert (im.ranked is None) == (budget > 65_536) and im.missing == 5 and len(im.ids) == len(X) - 5
            got = im.id_strings(np.arange(len(im.ids)))
            assert got == [ids[k] for k in order[:-5]]  # node k: the featureset's k-th row
            np.testing.assert_allclose(im.X[np.arange(len(got))], X[order[:-5]], atol=1e-6)
            asked = pa.array([ids[k] for k in np.random.default_rng(3).permutation(len(ids))] + ["f" * 32])
            want = dedup.NodeOf(keys_of(got)).positions(asked)
            assert np.array_equal(im.node_lookup().positions(asked), want) and (want == -1).sum() == 6
            assert np.array_equal(im.row_node, dedup.NodeOf(keys_of(got)).positions(pa.array(ids)))
        finally:
            im.close()
