"""The index stage and Index.search on generated vectors: exact = brute force, recall, incremental, crash safety."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import fake_image_id, write_featureset

from imgfeat.core.errors import ConfigError
from imgfeat.scan.manifest import write_manifest


def clustered(n: int, dim: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Vectors around random centres, like image features: neighbours mean something."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    return centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32)


def unit(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def make_fs(ws, name: str, X: np.ndarray, start: int = 0, dataset: str | None = None) -> list[str]:
    """Write rows ``start..`` of X into featureset ``name`` (float32) and, optionally, a manifest."""
    ids = [fake_image_id(name, k) for k in range(start, start + len(X))]
    write_featureset(ws, name, ids, X, dtype="float32", shard_rows=256, run_id=f"r{start:06d}")
    if dataset:
        rows = [{"image_id": i, "path": f"img/{k:05d}.jpg", "status": "ok"} for k, i in enumerate(ids)]
        write_manifest(ws, dataset, rows, ws.root / "images")
    return ids


def build(ws, fs: str, run_id: str = "run1", **kw):
    from imgfeat.index import IndexConfig, build_index

    return build_index(ws, IndexConfig(featureset=fs, **kw), run_id)


@pytest.mark.quick
def test_exact_search_equals_brute_force(ws):
    from imgfeat.index import Index

    X = clustered(600)
    ids = make_fs(ws, "fs", X, dataset="d")
    out = build(ws, "fs", datasets=("d",), name="ix")
    assert (out.kind, out.rows, out.added, out.written) == ("flat", 600, 600, True)
    Q = clustered(5, seed=7)
    results = Index.open(ws, "ix").search(Q, k=8)
    sims = unit(Q) @ unit(X).T
    for res, row in zip(results, sims):
        expect = np.argsort(-row, kind="stable")[:8]
        assert [n.image_id for n in res.neighbours] == [ids[j] for j in expect]
        np.testing.assert_allclose([n.similarity for n in res.neighbours], row[expect], atol=1e-5)


@pytest.mark.quick
def test_neighbours_carry_paths_and_never_the_query_itself(ws):
    from imgfeat.index import Index

    ids = make_fs(ws, "fs", clustered(50), dataset="d")
    build(ws, "fs", datasets=("d",), name="ix")
    res = Index.open(ws, "ix").search_ids([ids[3]], k=5)[0]
    assert res.query == ids[3] and len(res.neighbours) == 5
    assert ids[3] not in [n.image_id for n in res.neighbours]
    k = ids.index(res.neighbours[0].image_id)
    assert res.neighbours[0].path == (ws.root / "images" / f"img/{k:05d}.jpg").as_posix()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(ws, kind):
    from imgfeat.index import Index

    X = clustered(2000, dim=32, clusters=40)
    make_fs(ws, "fs", X)
    out = build(ws, "fs", name="ix", kind=kind)
    assert out.kind == kind and out.rows == 2000
    Q = clustered(100, dim=32, clusters=40, seed=1)
    approx = Index.open(ws, "ix").search(Q, k=10)
    exact = np.argsort(-(unit(Q) @ unit(X).T), axis=1)[:, :10]
    ids = [fake_image_id("fs", k) for k in range(2000)]
    hits = [len({n.image_id for n in r.neighbours} & {ids[j] for j in row}) for r, row in zip(approx, exact)]
    assert np.mean(hits) / 10 >= 0.95


@pytest.mark.quick
def test_auto_is_flat_when_small_and_ivf_when_large():
    from imgfeat.index.kinds import AUTO_FLAT_MAX, resolve_params

    assert resolve_params("auto", 1000).kind == "flat"
    p = resolve_params("auto", AUTO_FLAT_MAX + 1)
    assert p.kind == "ivf" and p.nlist > 100 and 8 <= p.nprobe < p.nlist


@pytest.mark.quick
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_incremental_add_equals_rebuild(ws, tmp_path, kind):
    from imgfeat.core.workspace import Workspace
    from imgfeat.index import Index

    X = clustered(700)
    make_fs(ws, "fs", X[:500])
    build(ws, "fs", name="ix", kind=kind)
    make_fs(ws, "fs", X[500:], start=500)
    out = build(ws, "fs", "run2", name="ix", kind=kind)
    assert (out.added, out.rows, out.rebuilt) == (200, 700, False)
    other = Workspace(tmp_path / "other")
    make_fs(other, "fs", X)
    build(other, "fs", name="ix", kind=kind)
    a, b = Index.open(ws, "ix"), Index.open(other, "ix")
    assert a.ids == b.ids
    Q = clustered(20, seed=3)
    ra, rb = a.search(Q, k=10), b.search(Q, k=10)
    assert [[n.image_id for n in r.neighbours] for r in ra] == [[n.image_id for n in r.neighbours] for r in rb]


@pytest.mark.quick
def test_rerun_with_nothing_new_writes_nothing(ws):
    make_fs(ws, "fs", clustered(100))
    build(ws, "fs", name="ix")

    def stamps() -> dict:
        return {p: p.stat().st_mtime_ns for p in [*ws.index_dir("ix").iterdir(), *ws.index_files_dir("ix").iterdir()]}

    before = stamps()
    out = build(ws, "fs", "run2", name="ix")
    assert (out.added, out.written, out.rows) == (0, False, 100)
    assert stamps() == before and len(before) == 3


@pytest.mark.quick
def test_index_folder_reads_as_its_id_order_and_provenance_names_the_featureset(ws):
    import pandas as pd

    ids = make_fs(ws, "fs", clustered(30), dataset="d")
    build(ws, "fs", datasets=("d",))
    folder, files = ws.index_dir("d-fs"), ws.index_files_dir("d-fs")
    assert pd.read_parquet(folder)["image_id"].tolist() == ids
    assert [p.name for p in folder.iterdir()] == ["ids.parquet"]  # the side files live in indexes/_files/d-fs
    prov = json.loads((files / "_index.json").read_text())
    assert prov["featureset"] == "fs" and prov["datasets"] == ["d"] and prov["rows"] == 30
    assert prov["kind"] == "flat" and (files / prov["index_file"]).is_file()


@pytest.mark.quick
def indexed_then_grown(ws):
    """Index "ix" over 200 rows of featureset "fs", then 100 more rows in "fs": (queries, their answers)."""
    from imgfeat.index import Index

    X = clustered(300)
    make_fs(ws, "fs", X[:200])
    build(ws, "fs", name="ix")
    Q = clustered(4, seed=5)
    before = [r.to_json() for r in Index.open(ws, "ix").search(Q, k=5)]
    make_fs(ws, "fs", X[200:], start=200)
    return Q, before


def test_crash_mid_write_leaves_the_previous_index_readable(ws, monkeypatch):
    from imgfeat.index import Index
    from imgfeat.index import build as build_mod

    Q, before = indexed_then_grown(ws)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between ids.parquet and the provenance")

    monkeypatch.setattr(build_mod, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        build(ws, "fs", "run2", name="ix")
    assert pq.read_metadata(ws.index_dir("ix") / "ids.parquet").num_rows == 300  # the new ids did land
    index = Index.open(ws, "ix")
    assert len(index) == 200 and [r.to_json() for r in index.search(Q, k=5)] == before
    monkeypatch.undo()
    out = build(ws, "fs", "run3", name="ix")
    assert (out.added, out.rows) == (100, 300)
    assert sorted(p.name for p in ws.index_dir("ix").iterdir()) == ["ids.parquet"]
    assert sorted(p.name for p in ws.index_files_dir("ix").iterdir()) == ["_index-run3.faiss", "_index.json"]


def test_a_full_disk_while_the_index_file_is_written_is_one_line_and_the_old_index_stays(ws, monkeypatch):
    """FAISS writes the index through our file: a full disk is the one-line disk error (exit 1 from
    the command line), no partial file is left, the index before is still whole, a rerun completes."""
    import builtins
    import errno

    from imgfeat.core.errors import ImgfeatError
    from imgfeat.index import Index

    Q, before = indexed_then_grown(ws)

    real_open = builtins.open

    class FullFile:
        def __init__(self, fh) -> None:
            self.fh, self.written = fh, 0

        def write(self, data) -> int:
            if self.written + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.fh.close()

    def opener(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return FullFile(fh) if str(path).endswith(".faiss.tmp") and "w" in mode else fh

    monkeypatch.setattr(builtins, "open", opener)
    with pytest.raises(ImgfeatError, match=r"cannot write .*_index-run2\.faiss: the disk is full$"):
        build(ws, "fs", "run2", name="ix")
    monkeypatch.undo()
    assert sorted(p.name for p in ws.index_files_dir("ix").iterdir()) == ["_index-run1.faiss", "_index.json"]
    index = Index.open(ws, "ix")
    assert len(index) == 200 and [r.to_json() for r in index.search(Q, k=5)] == before
    out = build(ws, "fs", "run3", name="ix")
    assert (out.added, out.rows) == (100, 300) and len(Index.open(ws, "ix")) == 300


@pytest.mark.quick
def test_bad_input_is_a_clear_error(ws):
    from imgfeat.index import Index

    make_fs(ws, "fs", clustered(20))
    with pytest.raises(ConfigError, match="unknown featureset 'fz'"):
        build(ws, "fz")
    write_featureset(ws, "empty", [], np.zeros((0, 32), np.float32), dtype="float32")
    with pytest.raises(ConfigError, match="featureset empty has no feature rows"):
        build(ws, "empty")
    build(ws, "fs", name="ix")
    make_fs(ws, "fs2", clustered(20, seed=2))
    with pytest.raises(ConfigError, match="index ix was built on featureset fs, not fs2"):
        build(ws, "fs2", name="ix")
    index = Index.open(ws, "ix")
    with pytest.raises(ConfigError, match="top 21 is more than the 20 images in index ix"):
        index.search(clustered(1), k=21)
    with pytest.raises(ConfigError, match="built on featureset fs; queries from featureset fs2"):
        index.search(clustered(1), k=3, featureset="fs2")
    with pytest.raises(ConfigError, match="query vectors have 8 dimensions"):
        index.search(np.ones((1, 8), np.float32), k=3)
    with pytest.raises(ConfigError, match="unknown index 'iz'"):
        Index.open(ws, "iz")
    with pytest.raises(ConfigError, match="unknown index kind 'annoy'"):
        build(ws, "fs", kind="annoy")


@pytest.mark.quick
def test_list_indexes_is_typed(ws):
    from imgfeat.index import list_indexes

    assert list_indexes(ws) == []
    make_fs(ws, "fs", clustered(40))
    build(ws, "fs", name="b")
    build(ws, "fs", name="a", kind="hnsw")
    infos = list_indexes(ws)
    assert [(i.name, i.kind, i.rows, i.featureset) for i in infos] == [("a", "hnsw", 40, "fs"), ("b", "flat", 40, "fs")]
    assert json.loads(json.dumps(infos[0].to_json()))["params"]["hnsw_m"] == 32


@pytest.mark.quick
def test_a_second_writer_of_the_same_index_fails_fast(ws):
    from imgfeat.core.errors import LockBusyError
    from imgfeat.core.storage import FileLock

    make_fs(ws, "fs", clustered(20))
    with FileLock(ws.locks_dir / "index-ix.lock", "index ix"):
        with pytest.raises(LockBusyError, match="index ix is being written by another process"):
            build(ws, "fs", name="ix")
    assert build(ws, "fs", name="ix").rows == 20


def test_small_memory_budget_builds_ivfpq_with_recall_against_exact(ws):
    """A budget the full vectors do not fit: auto is ivfpq (codes sized to it, rows streamed from the
    shards), recorded with its parameters; search rescored on stored features keeps recall@10 >= 0.9,
    by vectors and by image id, and a rerun adds new rows to it."""
    from imgfeat.index import Index
    from imgfeat.index.kinds import flat_bytes, ivfpq_bytes

    X = clustered(3000, dim=32, clusters=40)
    ids = make_fs(ws, "fs", X)
    budget = int(0.7 * flat_bytes(3000, 32))
    out = build(ws, "fs", name="ix", memory_budget=budget)
    p = out.params
    assert out.kind == "ivfpq" and out.rows == 3000 and p["pq_bits"] == 8 and 32 % p["pq_m"] == 0
    assert ivfpq_bytes(3000, 32, p["nlist"], p["pq_m"]) <= budget // 2 and 0 < p["trained_on"] < 3000
    recorded = json.loads((ws.index_files_dir("ix") / "_index.json").read_text())["params"]
    assert (recorded["kind"], recorded["pq_m"], recorded["nprobe"]) == ("ivfpq", p["pq_m"], p["nprobe"])
    Q = clustered(100, dim=32, clusters=40, seed=1)
    exact = np.argsort(-(unit(Q) @ unit(X).T), axis=1)[:, :10]
    approx = Index.open(ws, "ix").search(Q, k=10)
    hits = [len({n.image_id for n in r.neighbours} & {ids[j] for j in row}) for r, row in zip(approx, exact)]
    assert np.mean(hits) / 10 >= 0.9
    res = Index.open(ws, "ix", nprobe=p["nlist"]).search_ids([ids[5]], k=5)[0]
    assert len(res.neighbours) == 5 and ids[5] not in [n.image_id for n in res.neighbours]
    assert res.neighbours[0].similarity >= res.neighbours[-1].similarity > 0.5
    more = make_fs(ws, "fs", clustered(200, dim=32, clusters=40, seed=2), start=3000)
    again = build(ws, "fs", run_id="run2", name="ix", memory_budget=budget)
    assert (again.kind, again.rows, again.added, again.rebuilt) == ("ivfpq", 3200, 200, False)
    hit = Index.open(ws, "ix").search_ids([more[0]], k=1)[0].neighbours[0]
    assert hit.image_id in more or hit.similarity > 0.5


def test_each_indexed_image_gets_its_first_readable_manifest_row_over_the_datasets_in_order(ws):
    """The ids table names each row's dataset and path from the first readable manifest row holding
    its id, over the datasets in the order given (their manifests read a row group at a time, the
    paths read back by position as the table is written); an id with no readable row is left out."""
    from imgfeat.core import schemas as S
    from imgfeat.index.kinds import flat_bytes

    X = clustered(3000, dim=32, clusters=40)
    ids = make_fs(ws, "fs", X)
    rng = np.random.default_rng(2)
    manifests = {"a": [], "b": []}
    for k, i in enumerate(ids):
        if k % 10 == 9:
            continue  # in no manifest
        where = ["a"] if k % 3 == 0 else ["b"] if k % 3 == 1 else ["a", "b"]
        for d in where:
            if d == "a" and k % 7 == 0:  # unreadable in a: its row in b counts
                manifests["a"].append({"image_id": i, "path": f"bad/{k:05d}.jpg", "status": "unreadable"})
                continue
            manifests[d].append({"image_id": i, "path": f"{d}/{k:05d}.jpg", "status": "ok"})
            if rng.random() < 0.1:  # a later copy under another path: the first row wins
                manifests[d].append({"image_id": i, "path": f"{d}/zz/{k:05d}.jpg", "status": "ok"})
    for d, rows in manifests.items():
        write_manifest(ws, d, sorted(rows, key=lambda r: r["path"]), ws.root / "images" / d)
    out = build(ws, "fs", datasets=("a", "b"), name="ix", memory_budget=int(0.7 * flat_bytes(3000, 32)))
    want = {}
    for d in ("a", "b"):
        for r in sorted(manifests[d], key=lambda r: r["path"]):
            if r["status"] == "ok":
                want.setdefault(r["image_id"], (d, r["path"]))
    assert out.kind == "ivfpq" and out.rows == len(want) and 2000 < len(want) < len(ids)
    got = pq.read_table(ws.index_dir("ix") / "ids.parquet").to_pylist()
    assert {r[S.IMAGE_ID]: (r[S.DATASET], r[S.PATH]) for r in got} == want and len(got) == len(want)


def test_inverted_lists_sized_before_the_fill_hold_the_same_rows(ws, monkeypatch):
    """Where the lists are a large share of the budget, a first pass counts each list's rows and
    gives it that room before the fill: where the memory comes from changes, not the index (the
    same list sizes as the counts, the same answers as a build that lets the lists grow)."""
    from imgfeat.index import Index
    from imgfeat.index import build as B
    from imgfeat.index.kinds import flat_bytes, import_faiss

    X = clustered(3000, dim=32, clusters=40)
    make_fs(ws, "fs", X)
    budget = int(0.7 * flat_bytes(3000, 32))
    counted = []
    presize = B.presize_lists
    monkeypatch.setattr(B, "presize_lists", lambda index, counts: counted.append(counts) or presize(index, counts))
    monkeypatch.setattr(B, "PRESIZE_SHARE", 10**9)  # every list is "a large share"
    sized = build(ws, "fs", name="sized", memory_budget=budget)
    monkeypatch.setattr(B, "PRESIZE_SHARE", 1)  # none is
    grown = build(ws, "fs", name="grown", memory_budget=budget)
    assert len(counted) == 1 and counted[0].sum() == 3000 == sized.rows == grown.rows
    assert sized.kind == grown.kind == "ivfpq" and sized.params == grown.params
    faiss = import_faiss()
    index = faiss.read_index(str(next(ws.index_files_dir("sized").glob("*.faiss"))))
    lists = faiss.extract_index_ivf(index).invlists
    assert [lists.list_size(k) for k in range(index.nlist)] == counted[0].tolist()
    Q = clustered(50, dim=32, clusters=40, seed=3)
    for a, b in zip(Index.open(ws, "sized").search(Q, k=10), Index.open(ws, "grown").search(Q, k=10)):
        assert [(n.image_id, round(n.similarity, 5)) for n in a.neighbours] == [
            (n.image_id, round(n.similarity, 5)) for n in b.neighbours
        ]


def test_streamed_ivf_rows_answer_to_their_own_ids_when_extended_and_retrained(ws, monkeypatch):
    """An IVF index filled from a plan of feature rows (no ids in memory during the fill): every
    row's FAISS id is its row in ids.parquet, after a first build, an extension, and a retrain
    that keeps the old rows at their positions and adds the new ones after. The ids table is
    made once the index file is written (the index no longer in memory), and an old image that
    lost its feature row is an error, not a hole."""
    from imgfeat.core.errors import ImgfeatError
    from imgfeat.core.storage import list_shards
    from imgfeat.index import Index
    from imgfeat.index import build as B

    X = clustered(2600)
    ids = make_fs(ws, "fs", X[:2000])
    seen = []
    real = B._id_rows

    def id_rows(ws_, cfg, *rest):
        seen.append(sorted(p.name for p in ws_.index_files_dir(cfg.index_name).glob("*.faiss")))
        return real(ws_, cfg, *rest)

    monkeypatch.setattr(B, "_id_rows", id_rows)

    def check(n: int, nlist: int) -> None:
        assert pq.read_table(ws.index_dir("ix") / "ids.parquet")["image_id"].to_pylist() == ids[:n]
        got = Index.open(ws, "ix", nprobe=nlist).search(X[:n], k=1)
        assert [r.neighbours[0].image_id for r in got] == ids[:n]

    out = build(ws, "fs", name="ix", kind="ivf", nlist=16)
    assert (out.kind, out.rows, out.rebuilt) == ("ivf", 2000, False) and seen[-1] == ["_index-run1.faiss"]
    check(2000, 16)
    ids += make_fs(ws, "fs", X[2000:2300], start=2000)
    out = build(ws, "fs", "run2", name="ix", kind="ivf", nlist=16)
    assert (out.added, out.rows, out.rebuilt) == (300, 2300, False)
    assert seen[-1] == ["_index-run1.faiss", "_index-run2.faiss"]  # the new file written, the old not yet gone
    check(2300, 16)
    ids += make_fs(ws, "fs", X[2300:], start=2300)
    out = build(ws, "fs", "run3", name="ix", kind="ivf", nlist=20)  # another nlist: trained again
    assert (out.added, out.rows, out.rebuilt, out.params["nlist"]) == (300, 2600, True, 20)
    check(2600, 20)
    first = list_shards(ws.featureset_dir("fs"))[0]
    first.unlink()  # 256 of its images lose their feature rows
    with pytest.raises(ImgfeatError, match="256 of its images no longer have a feature row"):
        build(ws, "fs", "run4", name="ix", kind="ivf", nlist=24)
    check(2600, 20)  # the committed index stays as it was


@pytest.mark.quick
def test_memory_budget_picks_the_kind_and_refuses_what_cannot_fit():
    from imgfeat.index.kinds import flat_bytes, resolve_params

    assert resolve_params("auto", 1000, dim=64, memory_budget=flat_bytes(1000, 64)).kind == "flat"
    assert resolve_params("auto", 60_000, dim=64, memory_budget=flat_bytes(60_000, 64)).kind == "ivf"
    small = resolve_params("auto", 60_000, dim=64, memory_budget=flat_bytes(60_000, 64) // 4)
    assert small.kind == "ivfpq" and small.pq_m * 60_000 <= flat_bytes(60_000, 64) // 8
    assert resolve_params("auto", 60_000).kind == "ivf"  # no budget: as before
    with pytest.raises(ConfigError, match="memory budget 1000 bytes is too small"):
        resolve_params("auto", 60_000, dim=64, memory_budget=1000)
