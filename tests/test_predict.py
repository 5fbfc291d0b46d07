"""imgfeat predict: the predictions table's schema, correctness against the head, incremental reruns, image files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import BlobSpec, blob_features, fake_image_id, write_blob_dataset, write_featureset

from imgfeat.cli.main import main
from imgfeat.core import schemas as S
from imgfeat.core.storage import list_shards
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import load_features
from imgfeat.heads import PredictConfig, TrainConfig, load_head, run_predict, run_train
from imgfeat.heads.predict import read_predictions

SPEC = BlobSpec(classes=("cat", "dog", "fox", "owl"), per_class=25, dim=32, separation=5.0, shard_rows=30)
N = 100


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory) -> tuple[Workspace, str]:
    ws = Workspace(tmp_path_factory.mktemp("predict") / "ws")
    write_blob_dataset(ws, "toy", "fs", SPEC)
    return ws, run_train(ws, TrainConfig("toy", "fs", cv=2), "train1").head_id


@pytest.fixture
def headed(ws: Workspace, trained_ws) -> str:
    """A fresh copy of the trained workspace per test (training once is the slow part)."""
    src, head_id = trained_ws
    shutil.copytree(src.root, ws.root, dirs_exist_ok=True)
    return head_id


def test_predict_writes_the_schema_and_agrees_with_the_head(ws, headed):
    out = run_predict(ws, PredictConfig(headed, dataset="toy", top_k=3), "p1")
    assert out.written == N and out.skipped == 0 and out.missing_features == 0
    assert out.rows_per_s > 0
    shards = list_shards(ws.predictions_dir(headed))
    assert shards and all(p.name.startswith("part-p1-") for p in shards)
    assert pq.read_schema(shards[0]).remove_metadata().equals(S.PREDICTIONS_SCHEMA)
    t = read_predictions(ws, headed).to_pandas().set_index(S.IMAGE_ID)
    assert len(t) == N and t.index.is_unique
    head = load_head(ws, headed)
    ids, X = load_features(ws, "fs", t.index.tolist())
    proba = head.estimator.predict_proba(X)
    assert list(t.loc[ids, S.PRED_LABEL]) == list(head.estimator.predict(X))
    np.testing.assert_allclose(t.loc[ids, S.PRED_SCORE].to_numpy(), proba.max(axis=1), rtol=1e-5)
    row = t.iloc[0]
    assert len(row[S.TOPK_LABELS]) == 3 and row[S.TOPK_LABELS][0] == row[S.PRED_LABEL]
    assert list(row[S.TOPK_SCORES]) == sorted(row[S.TOPK_SCORES], reverse=True)
    assert set(t[S.SPLIT]) == {"train", "test"} and t[S.LABEL].notna().all()
    assert set(t[S.HEAD_ID]) == {headed} and set(t[S.FEATURESET]) == {"fs"} and set(t[S.RUN_ID]) == {"p1"}
    assert (t[S.PRED_LABEL] == t[S.LABEL]).mean() >= 0.8  # chance is 0.25


def test_a_rerun_skips_what_is_predicted_and_new_images_only_add_rows(ws, headed):
    run_predict(ws, PredictConfig(headed, dataset="toy"), "p1")
    again = run_predict(ws, PredictConfig(headed, dataset="toy"), "p2")
    assert again.written == 0 and again.skipped == N and again.shards == []
    # 5 new images arrive: in the manifest and in the featureset.
    bigger = BlobSpec(**{**SPEC.__dict__, "per_class": 30})
    write_blob_dataset(ws, "toy", "fs-unused", bigger)  # rewrites the manifest with 120 rows
    labels, X, _ = blob_features(bigger)
    new_ids = [fake_image_id("toy", k) for k in range(len(labels))]
    have = set(read_predictions(ws, headed).column(S.IMAGE_ID).to_pylist())
    fresh = [k for k, i in enumerate(new_ids) if i not in have]
    write_featureset(ws, "fs", [new_ids[k] for k in fresh], X[fresh], run_id="more")
    third = run_predict(ws, PredictConfig(headed, dataset="toy"), "p3")
    assert third.written == len(fresh) == 20 and third.skipped == N
    assert read_predictions(ws, headed).num_rows == 120


def test_images_without_features_are_counted_not_predicted(ws, headed):
    bigger = BlobSpec(**{**SPEC.__dict__, "per_class": 27})
    write_blob_dataset(ws, "toy", "other-fs", bigger)  # 8 manifest rows the head's featureset lacks
    out = run_predict(ws, PredictConfig(headed, dataset="toy"), "p1")
    assert out.written == N and out.missing_features == 8


def test_shards_stay_bounded_and_features_stream_in_chunks(ws, headed):
    out = run_predict(ws, PredictConfig(headed, dataset="toy", chunk_rows=7, shard_rows=40), "p1")
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in list_shards(ws.predictions_dir(headed))]
    assert sum(sizes) == out.written == N and max(sizes) <= 40 + 7 and len(sizes) >= 2


def test_cli_dataset_run_says_when_nothing_is_new(ws, headed, capsys):
    args = ["predict", "--workspace", str(ws.root), "--head", headed, "--dataset", "toy"]
    assert main(args) == 0
    assert f"{N} rows written" in capsys.readouterr().out
    assert main(args) == 0
    assert "nothing new to predict" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 0 and summary["skipped"] == N


def test_cli_unknown_head_exits_2_with_did_you_mean(ws, headed, capsys):
    assert main(["predict", "--workspace", str(ws.root), "--head", headed[:-1], "--dataset", "toy"]) == 2
    assert f"did you mean '{headed}'" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_on_real_photos_and_image_files(tmp_path, capsys):
    """scan -> extract (a small random-weights backbone) -> train -> predict a dataset and loose files."""
    from imgfeat.extract.extract import ExtractConfig, run_extract
    from imgfeat.scan.scan import ScanConfig, run_scan
    from imgfeat.tools.samples import PhotoSetSpec, make_photo_set

    ws = Workspace(tmp_path / "ws")
    spec = PhotoSetSpec(
        classes=(("cat", "chelsea"), ("coffee", "coffee"), ("rocket", "rocket")), per_class=8, min_side=48, max_side=64
    )
    make_photo_set(tmp_path / "photos", spec)
    run_scan(ws, ScanConfig(root=tmp_path / "photos", dataset="photos"), "s1")
    ecfg = ExtractConfig(dataset="photos", backbone="mobilenet_v2", weights="none", input_size=32, batch_size=8)
    fs = run_extract(ws, ecfg, "e1").featureset
    head_id = run_train(ws, TrainConfig("photos", fs, cv=2), "t1").head_id
    assert run_predict(ws, PredictConfig(head_id, dataset="photos"), "p1").written == 24

    loose = tmp_path / "loose"
    make_photo_set(loose, PhotoSetSpec(classes=(("cat", "chelsea"),), per_class=1, min_side=50, max_side=60, seed=7))
    new_photo = next(loose.rglob("*.jpg"))
    known = next((tmp_path / "photos").rglob("*.jpg"))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    code = main(["predict", "--workspace", str(ws.root), "--head", head_id, str(new_photo), str(known), str(bad)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    head = load_head(ws, head_id)
    assert any(line.startswith(f"{new_photo}: ") and line.endswith("%)") for line in out)
    assert any(line.startswith(f"{bad}: error ") for line in out)
    # The new photo's features went into the featureset cache, and its row into the files table,
    # apart from the dataset's: each row says where it belongs.
    t = read_predictions(ws, head_id, files=True).to_pandas()
    row = t[t[S.PATH] == new_photo.as_posix()]
    assert len(row) == 1 and row[S.LABEL].isna().all()
    _ids, X = load_features(ws, fs, row[S.IMAGE_ID].tolist())
    assert row[S.PRED_LABEL].iloc[0] == head.estimator.predict(X)[0]
    assert len(t) == 2 and set(t[S.DATASET]) == {S.FILES_DATASET}  # the broken file has no row
    dataset_rows = read_predictions(ws, head_id).to_pandas()
    assert len(dataset_rows) == 24 and set(dataset_rows[S.DATASET]) == {"photos"}

    # A folder (walked like scan) and a glob, by the head's name: every image gets a line.
    args = ["predict", "--workspace", str(ws.root), "--head", "photos-logreg", "--json"]
    assert main([*args, str(loose), str(tmp_path / "photos" / "**" / "*.jpg")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["head_id"] == head_id and summary["files"] == 25 and summary["errors"] == 0
    assert summary["written"] == 23 and summary["skipped"] == 2  # new_photo and known were done

    # Only bad files and a pattern matching nothing: lines and a summary, exit 0, no traceback.
    assert main([*args[:-1], str(bad), str(tmp_path / "nothing" / "*.png")]) == 0
    captured = capsys.readouterr()
    assert f"{bad}: error " in captured.out and "no_match" in captured.out
    assert "2 files: 0 predicted, 2 errors" in captured.out
    assert "Traceback" not in captured.err and "could be predicted" in captured.err

    # A path that never existed is said to be missing (not "no longer exists"), and, being no fact
    # about any image's content, stays out of the shared featureset's error table: ls counts what it holds.
    never = tmp_path / "never.jpg"
    assert main([*args[:-1], str(never)]) == 0
    assert f"{never}: error not_found: {never}: no such file or folder" in capsys.readouterr().out
    from imgfeat.extract.featureset import read_errors

    errors = read_errors(ws, fs)
    assert errors.num_rows == 1 and errors.column(S.IMAGE_ID).null_count == 0  # broken.jpg's bytes, once
    assert main(["ls", "--workspace", str(ws.root), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["featuresets"]
    assert entry["errors"] == errors.num_rows


def test_tables_written_before_the_dataset_column_still_read(ws, headed):
    from imgfeat.core.commits import commits_dir
    from imgfeat.core.storage import write_table_atomic

    run_predict(ws, PredictConfig(headed, dataset="toy"), "p1")
    folder = ws.predictions_dir(headed)
    (shard,) = list_shards(folder)
    old = pq.read_table(shard).drop_columns([S.DATASET])  # as an older imgfeat wrote it: no commit records
    shard.unlink()
    shutil.rmtree(commits_dir(folder))
    write_table_atomic(old, folder / shard.name)
    t = read_predictions(ws, headed)
    assert t.schema.equals(S.PREDICTIONS_SCHEMA) and t.num_rows == N and t.column(S.DATASET).null_count == N
    again = run_predict(ws, PredictConfig(headed, dataset="toy"), "p2")
    assert again.written == 0 and again.skipped == N  # old rows still count as predicted


def test_a_predictions_shard_a_dead_run_left_unrecorded_is_left_out_then_adopted(ws, headed, caplog):
    """Predictions are committed as features are: shard, then record. A shard whose writer died
    before its record is no prediction yet (readers leave it out, saying so); the next predict
    verifies it and adopts it rather than predicting its rows again."""
    import logging

    import pandas as pd

    from imgfeat.core.commits import record_path

    run_predict(ws, PredictConfig(headed, dataset="toy", shard_rows=40), "p1")
    shards = list_shards(ws.predictions_dir(headed))
    assert len(shards) == 3 and all(record_path(p).is_file() for p in shards)
    record_path(shards[1]).unlink()  # as if killed between the shard and its record
    caplog.set_level(logging.WARNING)
    assert read_predictions(ws, headed).num_rows == N - 40
    assert shards[1].name in caplog.text

    again = run_predict(ws, PredictConfig(headed, dataset="toy", shard_rows=40), "p2")
    assert again.written == 0 and again.skipped == N  # adopted, not predicted twice
    assert record_path(shards[1]).is_file()
    assert read_predictions(ws, headed).num_rows == N
    assert len(pd.read_parquet(ws.predictions_dir(headed))) == N  # a raw reader: exactly the rows


def test_a_planted_copy_of_a_predictions_shard_is_ignored_then_set_aside(ws, headed):
    """Before, a copy dropped into the folder doubled its rows for every reader."""
    import pandas as pd

    from imgfeat.core.commits import rejected_dir

    run_predict(ws, PredictConfig(headed, dataset="toy", shard_rows=40), "p1")
    folder = ws.predictions_dir(headed)
    first = list_shards(folder)[0]
    shutil.copy(first, folder / "part-0000.parquet")
    t = read_predictions(ws, headed)
    assert t.num_rows == N and len(set(t.column(S.IMAGE_ID).to_pylist())) == N
    run_predict(ws, PredictConfig(headed, dataset="toy"), "p2")
    assert (rejected_dir(folder) / "part-0000.parquet").is_file()  # moved out, never deleted
    assert len(pd.read_parquet(folder)) == N
