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


def test_without_splits_a_fraction_is_held_out_stratified_and_seeded():
    rows = [(f"{c}{i:031d}", f"{lab}/{i}.jpg", lab, None, S.STATUS_OK)
            for c, lab in enumerate(("cat", "dog")) for i in range(10)]
    a, b = labelled(rows, test_fraction=0.2), labelled(rows, test_fraction=0.2)
    assert a.eval_split == "held_out" and len(a.test_ids) == 4 and sorted(set(a.test_labels)) == ["cat", "dog"]
    assert a.digest() == b.digest()
    assert labelled(rows, test_fraction=0.2, seed=1).digest() != a.digest()


def test_test_fraction_zero_leaves_no_evaluation_rows():
    rows = [(f"{c}{i:031d}", f"{lab}/{i}.jpg", lab, None, S.STATUS_OK)
            for c, lab in enumerate(("cat", "dog")) for i in range(3)]
    out = labelled(rows, test_fraction=0.0)
    assert len(out.test_ids) == 0 and out.eval_split is None and len(out.train_ids) == 6


@pytest.mark.parametrize("rows, words", [
    ([("a" * 32, "x.jpg", None, None, S.STATUS_OK)], "has no labels"),
    ([(f"{i:032d}", f"cat/{i}.jpg", "cat", None, S.STATUS_OK) for i in range(4)], "one class only"),
    ([("a" * 32, "cat/1.jpg", "cat", None, S.STATUS_OK)] + [(f"{i:032d}", f"dog/{i}.jpg", "dog", None, S.STATUS_OK)
                                                           for i in range(3)], "class 'cat' has 1"),
])
def test_unusable_label_sets_are_config_errors_that_say_why(rows, words):
    with pytest.raises(ConfigError, match=words):
        labelled(rows)


# ---------------------------------------------------------------- fit_head and evaluate


def test_fit_head_cross_validates_and_refits_on_every_row():
    from imgfeat.heads.train import TrainConfig, fit_head

    X, y = blobs()
    fitted = fit_head(TrainConfig(dataset="d", featureset="f", cv=3, n_jobs=1), X, y)
    assert fitted.kind == "logreg" and fitted.cv["logreg"]["mean"] == 1.0
    assert len(fitted.cv["logreg"]["folds"]) == 3 and "C" in fitted.chosen
    assert list(fitted.estimator.predict(X)) == list(y)


def test_evaluate_reports_accuracy_per_class_and_confusion():
    from imgfeat.heads.train import evaluate

    class Fixed:
        def predict(self, X):
            return np.array(["a", "a", "b", "b"], dtype=object)

    y = np.array(["a", "b", "b", "b"], dtype=object)
    m = evaluate(Fixed(), np.zeros((4, 2)), y, ["a", "b"])
    assert m["test_accuracy"] == 0.75 and m["n_test"] == 4
    assert m["confusion"]["matrix"] == [[1, 0], [1, 2]]
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}


def test_evaluate_without_rows_says_why_there_is_no_accuracy():
    from imgfeat.heads.train import evaluate

    m = evaluate(None, np.zeros((0, 2)), np.array([], dtype=object), ["a", "b"])
    assert m["test_accuracy"] is None and m["n_test"] == 0 and "no evaluation rows" in m["note"]
