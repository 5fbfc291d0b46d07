"""The head estimators and artifacts: the dense net obeys scikit-learn's contract; artifacts refuse tampering."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from synthetic import BlobSpec, blob_features, write_blob_dataset

from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import load_features
from imgfeat.heads import TrainConfig, load_head, run_train
from imgfeat.heads.artifacts import HEAD_FILE, read_rows
from imgfeat.heads.estimators import KerasMLPClassifier

SPEC = BlobSpec(classes=("cat", "dog", "fox"), per_class=30, dim=32, separation=5.0)


@pytest.fixture(scope="module")
def blobs():
    labels, X, split = blob_features(SPEC)
    y = np.asarray(labels, dtype=object)
    train = split == "train"
    return X[train].astype(np.float32), y[train], X[~train].astype(np.float32), y[~train]


@pytest.fixture(scope="module")
def mlp(blobs):
    X, y, _, _ = blobs
    return KerasMLPClassifier(hidden=32, epochs=15, batch_size=16, learning_rate=0.01, random_state=0).fit(X, y)


def test_mlp_learns_the_blobs_and_exposes_fitted_attributes(mlp, blobs):
    _, _, Xt, yt = blobs
    assert list(mlp.classes_) == ["cat", "dog", "fox"]
    assert mlp.n_features_in_ == SPEC.dim
    assert 1 <= mlp.n_epochs_ <= 15
    assert set(mlp.history_) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    proba = mlp.predict_proba(Xt)
    assert proba.shape == (len(yt), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(mlp.predict(Xt) == yt) >= 0.8  # chance is 1/3


def test_mlp_obeys_the_estimator_contract(mlp):
    est = KerasMLPClassifier(hidden=8, dropout=0.25, random_state=3)
    assert est.__dict__ == est.get_params()  # __init__ stores arguments only
    twin = clone(est)
    assert twin.get_params() == est.get_params() and twin is not est
    twin.set_params(hidden=16, epochs=3)
    assert twin.get_params()["hidden"] == 16 and twin.get_params()["epochs"] == 3
    assert clone(twin).get_params() == twin.get_params()
    with pytest.raises(NotFittedError):
        est.predict(np.zeros((2, 4), np.float32))
    fitted_clone = clone(mlp)
    assert not hasattr(fitted_clone, "model_")  # clone copies parameters, not the fit


def test_mlp_fit_returns_self_and_is_reproducible_with_a_seed(blobs):
    X, y, Xt, _ = blobs
    a = KerasMLPClassifier(hidden=16, epochs=3, random_state=7)
    assert a.fit(X, y) is a
    b = KerasMLPClassifier(hidden=16, epochs=3, random_state=7).fit(X, y)
    np.testing.assert_allclose(a.predict_proba(Xt), b.predict_proba(Xt), atol=1e-5)


def test_mlp_pickles_and_saves_through_its_own_path(mlp, blobs, tmp_path):
    _, _, Xt, _ = blobs
    want = mlp.predict_proba(Xt)
    again = pickle.loads(pickle.dumps(mlp))
    np.testing.assert_allclose(again.predict_proba(Xt), want, atol=1e-6)
    assert again.get_params() == mlp.get_params()
    mlp.save(tmp_path / "m.keras")
    loaded = KerasMLPClassifier.load(tmp_path / "m.keras", list(mlp.classes_), mlp.get_params())
    np.testing.assert_allclose(loaded.predict_proba(Xt), want, atol=1e-6)
    assert list(loaded.predict(Xt)) == list(mlp.predict(Xt))


@pytest.fixture
def small_head(ws: Workspace) -> str:
    write_blob_dataset(ws, "toy", "fs", SPEC)
    return run_train(ws, TrainConfig("toy", "fs", head="logreg", cv=3), "run1").head_id


def test_artifact_round_trip_gives_the_same_predictions(ws, small_head):
    head = load_head(ws, small_head)
    rows = read_rows(ws, small_head).to_pandas()
    test = rows[rows["role"] == "test"]
    ids, X = load_features(ws, "fs", test["image_id"].tolist())
    pred = head.estimator.predict(X)
    # head.json's confusion matrix was computed by the in-memory model before it was saved.
    labels = head.meta["metrics"]["confusion"]["labels"]
    cm = np.zeros((len(labels), len(labels)), int)
    for t, p in zip(test.set_index("image_id").loc[ids, "label"], pred):
        cm[labels.index(t), labels.index(p)] += 1
    assert cm.tolist() == head.meta["metrics"]["confusion"]["matrix"]
    assert head.meta["metrics"]["test_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())


def test_a_tampered_model_file_is_refused(ws, small_head):
    folder = ws.head_dir(small_head)
    model = folder / "model.skops"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    model.write_bytes(bytes(data))
    with pytest.raises(ImgfeatError, match="sha256") as err:
        load_head(ws, small_head)
    assert "modified or corrupted" in str(err.value) and str(folder) in str(err.value)


def test_a_head_without_head_json_does_not_exist(ws, small_head):
    (ws.head_dir(small_head) / HEAD_FILE).unlink()  # a crash before the last write
    with pytest.raises(ConfigError, match="unknown head"):
        load_head(ws, small_head)
