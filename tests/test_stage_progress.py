"""Progress bars of the long stages: a total (so an ETA) on a terminal, nothing on a pipe."""

from __future__ import annotations

import re

import pytest
from tiny_images import write_noise_images

from imgfeat.core.workspace import Workspace
from imgfeat.scan.scan import ScanConfig, run_scan


@pytest.mark.quick
def test_scan_bar_knows_how_many_files_on_a_terminal_and_is_silent_otherwise(tmp_path, monkeypatch, capsys):
    write_noise_images(tmp_path / "images", 7, classes=("a", "b"))
    ws = Workspace(tmp_path / "ws")
    cfg = ScanConfig(root=tmp_path / "images", dataset="d")
    monkeypatch.setenv("IMGFEAT_PROGRESS", "1")
    run_scan(ws, cfg, "r1")  # a first scan counts the files first
    assert re.search(r"scan d: 100%.*\b7/7\b", capsys.readouterr().err)
    write_noise_images(tmp_path / "images" / "c", 2, seed=50)
    run_scan(ws, cfg, "r2")  # a rescan expects the previous manifest's rows
    assert re.search(r"scan d: .*\b0/7\b", capsys.readouterr().err)  # past the total, tqdm counts on
    monkeypatch.setenv("IMGFEAT_PROGRESS", "0")
    run_scan(ws, cfg, "r3")
    assert "scan d" not in capsys.readouterr().err
