"""Every common reader opens a featureset, predictions, dataset or index folder as exactly its rows, no glob."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from synthetic import BlobSpec, write_blob_dataset, write_featureset
from tiny_images import noise_image

from imgfeat.core import schemas as S
from imgfeat.core.storage import list_shards
from imgfeat.core.workspace import Workspace

N_GOOD = 8  # images with a feature row; two more files become error rows
TOY = BlobSpec(classes=("cat", "dog"), per_class=12, dim=8, separation=6.0)


@dataclass(frozen=True)
class Expected:
    """A table folder and the rows it must open as (read file by file, the way we wrote them)."""

    folder: str
    rows: pd.DataFrame
    key: str  # a column that identifies a row
    check: str  # a column whose values are compared per key


def _rows_of(files: list[Path]) -> pd.DataFrame:
    return pd.concat([pq.ParquetFile(p).read().to_pandas() for p in files], ignore_index=True)


def _extracted(ws: Workspace, images: Path) -> str:
    """A real extract (Lite0, random weights, 32 px, float32) with --npy and two bad files."""
    from imgfeat.extract.extract import ExtractConfig, run_extract
    from imgfeat.scan.scan import ScanConfig, run_scan

    for i in range(N_GOOD):
        folder = images / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        noise_image(i, (40, 30)).save(folder / f"{i:02d}.jpg", quality=90)
    (images / "cat" / "empty.jpg").write_bytes(b"")
    (images / "dog" / "notes.jpg").write_bytes(b"this is not an image")
    run_scan(ws, ScanConfig(root=images, dataset="photos"), "scan1")
    cfg = ExtractConfig(
        dataset="photos",
        backbone="efficientnet_lite0",
        weights="none",
        input_size=32,
        batch_size=4,
        shard_size=3,
        workers=1,
        dtype="float32",
        npy=True,
    )
    return run_extract(ws, cfg, "run1").featureset


@pytest.fixture(scope="module")
def tables(tmp_path_factory, keras_home) -> dict[str, Expected]:
    """A featureset with error rows and NPY sidecars, a head's predictions, a dataset folder, an index."""
    from imgfeat.extract.featureset import load_features, read_errors
    from imgfeat.heads import PredictConfig, TrainConfig, run_predict, run_train
    from imgfeat.index import IndexConfig, build_index

    base = tmp_path_factory.mktemp("readers")
    ws = Workspace(base / "ws")
    fs = _extracted(ws, base / "images")
    assert len(read_errors(ws, fs)) == 2 and any(ws.featureset_npy_dir(fs).iterdir())
    assert len(list_shards(ws.featureset_dir(fs))) > 1
    ids, X = load_features(ws, fs)
    assert len(ids) == N_GOOD and X.std() > 0.01  # distinct, non-zero features: a comparison means something
    features = pd.DataFrame({S.IMAGE_ID: ids, S.FEATURE: list(X)})

    write_blob_dataset(ws, "toy", "blobs", TOY)
    head = run_train(ws, TrainConfig("toy", "blobs", cv=2), "t1").head_id
    run_predict(ws, PredictConfig(head, dataset="toy"), "p1")
    preds = _rows_of(list_shards(ws.predictions_dir(head)))
    assert len(preds) == len(TOY.classes) * TOY.per_class
    manifest = _rows_of([ws.manifest_path("photos")])
    index = build_index(ws, IndexConfig(fs, datasets=("photos",), name="photos"), "i1")
    index_rows = _rows_of([Path(index.index_dir) / "ids.parquet"])
    assert index.rows == N_GOOD and sorted(index_rows[S.IMAGE_ID]) == sorted(ids)
    return {
        "featureset": Expected(str(ws.featureset_dir(fs)), features, S.IMAGE_ID, S.FEATURE),
        "predictions": Expected(str(ws.predictions_dir(head)), preds, S.IMAGE_ID, S.PRED_LABEL),
        "dataset": Expected(str(ws.dataset_dir("photos")), manifest, S.PATH, S.STATUS),
        "index": Expected(index.index_dir, index_rows, S.IMAGE_ID, S.PATH),
    }


def assert_exact_rows(got: pd.DataFrame, want: Expected, reader: str) -> None:
    """Same columns in the same order, the same rows (by key), the same values in one column."""
    assert list(got.columns) == list(want.rows.columns), reader
    assert len(got) == len(want.rows), reader
    g, w = got.set_index(want.key), want.rows.set_index(want.key)
    assert sorted(g.index) == sorted(w.index), reader
    if want.check == S.FEATURE:
        np.testing.assert_array_equal(
            np.stack([np.asarray(v, np.float32) for v in g.loc[w.index, S.FEATURE]]),
            np.stack(w[S.FEATURE].to_numpy()),
            err_msg=reader,
        )
    else:
        assert list(g.loc[w.index, want.check]) == list(w[want.check]), reader


def _polars_read(folder: str) -> pd.DataFrame:
    import polars as pl

    return pl.read_parquet(folder).to_pandas()


def _polars_glob(folder: str) -> pd.DataFrame:
    import polars as pl

    return pl.read_parquet(f"{folder}/**/*.parquet").to_pandas()


def _polars_scan(folder: str) -> pd.DataFrame:
    import polars as pl

    return pl.scan_parquet(folder).collect().to_pandas()


def _duckdb(folder: str) -> pd.DataFrame:
    import duckdb

    # DuckDB takes a folder as a table (no '*' in the query)
    return duckdb.sql(f"select * from read_parquet('{folder}')").df()


def _pyarrow_dataset(folder: str) -> pd.DataFrame:
    import pyarrow.dataset as ds

    return ds.dataset(folder, format="parquet").to_table().to_pandas()


READERS: dict[str, Callable[[str], pd.DataFrame]] = {
    "pandas.read_parquet": pd.read_parquet,
    "pyarrow.parquet.read_table": lambda folder: pq.read_table(folder).to_pandas(),
    "pyarrow.dataset": _pyarrow_dataset,
    "polars.read_parquet": _polars_read,
    "polars.read_parquet glob": _polars_glob,
    "polars.scan_parquet": _polars_scan,
    "duckdb.read_parquet": _duckdb,
}


@pytest.mark.quick
def test_an_old_layout_featureset_is_migrated_to_a_folder_polars_reads(ws):
    """The provenance moves from <fs>/_featureset.json to features/_provenance/<fs>.json (where
    Polars, which reads every file of a folder, no longer trips on it); it is read in either place."""
    import polars as pl

    from imgfeat.extract.featureset import OLD_PROVENANCE_FILE, featureset_info, migrate_layout

    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_featureset(ws, "fs", ["a", "b", "c"], X, dtype="float32")
    folder, new = ws.featureset_dir("fs"), ws.featureset_provenance("fs")
    assert new.parent != folder and sorted(p.suffix for p in folder.iterdir()) == [".parquet"]
    new.rename(folder / OLD_PROVENANCE_FILE)  # the layout before
    with pytest.raises(Exception, match="different file extensions"):
        pl.read_parquet(folder)
    assert featureset_info(ws, "fs")["dim"] == 4  # readable before the migration too
    migrate_layout(ws, "fs")
    assert not (folder / OLD_PROVENANCE_FILE).exists() and featureset_info(ws, "fs")["dim"] == 4
    got = pl.read_parquet(folder).sort(S.IMAGE_ID)
    assert got[S.IMAGE_ID].to_list() == ["a", "b", "c"] and got[S.FEATURE].to_list() == X.tolist()


@pytest.mark.quick
def test_an_old_layout_index_is_migrated_to_a_folder_polars_reads(ws):
    """Its _index.json and _index-<run>.faiss move from indexes/<name>/ to indexes/_files/<name>/:
    read where they are until then, moved by the next writer or by an open that finds no writer."""
    import polars as pl

    from imgfeat.core.storage import FileLock
    from imgfeat.index import Index, IndexConfig, build_index

    X = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    ids = [f"{k:032x}" for k in range(30)]
    write_featureset(ws, "fs", ids, X, dtype="float32")
    build_index(ws, IndexConfig("fs", name="ix"), "r1")
    folder, files = ws.index_dir("ix"), ws.index_files_dir("ix")
    want = Index.open(ws, "ix").search(X[:3], k=5)

    def old_layout() -> None:  # the layout before
        for p in files.iterdir():
            p.rename(folder / p.name)
        files.rmdir()
        with pytest.raises(Exception, match=r"different file extensions|parquet"):
            pl.read_parquet(folder)

    old_layout()
    with FileLock(ws.locks_dir / "index-ix.lock", "index ix"):  # a writer holds it: read in place, not moved
        assert Index.open(ws, "ix").search(X[:3], k=5) == want
        assert sorted(p.suffix for p in folder.iterdir()) == [".faiss", ".json", ".parquet"]
    assert Index.open(ws, "ix").search(X[:3], k=5) == want  # no writer: the open moves them
    assert [p.name for p in folder.iterdir()] == ["ids.parquet"] and len(list(files.iterdir())) == 2
    assert sorted(pl.read_parquet(folder)[S.IMAGE_ID].to_list()) == ids

    old_layout()
    out = build_index(ws, IndexConfig("fs", name="ix"), "r2")  # a writer moves them too
    assert (out.rows, out.written) == (30, False) and [p.name for p in folder.iterdir()] == ["ids.parquet"]
    assert Index.open(ws, "ix").search(X[:3], k=5) == want


@pytest.mark.quick
def test_a_shard_being_written_is_not_in_the_folder(ws):
    """Polars and DuckDB read hidden files and subfolders too, pyarrow and Spark any file not
    starting with '.' or '_': a half-written shard is staged outside the folder until its rename."""
    from imgfeat.core.storage import atomic_path, remove_stale_tmp, temp_path

    X = np.ones((2, 4), np.float32)
    write_featureset(ws, "fs", ["a", "b"], X, dtype="float32")
    folder = ws.featureset_dir("fs")
    want = Expected(str(folder), pd.DataFrame({S.IMAGE_ID: ["a", "b"], S.FEATURE: list(X)}), S.IMAGE_ID, S.FEATURE)
    final = folder / "part-next-00000.parquet"
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"PAR1 half a shard")
            assert tmp == temp_path(final) and not tmp.is_relative_to(folder)
            for reader in ("pandas.read_parquet", "polars.read_parquet", "polars.scan_parquet", "duckdb.read_parquet"):
                assert_exact_rows(READERS[reader](str(folder)), want, reader)
            raise RuntimeError("writer died mid-shard")
    assert not tmp.exists() and not final.exists()
    tmp.write_bytes(b"left by a killed process")
    assert remove_stale_tmp(folder) == 1 and not tmp.exists()  # the next writer cleans it


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("kind", ["featureset", "predictions", "dataset", "index"])
def test_the_folder_opens_as_exactly_its_rows(tables, reader, kind):
    """Issue 13 item 1: before, pandas and pyarrow returned the error rows, Polars stopped at side files
    (issue 24 item 3: an index folder's .faiss file and _index.json, before they moved to indexes/_files)."""
    assert_exact_rows(READERS[reader](tables[kind].folder), tables[kind], reader)


def test_hugging_face_datasets_loads_the_folder(tables, tmp_path, monkeypatch):
    """Offline, with its cache under tmp_path: nothing is fetched or written to ~."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    for kind, want in tables.items():
        got = datasets.load_dataset("parquet", data_dir=want.folder, split="train", cache_dir=str(tmp_path / "cache"))
        assert_exact_rows(got.to_pandas(), want, f"datasets ({kind})")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_reads_the_folder(tables):
    ray = pytest.importorskip("ray")  # the optional extra; the test extra installs it
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        for kind, want in tables.items():
            assert_exact_rows(ray.data.read_parquet(want.folder).to_pandas(), want, f"ray ({kind})")
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs Java (17 or later) and there is no 'java' on PATH and no JAVA_HOME")
    from pyspark.sql import SparkSession

    tmp = tmp_path_factory.mktemp("spark")
    session = (
        SparkSession.builder.master("local[1]")
        .appName("imgfeat-readers")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.warehouse.dir", str(tmp / "warehouse"))
        .config("spark.driver.memory", "512m")
        .config("spark.local.dir", str(tmp / "local"))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


SPARK_ON_PANDAS_3 = "ignore:::pyspark.*"  # pyspark 4.3 warns that it does not fully support pandas 3


@pytest.mark.slow
@pytest.mark.filterwarnings(SPARK_ON_PANDAS_3)
def test_spark_reads_the_folder(tables, spark):
    """Issue 13 item 2: the default float32 storage; Spark 4 cannot read a float16 feature column."""
    for kind, want in tables.items():
        got = spark.read.parquet(want.folder).toPandas()
        assert_exact_rows(got, want, f"spark ({kind})")


@pytest.mark.slow
@pytest.mark.filterwarnings(SPARK_ON_PANDAS_3)
def test_spark_cannot_read_float16_features(spark, tmp_path):
    """What ``--dtype float16`` means for Spark users (said in extract --help and the README)."""
    ws = Workspace(tmp_path / "ws")
    X = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float16)
    write_featureset(ws, "half", [f"{k:032x}" for k in range(4)], X, dtype="float16")
    assert pq.read_table(ws.featureset_dir("half")).schema.field(S.FEATURE).type.value_type == "halffloat"
    with pytest.raises(Exception, match="FLOAT16"):
        spark.read.parquet(str(ws.featureset_dir("half"))).collect()


def _dedup_tables(ws: Workspace) -> dict[str, Expected]:
    """A dedup run over generated vectors: a group of exact copies, near-copies and one leak."""
    from synthetic import fake_image_id

    from imgfeat.index.dedup import DedupConfig, run_dedup
    from imgfeat.scan.manifest import write_manifest

    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 16)).astype(np.float32)
    X = np.concatenate([X, X[:2] + 0.01 * rng.standard_normal((2, 16)).astype(np.float32)])
    ids = [fake_image_id("d", k) for k in range(len(X))]
    write_featureset(ws, "fs", ids, X, dtype="float32")
    rows = [{"image_id": i, "path": f"train/{k:02d}.png", "split": "train", "status": "ok"} for k, i in enumerate(ids)]
    rows[-1].update(path="test/13.png", split="test")
    rows.append({"image_id": ids[5], "path": "train/again-05.png", "split": "train", "status": "ok"})
    write_manifest(ws, "d", rows, ws.root / "images")
    out = run_dedup(ws, DedupConfig(featureset="fs", dataset="d"), "run1").to_json()
    groups = _rows_of([Path(out["groups_table"]) / f for f in sorted(os.listdir(out["groups_table"]))])
    leaks = _rows_of([Path(out["leaks_table"]) / f for f in sorted(os.listdir(out["leaks_table"]))])
    assert (len(groups), len(leaks)) == (out["grouped_paths"], out["leaks"]) == (6, 1)
    return {
        "groups": Expected(out["groups_table"], groups, S.PATH, S.GROUP_ID),
        "leaks": Expected(out["leaks_table"], leaks, S.PATH, S.NEAREST_PATH),
    }


@pytest.mark.quick
@pytest.mark.parametrize("reader", [*READERS, "polars.read_parquet glob"])
def test_dedup_tables_are_one_folder_each_that_opens_as_exactly_its_rows(ws, reader):
    """Issue 24 item 3: groups and leaks each in a folder holding only Parquet (page and summary elsewhere)."""
    import polars as pl

    read = READERS.get(reader) or (lambda folder: pl.read_parquet(f"{folder}/**/*.parquet").to_pandas())
    for want in _dedup_tables(ws).values():
        assert {p.suffix for p in Path(want.folder).iterdir()} == {".parquet"}
        assert_exact_rows(read(want.folder), want, reader)
