"""imgfeat report: a self-contained page whose images exist, whose table lists every class, with thumbnails."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from imgfeat.cli.main import main
from imgfeat.heads import PredictConfig, ReportConfig, TrainConfig, run_predict, run_report, run_train
from synthetic import BlobSpec, write_blob_dataset
from imgfeat.core.workspace import Workspace

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
    head_id = run_train(ws, cfg, "t1")["head_id"]
    run_predict(ws, PredictConfig(head_id, dataset="toy"), "p1")
    out = run_report(ws, ReportConfig(head_id), "r1")
    return ws, head_id, out


def test_report_page_exists_and_every_image_it_references_is_there(reported):
    ws, head_id, out = reported
    index = ws.report_dir(head_id) / "index.html"
    assert out["report"] == str(index) and index.is_file()
    page = index.read_text()
    srcs = re.findall(r"<img[^>]* src='([^']+)'", page)
    files = [s for s in srcs if not s.startswith("data:")]
    assert set(files) == {"confusion.png", "projection.png", "training_curves.png"}
    for name in files:
        data = (index.parent / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert sorted(out["pngs"]) == sorted(str(index.parent / n) for n in files)


def test_report_lists_every_class_and_the_metrics(reported):
    ws, head_id, _ = reported
    page = (ws.report_dir(head_id) / "index.html").read_text()
    table = page[page.index("<table>"):page.index("</table>")]
    rows = re.findall(r"<tr><td>([^<]+)</td>", table)
    assert rows == sorted(CLASSES)
    assert head_id in page and "macro avg" in table and "test accuracy" in page
    assert "prediction rows" in page and ">120<" in page  # every image was predicted


def test_report_shows_confident_mistakes_as_inline_thumbnails(reported):
    ws, head_id, out = reported
    page = (ws.report_dir(head_id) / "index.html").read_text()
    thumbs = re.findall(r"src='data:image/jpeg;base64,", page)
    assert out["mistakes_shown"] >= 1 and len(thumbs) == out["mistakes_shown"]
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
