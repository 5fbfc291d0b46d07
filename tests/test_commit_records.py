"""Commit records (issue 23, F24) and non-finite features (F16): readers take only shards recorded as
committed and still matching their record; a planted, edited or half-committed shard is left out
and named, then set right by the next writer; NaN or inf features are refused at extract and left
out by every reader."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_decode import hang_guard
from tiny_images import write_noise_images

from imgfeat.core import schemas as S
from imgfeat.core.commits import commits_dir, record_path, rejected_dir
from imgfeat.core.storage import list_shards
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import committed_ids, load_features, read_errors
from imgfeat.scan.scan import ScanConfig, run_scan

BACKBONE, SIZE, N = "mobilenet_v2", 32, 18


def cfg(**kw):
    from imgfeat.extract.extract import ExtractConfig

    base = dict(dataset="d", backbone=BACKBONE, weights="none", input_size=SIZE, batch_size=6, shard_size=6, workers=1)
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory, keras_home):
    """18 generated 32 px PNGs in two classes, train/test split, extracted into 3 shards of 6."""
    from imgfeat.extract.extract import run_extract

    root = tmp_path_factory.mktemp("commit_ws")
    ws = Workspace(root / "ws")
    images = root / "imgs"
    write_noise_images(images / "train", 12, size=(32, 32), fmt="PNG", classes=("a", "b"))
    write_noise_images(images / "test", 6, seed=100, size=(32, 32), fmt="PNG", classes=("a", "b"))
    run_scan(ws, ScanConfig(root=images, dataset="d"), "scan")
    out = run_extract(ws, cfg(), "r1").to_json()
    assert out["extracted"] == N
    ids, X = load_features(ws, out["featureset"])
    assert len(ids) == N and np.ptp(X, axis=0).max() > 0  # the features carry signal
    return ws, out["featureset"], dict(zip(ids, X))


@pytest.fixture
def copy(built, tmp_path, monkeypatch):
    """A private copy of the built workspace (its images stay where the manifest says)."""
    ws, fs, genuine = built
    shutil.copytree(ws.root, tmp_path / "ws")
    monkeypatch.setenv("IMGFEAT_WORKSPACE", str(tmp_path / "ws"))
    import imgfeat.core.logs as logs

    monkeypatch.setattr(logs, "_SAID", set())  # one warning per run: each test is a run
    return Workspace(tmp_path / "ws"), fs, genuine


def forged(shard: Path, value: float = 0.5) -> pa.Table:
    """The shard's rows with every feature set to ``value``, its footer (provenance) kept."""
    t = pq.read_table(shard)
    feature = t.column(S.FEATURE).combine_chunks()
    values = pa.array(np.full(len(feature.flatten()), value, dtype=np.float32))
    feature = pa.FixedSizeListArray.from_arrays(values, feature.type.list_size)
    return pa.Table.from_arrays([t.column(0), feature], schema=t.schema)


def same_as_genuine(ids, X, genuine) -> None:
    assert sorted(ids) == sorted(genuine)
    for i, x in zip(ids, X):
        np.testing.assert_array_equal(x, genuine[i])


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_a_planted_copy_of_a_shard_is_left_out_and_named_by_every_reader(copy, caplog):
    """F24: before, the copy (sorted first) replaced 6 genuine rows with 0.5s, with no warning."""
    import imgfeat
    from imgfeat.index.vectors import read_vectors

    ws, fs, genuine = copy
    first = list_shards(ws.featureset_dir(fs))[0]
    pq.write_table(forged(first), ws.featureset_dir(fs) / "part-0000.parquet")
    caplog.set_level(logging.WARNING)

    same_as_genuine(*imgfeat.Featureset(fs, workspace=ws.root).to_numpy(), genuine)
    assert imgfeat.Featureset(fs, workspace=ws.root).to_arrow().num_rows == N
    ids, _ = read_vectors(ws, fs)
    assert sorted(ids) == sorted(genuine) and committed_ids(ws, fs) == set(genuine)
    said = warnings_of(caplog)
    assert "part-0000.parquet" in said and said.count("part-0000.parquet") == 1  # once per run


def test_an_edited_shard_is_left_out_then_set_aside_and_extracted_again(copy, caplog):
    """F24: a shard rewritten in place (same name, same footer) no longer matches its record."""
    from imgfeat.extract.extract import run_extract

    ws, fs, genuine = copy
    first = list_shards(ws.featureset_dir(fs))[0]
    lost = set(pq.read_table(first).column(S.IMAGE_ID).to_pylist())
    pq.write_table(forged(first), first)
    caplog.set_level(logging.WARNING)

    ids, _X = load_features(ws, fs)
    assert set(ids) == set(genuine) - lost and first.name in warnings_of(caplog)
    assert committed_ids(ws, fs) == set(genuine) - lost  # the plan reads ids only: the footer check

    out = run_extract(ws, cfg(), "r2").to_json()
    assert out["extracted"] == len(lost) and out["reused"] == N - len(lost)
    assert out["commit_records"] == {"recorded": 0, "adopted": 0, "set_aside": 1}
    assert (rejected_dir(ws.featureset_dir(fs)) / first.name).is_file()  # moved aside, not deleted
    raw = pd.read_parquet(ws.featureset_dir(fs))  # a raw reader: exactly the featureset's rows
    assert sorted(raw.image_id) == sorted(genuine)
    same_as_genuine(*load_features(ws, fs), genuine)


def test_a_shard_left_unrecorded_by_a_crash_is_adopted_and_a_planted_copy_set_aside(copy, caplog):
    """Shard first, record last: a writer killed between the two leaves an unrecorded shard, which
    readers leave out and the next writer (under the lock) adopts, since it verifies; a copy of a
    committed shard repeats its ids and is moved out of the folder instead."""
    from imgfeat.extract.extract import run_extract

    ws, fs, genuine = copy
    shards = list_shards(ws.featureset_dir(fs))
    record_path(shards[1]).unlink()  # as if killed between the shard's rename and its record
    plant = ws.featureset_dir(fs) / "part-0000.parquet"
    shutil.copy(shards[0], plant)
    caplog.set_level(logging.WARNING)
    assert len(load_features(ws, fs)[0]) == N - 6 and shards[1].name in warnings_of(caplog)

    out = run_extract(ws, cfg(), "r2").to_json()
    assert out["extracted"] == 0 and out["reused"] == N  # adopted: nothing extracted again
    assert out["commit_records"] == {"recorded": 0, "adopted": 1, "set_aside": 1}
    assert record_path(shards[1]).is_file() and not plant.exists()
    assert (rejected_dir(ws.featureset_dir(fs)) / plant.name).is_file()
    assert sorted(pd.read_parquet(ws.featureset_dir(fs)).image_id) == sorted(genuine)
    same_as_genuine(*load_features(ws, fs), genuine)


def test_a_featureset_written_before_records_reads_with_a_warning_and_is_recorded_by_the_next_writer(copy, caplog):
    from imgfeat.extract.extract import run_extract

    ws, fs, genuine = copy
    for folder in (ws.featureset_dir(fs), ws.featureset_errors_dir(fs)):
        shutil.rmtree(commits_dir(folder), ignore_errors=True)
    caplog.set_level(logging.WARNING)
    same_as_genuine(*load_features(ws, fs), genuine)
    assert "written before commit records existed" in warnings_of(caplog)

    out = run_extract(ws, cfg(), "r2").to_json()
    assert out["extracted"] == 0 and out["commit_records"] == {"recorded": 3, "adopted": 0, "set_aside": 0}
    shards = list_shards(ws.featureset_dir(fs))
    assert len(shards) == 3 and all(record_path(p).is_file() for p in shards)
    rec = json.loads(record_path(shards[0]).read_text())
    assert rec["rows"] == 6 and rec["name"] == shards[0].name and rec["nonfinite"] == 0
    pq.write_table(forged(shards[0]), ws.featureset_dir(fs) / "part-0000.parquet")  # now ignored
    same_as_genuine(*load_features(ws, fs), genuine)


def test_every_writer_records_its_shards_feature_and_error_shards_alike(copy, tmp_path):
    """The driver's writer, error rows and ``predict FILE``'s extract_files all commit through
    commit_shard: each shard has a record that matches it."""
    from imgfeat.core.commits import matches, read_record
    from imgfeat.extract.extract import extract_files

    ws, fs, _genuine = copy
    new = write_noise_images(tmp_path / "new", 2, seed=500, size=(32, 32), fmt="PNG")
    (tmp_path / "new" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    results = extract_files(ws, fs, [*map(str, new), str(tmp_path / "new" / "bad.png")], "r3")
    assert [r.error_code is None for r in results] == [True, True, False]  # bad.png: an error row
    folders = (ws.featureset_dir(fs), ws.featureset_errors_dir(fs))
    shards = [p for f in folders for p in list_shards(f)]
    assert len(list_shards(folders[0])) == 4 and list_shards(folders[1])
    assert all(matches(p, read_record(p)) for p in shards)
    assert len(load_features(ws, fs)[0]) == N + 2 and len(read_errors(ws, fs)) == 1
    # Error shards are held to the same rule: a copy under another name is not an error row twice.
    shutil.copy(list_shards(folders[1])[0], folders[1] / "part-0000.parquet")
    assert len(read_errors(ws, fs)) == 1


# ------------------------------------------------------------------------------- F16: NaN and inf


def nan_weights(path: Path) -> Path:
    """mobilenet_v2's weights (32 px, random init) with its last convolution's kernel all NaN."""
    from imgfeat.backbones import build_model, get_backbone

    model = build_model(get_backbone(BACKBONE), "none", SIZE, "avg")
    layer = model.get_layer("Conv_1")  # the last convolution, before its BatchNorm and the pooling
    layer.set_weights([np.full_like(w, np.nan) for w in layer.get_weights()])
    model.save_weights(str(path))
    return path


def test_non_finite_features_are_refused_at_extract_as_error_rows(copy, tmp_path):
    """F16: before, NaN rows were committed and crashed index --kind ivf, train --head svm, predict."""
    from imgfeat.extract.extract import run_extract

    ws, _, genuine = copy
    out = run_extract(ws, cfg(weights=str(nan_weights(tmp_path / "nan.weights.h5"))), "r2").to_json()
    fs = out["featureset"]
    assert out["extracted"] == 0 and out["errors"]["by_code"] == {S.ERROR_NON_FINITE: N}
    errors = read_errors(ws, fs)
    assert set(errors.column(S.ERROR_CODE).to_pylist()) == {S.ERROR_NON_FINITE}
    assert set(errors.column(S.STAGE).to_pylist()) == {S.STAGE_MODEL}
    assert sorted(errors.column(S.IMAGE_ID).to_pylist()) == sorted(genuine)
    assert load_features(ws, fs)[0].size == 0
    again = run_extract(ws, cfg(weights=str(tmp_path / "nan.weights.h5")), "r3").to_json()
    assert again["extracted"] == 0 and again["errors"]["known"] == N  # final, like a decode error


def test_non_finite_rows_already_in_a_shard_are_left_out_by_every_reader(copy, caplog):
    """F16: a featureset written before extract refused them (no records: legacy) with 3 NaN rows
    and 1 inf row. Index (flat and ivf), train svm, predict and dedup leave them out with a warning,
    and the next extract writes those images again."""
    import imgfeat
    from imgfeat.extract.extract import run_extract
    from imgfeat.heads.predict import PredictConfig, run_predict
    from imgfeat.heads.train import TrainConfig, run_train
    from imgfeat.index.build import IndexConfig, build_index
    from imgfeat.index.dedup import DedupConfig, run_dedup

    ws, fs, genuine = copy
    for folder in (ws.featureset_dir(fs), ws.featureset_errors_dir(fs)):
        shutil.rmtree(commits_dir(folder), ignore_errors=True)
    shard = list_shards(ws.featureset_dir(fs))[0]
    t = pq.read_table(shard)
    X = np.stack(t.column(S.FEATURE).to_numpy(zero_copy_only=False)).astype(np.float32)
    X[0, 3], X[1, :] = np.nan, np.nan
    X[2, 0], X[3, 7] = np.inf, -np.inf
    bad = set(t.column(S.IMAGE_ID).to_pylist()[:4])
    feature = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])
    pq.write_table(pa.Table.from_arrays([t.column(0), feature], schema=t.schema), shard)
    caplog.set_level(logging.WARNING)

    ids, X = imgfeat.Featureset(fs, workspace=ws.root).to_numpy()
    assert set(ids) == set(genuine) - bad and np.isfinite(X).all()
    assert imgfeat.Featureset(fs, workspace=ws.root).to_arrow().num_rows == N - 4
    assert committed_ids(ws, fs) == set(genuine) - bad
    assert "left out 4 feature row(s)" in warnings_of(caplog)
    for kind in ("flat", "ivf"):
        built = build_index(ws, IndexConfig(fs, ("d",), name=kind, kind=kind, nlist=2), "r2")
        assert built.rows == N - 4 and built.missing_features == 4
    head = run_train(ws, TrainConfig("d", fs, head="svm", cv=2), "r2")
    assert head.metrics["test_accuracy"] is not None
    pred = run_predict(ws, PredictConfig(head.head_id, dataset="d"), "r2")
    assert pred.written == N - 4 and pred.missing_features == 4
    rows = pd.read_parquet(ws.predictions_dir(head.head_id))
    assert set(rows.image_id) == set(genuine) - bad
    dedup = run_dedup(ws, DedupConfig(fs, "d", threshold=0.99), "r2")
    assert dedup.images == N - 4 and dedup.missing_features == 4

    out = run_extract(ws, cfg(), "r3").to_json()  # records the legacy shards, then writes the 4 images again
    assert out["extracted"] == 4
    assert json.loads(record_path(shard).read_text())["nonfinite"] == 4
    ids, X = load_features(ws, fs)
    assert set(ids) == set(genuine) and np.isfinite(X).all()
    assert committed_ids(ws, fs) == set(genuine)


@pytest.mark.quick
def test_finite_rows_finds_nan_and_inf_and_keeps_huge_finite_values():
    """The one vectorised check every reader and the writer use (a float64 row sum)."""
    from imgfeat.extract.featureset import finite_rows
    from imgfeat.extract.shards import refuse_non_finite

    X = np.ones((5, 1280), dtype=np.float32)
    X[0] = np.finfo(np.float32).max  # finite: the float64 sum must not overflow into inf
    X[1, 5], X[2, 0], X[3, -1] = np.nan, np.inf, -np.inf
    feature = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 1280)
    assert finite_rows(feature).tolist() == [True, False, False, False, True]
    ids, kept, errors = refuse_non_finite(list("abcde"), X, "r1")
    assert ids == ["a", "e"] and kept.shape == (2, 1280)
    assert [(e.image_id, e.stage, e.error_code) for e in errors] == [
        (i, S.STAGE_MODEL, S.ERROR_NON_FINITE) for i in "bcd"
    ]


def test_a_fifo_or_a_link_named_like_a_shard_never_blocks_or_is_followed(copy, tmp_path, caplog):
    """Listing opens shards without following links and without blocking: a FIFO named like a shard
    is left out at once (before, reading its footer would wait for a writer for ever)."""
    import os

    from imgfeat.extract.featureset import reconcile_commits

    ws, fs, genuine = copy
    folder = ws.featureset_dir(fs)
    os.mkfifo(folder / "part-0000.parquet")
    (folder / "part-0001.parquet").symlink_to(list_shards(folder)[-1])
    caplog.set_level(logging.WARNING)
    with hang_guard(60):
        same_as_genuine(*load_features(ws, fs), genuine)
        assert "part-0000.parquet" in warnings_of(caplog) and "part-0001.parquet" in warnings_of(caplog)
        features, _ = reconcile_commits(ws, fs)  # what the next writer does under the lock
    assert sorted(features.set_aside) == ["part-0000.parquet", "part-0001.parquet"]
    assert sorted(os.listdir(rejected_dir(folder))) == ["part-0000.parquet", "part-0001.parquet"]
    same_as_genuine(*load_features(ws, fs), genuine)
