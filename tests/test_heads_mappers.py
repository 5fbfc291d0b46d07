"""Heads' pure pieces on small synthetic arrays: the manifest join and split, fit_head, evaluate.

scikit-learn is imported inside the tests (through imgfeat.heads), so that collecting the quick
tier stays fast.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError

pytestmark = pytest.mark.quick


def manifest(rows: list[tuple]) -> pa.Table:
    """(image_id, path, label, split, status) tuples as a manifest table."""
    keys = (S.IMAGE_ID, S.PATH, S.LABEL, S.SPLIT, S.STATUS)
    return pa.Table.from_pylist([dict(zip(keys, r)) for r in rows], schema=S.MANIFEST_SCHEMA)


def labelled(rows, features=None, test_fraction=0.0, seed=0):
    from imgfeat.heads.data import labelled_rows

    table = manifest(rows)
    ids = set(table.column(S.IMAGE_ID).to_pylist()) - {None} if features is None else set(features)
    return labelled_rows(table, ids, test_fraction, seed, "d")


def split_rows(n_per_class: int = 4) -> list[tuple]:
    out = []
    for c, label in enumerate(("cat", "dog")):
        for i in range(n_per_class):
            split = S.SPLIT_TEST if i == 0 else S.SPLIT_TRAIN
            out.append((f"{c}{i:031d}", f"{split}/{label}/{i}.jpg", label, split, S.STATUS_OK))
    return out


def blobs(n_per_class: int = 20, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs: any sane classifier scores 1.0 on them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (3, dim))
    X = np.concatenate([c + rng.normal(0, 0.5, (n_per_class, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.array(["a", "b", "c"], dtype=object), n_per_class)
    return X, y


# ---------------------------------------------------------------- join and split


def test_split_folders_decide_train_and_test():
    rows = labelled(split_rows())
    assert rows.eval_split == S.SPLIT_TEST
    assert len(rows.train_ids) == 6 and len(rows.test_ids) == 2
    assert list(rows.train_ids) == sorted(rows.train_ids) and rows.classes == ["cat", "dog"]


def test_unreadable_duplicate_and_unlabelled_rows_are_counted_not_used():
    base = split_rows()
    extra = [
        (None, "train/cat/gone.jpg", "cat", S.SPLIT_TRAIN, S.STATUS_UNREADABLE),
        (base[1][0], "train/cat/copy.jpg", "cat", S.SPLIT_TRAIN, S.STATUS_OK),  # same bytes, second path
        ("f" * 32, "loose.jpg", None, None, S.STATUS_OK),
    ]
    rows = labelled(base + extra)
    assert rows.left_out["not_readable"] == 1 and rows.left_out["duplicates"] == 1
    assert rows.left_out["unlabelled"] == 1 and len(rows.train_ids) == 6


def test_rows_without_features_are_left_out():
    base = split_rows()
    have = [r[0] for r in base][1:]
    rows = labelled(base, features=have)
    assert rows.left_out["missing_features"] == 1 and base[0][0] not in set(rows.train_ids) | set(rows.test_ids)


def test_missing_features_are_the_cause_named_first_not_the_dataset():
    """A half-extracted dataset used to fail with "class 'dog' has 1 image(s) ...: add images"."""
    base = split_rows()
    dogs_but_one = [r[0] for r in base if r[2] == "cat"] + [base[-1][0]]
    with pytest.raises(ConfigError) as err:
        labelled(base, features=dogs_but_one)
    text = str(err.value)
    assert text.startswith("3 of the 8 labelled images of dataset 'd' have no features")
    assert "imgfeat extract --dataset d" in text and "class 'dog'" in text  # the consequence comes after
    with pytest.raises(ConfigError, match=r"^8 of the 8 labelled images of dataset 'd' have no features"):
        labelled(base, features=[])


def test_a_lasting_warning_is_said_once_per_run_not_at_every_read(ws, caplog):
    """Each stage of a run reads the featureset's shards and the manifest's images again: a stray
    shard or a label conflict was warned about six times in one run."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import fake_image_id, write_featureset

    from imgfeat.extract.featureset import feature_shards
    from imgfeat.heads.data import unique_images

    X = np.ones((2, 4), dtype=np.float32)
    write_featureset(ws, "fa", [fake_image_id("a", k) for k in range(2)], X)
    write_featureset(ws, "fb", [fake_image_id("b", k) for k in range(2)], X)
    stray = next(ws.featureset_dir("fb").glob("part-*.parquet"))
    shutil.copy(stray, ws.featureset_dir("fa") / stray.name.replace("part-", "part-zz"))
    conflict = manifest(
        [("a" * 32, "x/1.jpg", "cat", None, S.STATUS_OK), ("a" * 32, "y/1.jpg", "dog", None, S.STATUS_OK)]
    )
    with caplog.at_level("WARNING"):
        for _ in range(6):
            assert len(feature_shards(ws, "fa")) == 1
            unique_images(conflict)
    said = [r.getMessage() for r in caplog.records]
    assert sum("ignoring" in m and "part-zz" in m for m in said) == 1  # unrecorded (or foreign): said once
    assert sum("appear under several labels" in m for m in said) == 1


def test_without_splits_a_fraction_is_held_out_stratified_and_seeded():
    rows = [
        (f"{c}{i:031d}", f"{lab}/{i}.jpg", lab, None, S.STATUS_OK)
        for c, lab in enumerate(("cat", "dog"))
        for i in range(10)
    ]
    a, b = labelled(rows, test_fraction=0.2), labelled(rows, test_fraction=0.2)
    assert a.eval_split == "held_out" and len(a.test_ids) == 4 and sorted(set(a.test_labels)) == ["cat", "dog"]
    assert a.digest() == b.digest()
    assert labelled(rows, test_fraction=0.2, seed=1).digest() != a.digest()


def test_test_fraction_zero_leaves_no_evaluation_rows():
    rows = [
        (f"{c}{i:031d}", f"{lab}/{i}.jpg", lab, None, S.STATUS_OK)
        for c, lab in enumerate(("cat", "dog"))
        for i in range(3)
    ]
    out = labelled(rows, test_fraction=0.0)
    assert len(out.test_ids) == 0 and out.eval_split is None and len(out.train_ids) == 6


@pytest.mark.parametrize(
    "rows, words",
    [
        ([("a" * 32, "x.jpg", None, None, S.STATUS_OK)], "has no labels"),
        ([(f"{i:032d}", f"cat/{i}.jpg", "cat", None, S.STATUS_OK) for i in range(4)], "one class only"),
        (
            [("a" * 32, "cat/1.jpg", "cat", None, S.STATUS_OK)]
            + [(f"{i:032d}", f"dog/{i}.jpg", "dog", None, S.STATUS_OK) for i in range(3)],
            "class 'cat' has 1",
        ),
    ],
)
def test_unusable_label_sets_are_config_errors_that_say_why(rows, words):
    with pytest.raises(ConfigError, match=words):
        labelled(rows)


# ---------------------------------------------------------------- fit_head and evaluate


def test_fit_head_cross_validates_and_refits_on_every_row():
    from imgfeat.heads.fit import fit_head
    from imgfeat.heads.train import TrainConfig

    X, y = blobs()
    fitted = fit_head(TrainConfig(dataset="d", featureset="f", cv=3, n_jobs=1), X, y)
    assert fitted.kind == "logreg" and fitted.cv["logreg"]["mean"] == 1.0
    assert len(fitted.cv["logreg"]["folds"]) == 3 and "C" in fitted.chosen
    assert list(fitted.estimator.predict(X)) == list(y)


def _blob_split(separation: float, per_class: int = 60):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import BlobSpec, blob_features

    y, X, split = blob_features(BlobSpec(per_class=per_class, dim=64, separation=separation, dtype="float32", seed=1))
    y, train = np.asarray(y, dtype=object), split == "train"
    return X[train], y[train], X[~train], y[~train]


def _confidence_when_right(estimator, X, y) -> float:
    proba = estimator.predict_proba(X)
    right = estimator.classes_[proba.argmax(axis=1)] == y
    return float(proba.max(axis=1)[right].mean())


def test_logreg_chooses_c_by_log_loss_so_right_answers_are_confident():
    """Accuracy is flat over C on separable classes; the old tie-break took C = 1e-4 and squeezed
    every probability towards uniform (0.34 for 3 classes here). Log-loss does not tie."""
    from imgfeat.heads.fit import fit_head
    from imgfeat.heads.train import TrainConfig

    X, y, X_test, y_test = _blob_split(separation=4.0)
    fitted = fit_head(TrainConfig(dataset="d", featureset="f", cv=3, n_jobs=1), X, y)
    grid = fitted.cv["logreg"]["grid"]
    assert fitted.chosen["C"] > min(float(c) for c in grid) and fitted.cv["logreg"]["chosen_by"] == "log_loss"
    assert all({"accuracy", "log_loss"} <= set(v) for v in grid.values())
    smallest = fit_head(TrainConfig(dataset="d", featureset="f", cv=3, n_jobs=1, c_grid=(1e-4,)), X, y)
    old, new = (_confidence_when_right(f.estimator, X_test, y_test) for f in (smallest, fitted))
    assert old < 0.45 and new > 0.75, (old, new)
    assert (fitted.estimator.predict(X_test) == y_test).mean() >= 0.8


def test_the_c_grid_grows_past_the_edge_its_best_value_sits_on_a_bounded_number_of_times():
    from imgfeat.heads import fit
    from imgfeat.heads.estimators import LOGREG_C_GRID
    from imgfeat.heads.train import TrainConfig

    assert fit.extend_grid([1.0, 10.0], 10.0) == [1.0, 10.0, 100.0]
    assert fit.extend_grid([1.0, 10.0], 1.0) == [0.1, 1.0, 10.0]
    assert fit.extend_grid([1.0, 10.0, 100.0], 10.0) is None and fit.extend_grid([1.0], 1.0) is None
    # Far apart classes: log-loss keeps falling past C = 10, the top of the default grid.
    X, y, _, _ = _blob_split(separation=8.0, per_class=40)
    fitted = fit.fit_head(TrainConfig(dataset="d", featureset="f", cv=3, n_jobs=1), X, y)
    searched = sorted(float(c) for c in fitted.cv["logreg"]["grid"])
    assert max(searched) > max(LOGREG_C_GRID)
    assert len(searched) <= len(LOGREG_C_GRID) + fit.MAX_GRID_EXTENSIONS
    # A grid the user gave is searched as given.
    mine = fit.fit_head(TrainConfig(dataset="d", featureset="f", cv=3, n_jobs=1, c_grid=(0.01, 0.1)), X, y)
    assert sorted(mine.cv["logreg"]["grid"]) == ["0.01", "0.1"]


def test_choose_c_takes_the_lowest_log_loss_and_the_smaller_c_of_a_near_tie():
    from imgfeat.heads.fit import choose_c

    tried = {0.1: {"log_loss": 0.30}, 1.0: {"log_loss": 0.205}, 10.0: {"log_loss": 0.20}, 100.0: {"log_loss": 0.21}}
    assert choose_c(tried) == 10.0
    # Separable classes: log-loss creeps down as C grows, by amounts no fold tells apart.
    creeping = {10.0: {"log_loss": 0.0018}, 100.0: {"log_loss": 0.00141}, 1000.0: {"log_loss": 0.001405}}
    assert choose_c(creeping) == 100.0


def test_evaluate_reports_accuracy_per_class_and_confusion():
    from imgfeat.heads.fit import evaluate

    class Fixed:
        def predict(self, X):
            return np.array(["a", "a", "b", "b"], dtype=object)

    y = np.array(["a", "b", "b", "b"], dtype=object)
    m = evaluate(Fixed(), np.zeros((4, 2)), y, ["a", "b"])
    assert m["test_accuracy"] == 0.75 and m["n_test"] == 4
    assert m["confusion"]["matrix"] == [[1, 0], [1, 2]]
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}


def test_evaluate_without_rows_says_why_there_is_no_accuracy():
    from imgfeat.heads.fit import evaluate

    m = evaluate(None, np.zeros((0, 2)), np.array([], dtype=object), ["a", "b"])
    assert m["test_accuracy"] is None and m["n_test"] == 0 and "no evaluation rows" in m["note"]


def test_unique_table_is_unique_images_in_arrow() -> None:
    """Predict's Arrow dedupe keeps the same rows, in the same order, with the same counts and files."""
    from imgfeat.heads.data import unique_images, unique_table

    rng = np.random.default_rng(3)
    rows = []
    for k in range(400):
        image = f"{int(rng.integers(0, 250)):032x}"  # about a third repeated
        label = str(rng.choice(["cat", "dog", None]))
        status = "ok" if k % 17 else "unreadable"
        rows.append((image if k % 23 else None, f"p/{rng.permutation(400)[k]:04d}-{k}.jpg", label, "train", status))
    table = manifest(rows)
    want, want_counts, want_files = unique_images(table)
    got, counts, files = unique_table(table)
    assert counts == want_counts and counts["duplicates"] > 50 and counts["conflicting_labels"] > 5
    assert got.to_pandas().reset_index(drop=True).equals(want.reset_index(drop=True))
    key = [S.PATH, S.REASON]
    assert files.sort_values(key).reset_index(drop=True).equals(want_files.sort_values(key).reset_index(drop=True))
    empty, none, no_files = unique_table(manifest([]))
    assert empty.num_rows == 0 and none["duplicates"] == 0 and no_files.empty
