"""Heads trained from a stream: a labelled matrix over --memory-budget is fitted a batch at a time,
reaching the in-memory path's held-out accuracy, and predict and report use the head unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import BlobSpec, write_blob_dataset

from imgfeat.extract.featureset import load_features
from imgfeat.heads import PredictConfig, ReportConfig, TrainConfig, load_head, run_predict, run_report, run_train
from imgfeat.heads.predict import read_predictions

# 4 overlapping classes x 800 of 128-d float32 (1.6 MiB with the test rows): above a 1 MiB budget.
SPEC = BlobSpec(classes=("a", "b", "c", "d"), per_class=800, dim=128, separation=3.0, dtype="float32")
TINY = "1MiB"


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    from imgfeat.core.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("stream"))
    write_blob_dataset(ws, "blobs", "fs", SPEC)
    return ws


def _train(ws, head: str, budget: str | None, **kw):
    cfg = TrainConfig(
        dataset="blobs",
        featureset="fs",
        head=head,
        memory_budget=budget,
        name=f"{head}-{'streamed' if budget else 'in-memory'}",
        **kw,
    )
    out = run_train(ws, cfg, "r")
    return out, json.loads((ws.head_dir(out.head_id) / "head.json").read_text())


@pytest.mark.parametrize("head", ["logreg", "svm"])
def test_a_streamed_linear_head_scores_within_a_point_of_the_in_memory_one(blobs, head):
    full, full_meta = _train(blobs, head, None)
    streamed, meta = _train(blobs, head, TINY)
    assert full_meta["trained_by"]["path"] == "in_memory" and meta["trained_by"]["path"] == "streamed"
    assert "exceed the memory budget (1 MiB)" in meta["trained_by"]["why"]
    assert "fits the memory budget" in full_meta["trained_by"]["why"]
    assert meta["trained_by"]["cv_rows"] < streamed.n_train  # C chosen on a subsample that fits
    acc, acc_full = streamed.metrics["test_accuracy"], full.metrics["test_accuracy"]
    assert acc_full > 0.6  # the features carry signal: 4 classes, chance is 0.25
    assert abs(acc - acc_full) <= 0.01, (acc, acc_full)


def test_predict_and_report_use_a_streamed_head_like_any_other(blobs):
    out, meta = _train(blobs, "logreg", TINY)
    assert meta["trained_by"]["path"] == "streamed" and meta["model_format"] == "skops"
    got = run_predict(blobs, PredictConfig(out.head_id, dataset="blobs", memory_budget=TINY), "p")
    assert got.written == len(SPEC.classes) * SPEC.per_class
    table = read_predictions(blobs, out.head_id).to_pandas().set_index("image_id")
    ids, X = load_features(blobs, "fs", table.index.tolist())
    head = load_head(blobs, out.head_id)
    assert (table.loc[ids, "pred_label"].to_numpy() == head.estimator.predict(X)).all()
    page = run_report(blobs, ReportConfig(out.head_id, memory_budget=TINY), "rep")
    with open(page.report, encoding="utf-8") as fh:
        html = fh.read()
    assert page.mistakes_shown > 0 and "trained by" in html and "streamed" in html


@pytest.mark.slow
def test_the_dense_net_trains_from_a_stream(blobs):
    out, meta = _train(blobs, "mlp", TINY, epochs=4)
    assert meta["trained_by"]["path"] == "streamed" and meta["model_format"] == "keras"
    assert 1 <= meta["trained_by"]["epochs"] <= 4 and len(meta["history"]["loss"]) == meta["trained_by"]["epochs"]
    assert out.metrics["test_accuracy"] > 0.7  # in memory it scores 0.84 with 50 epochs
    assert np.isfinite(meta["history"]["val_loss"]).all()


def test_a_streamed_fit_logs_each_epoch_for_a_log_without_a_terminal(blobs, caplog):
    with caplog.at_level("INFO", logger="imgfeat.heads.stream"):
        _, meta = _train(blobs, "svm", TINY, random_state=1)
    epochs = meta["trained_by"]["epochs"]
    lines = [r.getMessage() for r in caplog.records if "(streamed): epoch" in r.getMessage()]
    assert len(lines) == epochs and lines[-1].startswith(f"svm (streamed): epoch {epochs} of {epochs} done")


def _manifest_in(ws, name: str, rows: list[dict], order: str, rng: np.random.Generator) -> str:
    """``rows`` written as a dataset's manifest in path order (as scan writes it) or shuffled; its name."""
    from imgfeat.core import schemas as S
    from imgfeat.scan.manifest import write_manifest

    if order.startswith("path"):
        rows.sort(key=lambda r: r[S.PATH])
    else:
        rng.shuffle(rows)
    dataset = f"{name}-sorted" if order.startswith("path") else f"{name}-shuffled"
    write_manifest(ws, dataset, rows, ws.root / "images" / dataset)
    return dataset


@pytest.mark.parametrize("order", ["path order, as scan writes", "any order"])
def test_predict_labels_each_row_with_its_own_manifest_row(blobs, order):
    """Predict joins feature rows to manifest rows a chunk at a time (read from the manifest's row
    groups when it is in path order, else from a sorted table): every prediction carries its image's
    first path, label and split, repeated paths are left out, nothing is lost or mixed up."""
    from imgfeat.core import schemas as S
    from imgfeat.scan.manifest import read_manifest

    out, _ = _train(blobs, "logreg", None)
    base = read_manifest(blobs, "blobs").to_pylist()
    rng = np.random.default_rng(4)
    rows = [dict(r, **{S.SPLIT: str(rng.choice(["train", "test", "val"]))}) for r in base]
    copies = [dict(rows[k], **{S.PATH: f"zz-copy/{k:05d}.jpg", S.LABEL: "other"}) for k in range(0, len(rows), 7)]
    rows += copies  # the same image under a later path: the first path and its label win
    dataset = _manifest_in(blobs, "blobs", rows, order, rng)
    got = run_predict(blobs, PredictConfig(out.head_id, dataset=dataset, chunk_rows=100, memory_budget=TINY), "p")
    assert got.written == len(base) and got.duplicates == len(copies) and got.missing_features == 0
    table = read_predictions(blobs, out.head_id).to_pandas()
    table = table[table[S.DATASET] == dataset].set_index(S.IMAGE_ID)
    first = {}
    for r in sorted(rows, key=lambda r: r[S.PATH]):
        first.setdefault(r[S.IMAGE_ID], r)
    assert len(table) == len(first)
    for i, r in first.items():
        assert (table.at[i, S.PATH], table.at[i, S.LABEL], table.at[i, S.SPLIT]) == (r[S.PATH], r[S.LABEL], r[S.SPLIT])


@pytest.mark.parametrize("order", ["path order, as scan writes", "any order"])
def test_train_joins_each_image_to_its_own_first_manifest_row(blobs, order):
    """Train reads the manifest as keys and codes (a row group at a time when it is in path order,
    else from a sorted table) and marks the featureset's ids on them: the rows, labels, splits and
    counts are what a plain join of the rows says, and the digest is the lines' sha256."""
    from imgfeat.core import schemas as S
    from imgfeat.core.hashing import sha256_lines
    from imgfeat.heads.data import read_labelled
    from imgfeat.scan.manifest import read_manifest

    base = read_manifest(blobs, "blobs").to_pylist()
    rng = np.random.default_rng(9)
    rows = [dict(r, **{S.SPLIT: str(rng.choice(["train", "train", "test", "val", "extra"]))}) for r in base]
    for k in range(0, len(rows), 11):
        rows[k][S.LABEL] = None if k % 2 else ""  # unlabelled
    rows += [dict(rows[k], **{S.PATH: f"zz-copy/{k:05d}.jpg", S.LABEL: "other"}) for k in range(0, len(rows), 7)]
    rows += [dict(rows[k], **{S.IMAGE_ID: f"{k:032x}", S.PATH: f"nf/{k:05d}.jpg"}) for k in range(0, 300, 3)]
    rows += [dict(rows[k], **{S.STATUS: "unreadable", S.PATH: f"bad/{k:05d}.jpg"}) for k in range(1, 300, 5)]
    dataset = _manifest_in(blobs, "train", rows, order, rng)
    got = read_labelled(blobs, dataset, "fs", 0.0, 0)

    featured = {i for i in load_features(blobs, "fs")[0].tolist()}
    first = {}
    for r in sorted(rows, key=lambda r: r[S.PATH]):
        if r[S.STATUS] == S.STATUS_OK and r[S.IMAGE_ID] is not None:
            first.setdefault(r[S.IMAGE_ID], r)
    kept = sorted((i, r) for i, r in first.items() if r[S.LABEL] and i in featured)
    train = [(i, r[S.LABEL]) for i, r in kept if r[S.SPLIT] == "train"]
    classes = sorted({lab for _, lab in train})
    test = [(i, r[S.LABEL]) for i, r in kept if r[S.SPLIT] == "test" and r[S.LABEL] in classes]
    assert list(zip(got.train_ids, got.train_labels)) == train and len(train) > 1000
    assert list(zip(got.test_ids, got.test_labels)) == test and len(test) > 300
    assert got.classes == classes == ["a", "b", "c", "d"] and got.eval_split == "test"
    unlabelled = sum(1 for r in first.values() if not r[S.LABEL])
    assert got.left_out["unlabelled"] == unlabelled > 0
    assert got.left_out["missing_features"] == sum(1 for i, r in first.items() if r[S.LABEL] and i not in featured)
    assert got.left_out["other_split"] == sum(1 for _, r in kept if r[S.SPLIT] not in ("train", "test")) > 0
    assert got.left_out["duplicates"] > 0 and got.left_out["not_readable"] == len(range(1, 300, 5))
    lines = [f"train\t{i}\t{lab}" for i, lab in train] + [f"test\t{i}\t{lab}" for i, lab in test]
    assert got.digest() == sha256_lines(lines)
    expected = [
        {S.IMAGE_ID: i, S.LABEL: lab, S.ROLE: role}
        for role, part in (("train", train), ("test", test))
        for i, lab in part
    ]
    assert got.table().to_pylist() == expected
    # the rows file is written a part at a time: parts of any size make the same rows
    parts = list(got.parts(rows=97))
    assert max(p.num_rows for p in parts) == 97 and [r for p in parts for r in p.to_pylist()] == expected


@pytest.mark.quick
def test_the_cv_subsample_keeps_each_class_in_proportion_and_is_seeded():
    from imgfeat.heads.stream import stratified_rows

    rng = np.random.default_rng(0)
    codes = rng.choice(4, size=50_000, p=[0.7, 0.2, 0.0999, 0.0001]).astype(np.int32)
    rows = stratified_rows(codes, 1_000, seed=3)
    assert len(rows) == len(np.unique(rows)) and (np.diff(rows) > 0).all()  # distinct, sorted
    got = np.bincount(codes[rows], minlength=4)
    want = np.bincount(codes, minlength=4) * 1_000 / len(codes)
    assert np.all(np.abs(got[:3] - want[:3]) <= 1) and got[3] == min(2, int((codes == 3).sum()))  # a rare class: two
    assert abs(len(rows) - 1_000) <= 2
    assert (stratified_rows(codes, 1_000, seed=3) == rows).all()
    assert not (stratified_rows(codes, 1_000, seed=4) == rows).all()
