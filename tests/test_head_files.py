"""Head files without pickles: skops for scikit-learn heads, old joblib heads only behind --trust-pickle."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest

from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.storage import write_json_atomic

HEAD = "toy-logreg-00000001"


def _fitted(kind: str, kernel: str = "linear"):
    from imgfeat.heads.estimators import sklearn_head

    rng = np.random.default_rng(0)
    codes = np.tile([0, 1, 2], 20)
    y = np.array(["cat", "dog", "fox"], dtype=object)[codes]
    X = rng.normal(size=(60, 8)).astype(np.float32)
    X[np.arange(60), codes] += 3.0  # one informative feature per class
    est, _ = sklearn_head(kind, kernel, None, 0, 1000, 3)
    return est.fit(X, y), X


def _write_new(ws, est):
    from imgfeat.heads.artifacts import write_head

    rows = pa.table({"image_id": ["a"], "label": ["cat"], "role": ["train"]})
    meta = {"head_id": HEAD, "featureset": "fs", "classes": ["cat", "dog", "fox"]}
    write_head(ws, HEAD, est, meta, {}, rows, {})


def _write_old(ws, blob: bytes, recorded_sha: str | None = None) -> None:
    """A head as imgfeat wrote it before: model.joblib, its sha256 in head.json."""
    folder = ws.head_dir(HEAD)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.joblib").write_bytes(blob)
    write_json_atomic(
        {
            "head_id": HEAD,
            "featureset": "fs",
            "classes": ["cat", "dog", "fox"],
            "model_file": "model.joblib",
            "model_format": "joblib",
            "model_sha256": recorded_sha or hashlib.sha256(blob).hexdigest(),
        },
        folder / "head.json",
    )


def _joblib_bytes(obj) -> bytes:
    import joblib

    buf = io.BytesIO()
    joblib.dump(obj, buf)
    return buf.getvalue()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind,kernel", [("logreg", "linear"), ("svm", "linear"), ("svm", "rbf")])
def test_a_skops_head_predicts_exactly_what_the_joblib_head_did(ws, tmp_path, caplog, kind, kernel):
    from imgfeat.heads.artifacts import load_head

    est, X = _fitted(kind, kernel)
    _write_new(ws, est)
    assert (ws.head_dir(HEAD) / "model.skops").is_file()
    assert not (ws.head_dir(HEAD) / "model.joblib").exists()
    new = load_head(ws, HEAD)
    assert new.meta["model_format"] == "skops"
    old_ws = type(ws)(tmp_path / "old")
    _write_old(old_ws, _joblib_bytes(est))
    old = load_head(old_ws, HEAD, trust_pickle=True)
    assert "--trust-pickle" in caplog.text and "can run code" in caplog.text
    np.testing.assert_array_equal(new.estimator.predict_proba(X), old.estimator.predict_proba(X))
    np.testing.assert_array_equal(new.estimator.predict(X), old.estimator.predict(X))
    assert len(set(new.estimator.predict(X))) == 3  # the head learned something to compare


def test_a_malicious_joblib_head_with_its_sha256_rewritten_runs_nothing(ws, tmp_path):
    from imgfeat.heads.artifacts import load_head

    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Evil(str(marker)))
    _write_old(ws, blob)  # the tamperer rewrote model_sha256 to match
    with pytest.raises(ConfigError) as err:
        load_head(ws, HEAD)
    msg = str(err.value)
    assert "pickle" in msg and "--trust-pickle" in msg and "imgfeat train" in msg and err.value.exit_code == 2
    assert not marker.exists(), "loading a head ran code"


def test_predict_and_report_refuse_an_old_pickle_head_with_exit_2(ws, tmp_path, capsys):
    from imgfeat.cli.main import main

    marker = tmp_path / "pwned"
    _write_old(ws, pickle.dumps(_Evil(str(marker))))
    for argv in (["predict", "--head", HEAD, "--dataset", "toy"], ["report", "--head", HEAD]):
        assert main([*argv, "--workspace", str(ws.root), "--json"]) == 2
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert "--trust-pickle" in out["error"] and "Traceback" not in out["error"]
    assert not marker.exists()


def test_a_skops_file_naming_other_types_is_refused(ws):
    import skops.io

    from imgfeat.heads.artifacts import load_head

    blob = skops.io.dumps({"f": os.system})
    folder = ws.head_dir(HEAD)
    folder.mkdir(parents=True)
    (folder / "model.skops").write_bytes(blob)
    write_json_atomic(
        {
            "head_id": HEAD,
            "featureset": "fs",
            "classes": ["a"],
            "model_file": "model.skops",
            "model_format": "skops",
            "model_sha256": hashlib.sha256(blob).hexdigest(),
        },
        folder / "head.json",
    )
    with pytest.raises(ImgfeatError, match=r"refusing to load head .*system"):
        load_head(ws, HEAD)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"head_id": "x"}', "\udcff"])
def test_a_corrupt_head_json_names_the_file_and_the_way_out(ws, text):
    from imgfeat.heads.artifacts import load_head

    folder = ws.head_dir(HEAD)
    folder.mkdir(parents=True)
    (folder / "head.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ImgfeatError) as err:
        load_head(ws, HEAD)
    assert str(folder / "head.json") in str(err.value) and "imgfeat train" in str(err.value)


def test_a_corrupt_rows_table_names_the_file_and_the_way_out(ws):
    from imgfeat.heads.artifacts import ROWS_FILE, read_rows

    est, _ = _fitted("logreg")
    _write_new(ws, est)
    path = ws.head_dir(HEAD) / ROWS_FILE
    path.write_bytes(b"garbage")
    with pytest.raises(ImgfeatError) as err:
        read_rows(ws, HEAD)
    assert str(path) in str(err.value) and "imgfeat train" in str(err.value)


def test_a_keras_head_with_a_lambda_layer_is_refused_without_running_it(ws, tmp_path):
    import keras

    from imgfeat.heads.artifacts import load_head

    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').close() or x"
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Lambda(lambda x: eval(code)),  # noqa: S307
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.save(tmp_path / "evil.keras")
    blob = (tmp_path / "evil.keras").read_bytes()
    marker.unlink(missing_ok=True)  # building the model ran the lambda once, here, on purpose
    folder = ws.head_dir(HEAD)
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(blob)
    write_json_atomic(
        {
            "head_id": HEAD,
            "featureset": "fs",
            "classes": ["a", "b"],
            "model_file": "model.keras",
            "model_format": "keras",
            "model_sha256": hashlib.sha256(blob).hexdigest(),
        },
        folder / "head.json",
    )
    with pytest.raises(ImgfeatError, match="safe mode"):
        load_head(ws, HEAD)
    assert not marker.exists(), "loading a .keras head ran its Lambda"
