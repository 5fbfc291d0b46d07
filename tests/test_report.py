"""imgfeat report: a self-contained page whose images exist, whose table lists every class, with thumbnails."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from PIL import Image
from synthetic import BlobSpec, write_blob_dataset

from imgfeat.cli.main import main
from imgfeat.core.workspace import Workspace
from imgfeat.heads import PredictConfig, ReportConfig, TrainConfig, run_predict, run_report, run_train

CLASSES = ("cat", "dog", "fox", "owl", "emu")
# Overlapping classes, so the head makes mistakes for the gallery to show.
SPEC = BlobSpec(classes=CLASSES, per_class=24, dim=24, separation=2.5)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    ws = Workspace(base / "ws")
    images = base / "images"
    write_blob_dataset(ws, "toy", "fs", SPEC, image_root=images)
    for k, label in enumerate(np.repeat(CLASSES, SPEC.per_class)):  # the files the manifest points at
        path = images / label / f"{k:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (k * 9 % 255, 80, 160)).save(path)
    cfg = TrainConfig("toy", "fs", head="mlp", cv=2, epochs=8, hidden=32, learning_rate=0.01, batch_size=16)
    head_id = run_train(ws, cfg, "t1").head_id
    run_predict(ws, PredictConfig(head_id, dataset="toy"), "p1")
    out = run_report(ws, ReportConfig(head_id), "r1")
    return ws, head_id, out


def test_report_page_is_one_file_with_every_plot_inline(reported):
    ws, head_id, out = reported
    index = ws.report_dir(head_id) / "index.html"
    assert out.report == str(index) and index.is_file()
    assert sorted(p.name for p in index.parent.iterdir()) == ["index.html"]  # nothing beside it
    page = index.read_text()
    srcs = re.findall(r"<img[^>]* src='([^']+)'", page)
    assert all(s.startswith("data:image/") for s in srcs)
    pngs = [base64.b64decode(s.split(",", 1)[1]) for s in srcs if s.startswith("data:image/png;base64,")]
    assert len(pngs) == 3 and all(p.startswith(b"\x89PNG") and len(p) > 5000 for p in pngs)
    assert out.plots == ["confusion.png", "projection.png", "training_curves.png"]


def test_report_is_titled_by_the_head_name_and_found_by_it(reported, capsys):
    ws, head_id, out = reported
    page = (ws.report_dir(head_id) / "index.html").read_text()
    assert out.name == "toy-mlp" and head_id.startswith("toy-mlp-")
    assert "<title>toy-mlp · imgfeat report</title>" in page and "<h1>toy-mlp</h1>" in page
    assert main(["report", "--workspace", str(ws.root), "--head", "toy-mlp", "--projection", "pca"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{head_id}/index.html")


def test_report_lists_every_class_and_the_metrics(reported):
    ws, head_id, _ = reported
    page = (ws.report_dir(head_id) / "index.html").read_text()
    table = page[page.index("<table>") : page.index("</table>")]
    rows = re.findall(r"<tr><td>([^<]+)</td>", table)
    assert rows == sorted(CLASSES)
    assert head_id in page and "macro avg" in table and "test accuracy" in page
    assert "prediction rows" in page and ">120<" in page  # every image was predicted


def test_report_shows_confident_mistakes_as_inline_thumbnails(reported):
    ws, head_id, out = reported
    page = (ws.report_dir(head_id) / "index.html").read_text()
    thumbs = re.findall(r"src='data:image/jpeg;base64,", page)
    assert out.mistakes_shown >= 1 and len(thumbs) == out.mistakes_shown
    scores = [float(s) for s in re.findall(r"</span> \((\d+\.\d)%\)<br>true:", page)]
    assert scores == sorted(scores, reverse=True)


def test_report_is_self_contained(reported):
    ws, head_id, _ = reported
    page = (ws.report_dir(head_id) / "index.html").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)
    assert "@import" not in page and "url(" not in page


def test_report_cli_prints_the_page_path(reported, capsys):
    ws, head_id, _ = reported
    assert main(["report", "--workspace", str(ws.root), "--head", head_id, "--projection", "pca"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{head_id}/index.html")


@pytest.mark.quick
def test_an_auto_head_shows_every_kinds_score_and_only_the_winners_parameters():
    from imgfeat.heads.report import kinds_compared
    from imgfeat.heads.train import params_for

    cv = {
        "logreg": {"mean": 0.81, "std": 0.02, "folds": [0.8, 0.82]},
        "svm": {"mean": 0.86, "std": 0.01, "folds": [0.85, 0.87]},
        "mlp": {"mean": 0.40, "std": 0.05, "folds": [0.35, 0.45]},
    }
    html = kinds_compared({"head": "auto", "model_kind": "svm", "cv": cv})
    assert "svm won" in html and "<b>winner</b>" in html
    kinds = re.findall(r"<tr[^>]*><td>(\w+)", html)
    assert kinds == ["svm", "logreg", "mlp"]  # best first
    assert kinds_compared({"head": "svm", "model_kind": "svm", "cv": {"svm": cv["svm"]}}) == ""
    params = {"cv": 5, "kernel": "linear", "max_iter": 1000, "epochs": 50, "hidden": 256}
    assert params_for("svm", params) == {"cv": 5, "kernel": "linear", "max_iter": 1000}


def test_report_shows_its_steps_as_a_bar_on_a_terminal_only(reported, tmp_path, monkeypatch, capsys):
    import shutil

    ws, head_id, _ = reported
    copy = Workspace(tmp_path / "ws")  # a copy: the module's page stays as the other tests expect it
    shutil.copytree(ws.root, copy.root)
    capsys.readouterr()
    monkeypatch.setenv("IMGFEAT_PROGRESS", "1")
    run_report(copy, ReportConfig(head_id, max_mistakes=3), "r-bar")
    assert re.search(r"report toy-mlp: 100%.*4/4", capsys.readouterr().err)
    monkeypatch.setenv("IMGFEAT_PROGRESS", "0")
    run_report(copy, ReportConfig(head_id, max_mistakes=4), "r-quiet")
    assert "report toy-mlp:" not in capsys.readouterr().err


def test_the_rows_file_read_a_row_group_at_a_time_gives_the_same_mistakes_and_sample(reported, tmp_path):
    """Report reads the head's rows a row group at a time (the evaluation rows kept, a seeded sample
    taken as each group passes): the same mistakes, in the same order, and the same sample as the
    whole table gives, however the file is cut into groups."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from imgfeat.core import schemas as S
    from imgfeat.heads import artifacts as A
    from imgfeat.heads import load_head
    from imgfeat.heads.report import _evaluation_rows, _mistakes, _sample_rows

    ws, head_id, _ = reported
    head = load_head(ws, head_id)
    whole = A.read_rows(ws, head_id)
    role, sub = _evaluation_rows(ws, head_id)
    assert (
        role == "test"
        and sub.to_pylist() == whole.filter(pc.equal(whole[A.ROLE], "test")).select([S.IMAGE_ID, S.LABEL]).to_pylist()
    )
    mistakes = _mistakes(ws, head, sub, 12, 1 << 30)
    sample = _sample_rows(ws, head_id, 40)
    keep = np.sort(np.random.default_rng(0).choice(whole.num_rows, 40, False))
    assert sample.to_pylist() == whole.take(pa.array(keep)).select([S.IMAGE_ID, S.LABEL]).to_pylist()
    assert len(mistakes) > 3  # overlapping classes: the head gets some wrong

    path = ws.head_dir(head_id) / A.ROWS_FILE
    shutil.copy(path, tmp_path / "rows.parquet")
    try:
        pq.write_table(whole, path, row_group_size=7)
        assert pq.ParquetFile(path).num_row_groups > 10
        role2, sub2 = _evaluation_rows(ws, head_id)
        assert (role2, sub2.to_pylist()) == (role, sub.to_pylist())
        assert _mistakes(ws, head, sub2, 12, 1 << 30) == mistakes
        assert _sample_rows(ws, head_id, 40).to_pylist() == sample.to_pylist()
    finally:
        shutil.copy(tmp_path / "rows.parquet", path)
