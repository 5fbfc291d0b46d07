"""imgfeat train: every head kind learns, bad label sets exit 2 naming the class, head ids are deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import BlobSpec, write_blob_dataset, write_featureset

from imgfeat.cli.main import main
from imgfeat.core.errors import ConfigError
from imgfeat.core.workspace import Workspace
from imgfeat.heads import TrainConfig, run_train
from imgfeat.heads.artifacts import CURVES_FILE, HEAD_FILE, METRICS_FILE, ROWS_FILE

CLASSES = ("cat", "dog", "fox", "owl")
SPEC = BlobSpec(classes=CLASSES, per_class=40, dim=64, separation=5.0)
# Few, fast epochs: the behaviour under test does not depend on a fully trained net.
FAST_MLP = dict(epochs=12, hidden=32, learning_rate=0.01, batch_size=16)


@pytest.fixture(scope="module")
def blob_ws(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("train") / "ws")
    write_blob_dataset(ws, "toy", "fs", SPEC)
    return ws


# (head, kernel, extra config, lowest honest test accuracy; chance is 0.25)
HEADS = [
    ("logreg", "linear", {}, 0.8),
    ("svm", "linear", {}, 0.8),
    ("svm", "rbf", {}, 0.8),
    ("mlp", "linear", {**FAST_MLP, "cv": 2}, 0.75),
]


@pytest.fixture(scope="module")
def trained(blob_ws):
    return {
        (h, k): run_train(blob_ws, TrainConfig("toy", "fs", head=h, kernel=k, **{"cv": 3, **extra}), "r1")
        for h, k, extra, _ in HEADS
    }


@pytest.mark.parametrize("head,kernel,extra,floor", HEADS, ids=[f"{h}-{k}" for h, k, *_ in HEADS])
def test_each_head_learns_and_reports_its_metrics(blob_ws, trained, head, kernel, extra, floor):
    out = trained[(head, kernel)]
    m = out.metrics
    assert out.reused is False and out.model_kind == head
    assert floor <= m["test_accuracy"] <= 1.0
    assert 0.0 < m["macro_f1"] <= 1.0
    assert set(m["per_class"]) == set(CLASSES)
    assert sum(v["support"] for v in m["per_class"].values()) == out.n_test == 40
    assert out.n_train == 120
    cv = m["cv"][head]
    assert len(cv["folds"]) == extra.get("cv", 3) and 0.5 <= cv["mean"] <= 1.0
    folder = blob_ws.head_dir(out.head_id)
    expected = {HEAD_FILE, METRICS_FILE, ROWS_FILE, "model.keras" if head == "mlp" else "model.skops"}
    assert expected <= {p.name for p in folder.iterdir()}
    assert (folder / CURVES_FILE).is_file() == (head == "mlp")
    meta = json.loads((folder / HEAD_FILE).read_text())
    assert meta["classes"] == sorted(CLASSES) and len(meta["model_sha256"]) == 64
    assert meta["versions"]["scikit-learn"] and meta["training_hash"]
    if head != "mlp":
        assert "C" in out.chosen


def test_auto_cross_validates_every_kind_and_keeps_the_best(blob_ws):
    cfg = TrainConfig("toy", "fs", head="auto", cv=2, **FAST_MLP)
    out = run_train(blob_ws, cfg, "r1")
    cv = out.metrics["cv"]
    assert set(cv) == {"logreg", "svm", "mlp"}
    assert all(len(v["folds"]) == 2 for v in cv.values())
    assert out.model_kind == max(cv, key=lambda k: cv[k]["mean"])
    assert out.head_id.startswith("toy-auto-") and out.metrics["test_accuracy"] >= 0.75


def test_same_training_data_gives_the_same_head_and_is_reused(blob_ws, trained):
    first = trained[("logreg", "linear")]
    again = run_train(blob_ws, TrainConfig("toy", "fs", head="logreg", cv=3), "r2")
    assert again.head_id == first.head_id and again.reused is True
    assert again.metrics["test_accuracy"] == first.metrics["test_accuracy"]
    # An mlp-only flag does not change a logistic-regression head; a seed or a head kind does.
    assert run_train(blob_ws, TrainConfig("toy", "fs", head="logreg", cv=3, epochs=3), "r3").reused
    other = TrainConfig("toy", "fs", head="logreg", cv=3, random_state=1)
    assert run_train(blob_ws, other, "r4").head_id != first.head_id


def test_changed_labels_give_a_new_head_id(ws):
    ids = write_blob_dataset(ws, "toy", "fs", SPEC)
    first = run_train(ws, TrainConfig("toy", "fs", cv=2), "r1")
    labels = [CLASSES[k // 40] for k in range(len(ids))]
    labels[45] = "cat"  # one relabelled image
    write_blob_dataset(ws, "toy", "fs2", SPEC, labels=labels)
    second = run_train(ws, TrainConfig("toy", "fs2", cv=2), "r2")
    assert second.head_id != first.head_id and not second.reused


def test_rows_without_label_or_features_are_counted_and_left_out(ws):
    labels = [CLASSES[k // 40] for k in range(160)]
    for k in (0, 50, 100):
        labels[k] = None
    ids = write_blob_dataset(ws, "toy", "fs", SPEC, labels=labels)
    # A second featureset that lacks the first 10 images' features.
    from synthetic import blob_features

    _, X, _ = blob_features(SPEC)
    write_featureset(ws, "partial", ids[10:], X[10:])
    out = run_train(ws, TrainConfig("toy", "partial", cv=2), "r1")
    assert out.left_out["unlabelled"] == 3
    assert out.left_out["missing_features"] == 9  # image 0 is unlabelled, so counted there
    assert out.n_train + out.n_test == 160 - 3 - 9


def test_a_dataset_without_splits_holds_out_a_stratified_fraction(ws, caplog):
    write_blob_dataset(
        ws, "flat", "fs", BlobSpec(classes=("a", "b"), per_class=20, dim=16, separation=5.0, test_fraction=None)
    )
    out = run_train(ws, TrainConfig("flat", "fs", cv=5, test_fraction=0.25), "r1")
    assert out.eval_split == "held_out" and out.n_test == 10 and out.n_train == 30
    assert {v["support"] for v in out.metrics["per_class"].values()} == {5}
    # 15 training images per class >= 5 folds: no reduction warning
    assert "instead of" not in caplog.text


def test_cv_folds_shrink_with_a_warning_for_small_classes(ws, caplog):
    write_blob_dataset(
        ws, "few", "fs", BlobSpec(classes=("a", "b"), per_class=4, dim=8, separation=6.0, test_fraction=0.25)
    )
    out = run_train(ws, TrainConfig("few", "fs", cv=5), "r1")
    assert len(out.metrics["cv"]["logreg"]["folds"]) == 3
    assert "using 3-fold CV instead of 5" in caplog.text


def _cli(ws: Workspace, *args: str) -> int:
    return main(["train", "--workspace", str(ws.root), *args])


@pytest.mark.parametrize(
    "labels,message",
    [
        (["cat"] * 8, "one class only ('cat', 8 images)"),
        (["cat"] * 4 + ["dog"] * 3 + ["emu"], "class 'emu' has 1 image(s)"),
        ([None] * 8, "has no labels (8 images)"),
    ],
    ids=["single-class", "class-with-one-image", "no-labels"],
)
def test_bad_label_sets_exit_2_naming_the_problem(ws, capsys, labels, message):
    spec = BlobSpec(classes=("x",), per_class=8, dim=8, test_fraction=None)
    write_blob_dataset(ws, "bad", "fs", spec, labels=labels)
    code = _cli(ws, "--dataset", "bad", "--featureset", "fs", "--json")
    assert code == 2
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert message in summary["error"] and summary["exit_code"] == 2
    assert not ws.list_names("heads")


def test_a_class_too_small_to_train_after_the_split_is_named(ws):
    labels = ["cat"] * 6 + ["dog"] * 2
    write_blob_dataset(
        ws, "tiny", "fs", BlobSpec(classes=("x",), per_class=8, dim=8, test_fraction=None), labels=labels
    )
    with pytest.raises(ConfigError, match="class 'dog' has 1 training image"):
        run_train(ws, TrainConfig("tiny", "fs", test_fraction=0.5), "r1")


def test_svm_on_classes_too_small_to_calibrate_says_what_to_do(ws):
    write_blob_dataset(ws, "few", "fs", BlobSpec(classes=("a", "b"), per_class=2, dim=8, test_fraction=None))
    with pytest.raises(ConfigError, match="--head logreg"):
        run_train(ws, TrainConfig("few", "fs", head="svm", test_fraction=0.0), "r1")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--head", "logreg", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["--featureset", "fss"], "did you mean 'fs'"),
    ],
)
def test_unknown_names_exit_2(blob_ws, capsys, args, message):
    base = {"--dataset": "toy", "--featureset": "fs"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    code = main(["train", "--workspace", str(blob_ws.root), *np.ravel(list(base.items())).tolist()])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_prints_a_json_summary_with_metrics(blob_ws, trained, capsys):
    assert _cli(blob_ws, "--dataset", "toy", "--featureset", "fs", "--cv", "3", "--json") == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["head_id"] == trained[("logreg", "linear")].head_id and out["reused"] is True
    assert {"test_accuracy", "macro_f1", "per_class", "cv"} <= set(out["metrics"])
    assert out["n_train"] == 120 and out["n_test"] == 40
    assert (blob_ws.runs_dir / f"{out['run_id']}.json").is_file()


@pytest.mark.quick
def test_duplicates_and_label_conflicts_are_named_by_path():
    import pyarrow as pa

    from imgfeat.core import schemas as S
    from imgfeat.heads.data import unique_images

    rows = [
        ("a", "cat/1.jpg", "cat"),
        ("a", "dog/1.jpg", "dog"),  # one image under two labels
        ("b", "cat/2.jpg", "cat"),
        ("b", "cat/2 copy.jpg", "cat"),  # a plain duplicate
        ("c", "cat/3.jpg", "cat"),
    ]
    manifest = pa.table(
        {
            S.IMAGE_ID: [r[0] for r in rows],
            S.PATH: [r[1] for r in rows],
            S.LABEL: [r[2] for r in rows],
            S.SPLIT: [None] * 5,
            S.STATUS: ["ok"] * 5,
        }
    )
    images, counts, files = unique_images(manifest)
    assert len(images) == 3 and counts["duplicates"] == 2 and counts["conflicting_labels"] == 1
    got = sorted(zip(files[S.PATH], files[S.REASON], files[S.KEPT_PATH]))
    assert got == [
        ("cat/1.jpg", "conflicting_labels", "cat/1.jpg"),
        ("cat/2.jpg", "duplicate", "cat/2 copy.jpg"),
        ("dog/1.jpg", "conflicting_labels", "cat/1.jpg"),
    ]


def test_train_names_conflicting_files_in_text_json_and_a_table(ws, capsys):
    import pyarrow.parquet as pq

    from imgfeat.core import schemas as S
    from imgfeat.scan.manifest import read_manifest, write_manifest

    write_blob_dataset(ws, "toy", "fs", BlobSpec(classes=("cat", "dog"), per_class=10, dim=8, separation=6.0))
    rows = read_manifest(ws, "toy").to_pylist()
    first = rows[0]  # the same bytes again, filed under the other label
    rows.append({**first, S.PATH: "dog/copy-of-first.jpg", S.LABEL: "dog"})
    write_manifest(ws, "toy", rows, ws.root / "images" / "toy")
    assert main(["train", "--workspace", str(ws.root), "--dataset", "toy", "--featureset", "fs", "--cv", "2"]) == 0
    text = capsys.readouterr().out
    assert "left out: 1 conflicting labels, 1 duplicates" in text
    assert f"one image, several labels: {first[S.PATH]} (cat, used), dog/copy-of-first.jpg (dog)" in text
    assert (
        main(["train", "--workspace", str(ws.root), "--dataset", "toy", "--featureset", "fs", "--cv", "2", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {f["path"] for f in out["left_out_files"]} == {first[S.PATH], "dog/copy-of-first.jpg"}
    table = pq.read_table(ws.head_dir(out["head_id"]) / "left_out.parquet")
    assert sorted(table.column(S.PATH).to_pylist()) == sorted([first[S.PATH], "dog/copy-of-first.jpg"])
