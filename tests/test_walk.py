"""Scan's walk and probe under attack: deep trees, link loops, unlistable folders, special files."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgfeat.core import schemas as S
from imgfeat.scan import walk as walk_mod
from imgfeat.scan.manifest import read_manifest
from imgfeat.scan.probe import probe_file
from imgfeat.scan.scan import ScanConfig, run_scan


def jpeg(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def rows(ws) -> dict[str, dict]:
    return {r[S.PATH]: r for r in read_manifest(ws, "d").to_pylist()}


def test_a_tree_nested_1500_deep_scans_without_recursion_error(ws):
    # Not under tmp_path: pytest removes old tmp folders with shutil.rmtree, which recurses on
    # Python 3.11 and would fail on this tree in a later session if this test were interrupted.
    root = Path(tempfile.mkdtemp(prefix="imgfeat-deep-"))
    deep = str(root)
    try:
        for _ in range(1500):  # os.makedirs itself recurses
            os.mkdir(deep + "/d")
            deep += "/d"
        Path(deep, "bottom.jpg").write_bytes(jpeg())
        (root / "top.jpg").write_bytes(jpeg(1))
        summary = run_scan(ws, ScanConfig(root, "d"), "r1")
        assert summary.ok == 2
        assert "/".join(["d"] * 1500) + "/bottom.jpg" in rows(ws)
    finally:  # take the tree down bottom-up
        if os.path.exists(os.path.join(deep, "bottom.jpg")):
            os.unlink(os.path.join(deep, "bottom.jpg"))
        while deep != str(root):
            os.rmdir(deep)
            deep = os.path.dirname(deep)
        shutil.rmtree(root)


@pytest.mark.quick
def test_walk_order_is_unchanged_depth_first_and_sorted(tmp_path):
    root = tmp_path / "r"
    for rel in ("b.jpg", "a/x.jpg", "a/b/y.jpg", "a/z.jpg", "c/q.jpg", "0.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    stats = walk_mod.WalkStats()
    got = [e.rel for e in walk_mod.walk(str(root), walk_mod.WalkOptions(), stats)]
    assert got == ["0.jpg", "a/b/y.jpg", "a/x.jpg", "a/z.jpg", "b.jpg", "c/q.jpg"]
    assert stats.dirs == 4


@pytest.mark.quick
def test_a_file_link_loop_is_reported_as_a_loop_not_a_broken_link(ws, tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "a.jpg").symlink_to(root / "b.jpg")
    (root / "b.jpg").symlink_to(root / "a.jpg")
    (root / "self.jpg").symlink_to(root / "self.jpg")
    run_scan(ws, ScanConfig(root, "d"), "r1")
    got = rows(ws)
    for rel in ("a.jpg", "b.jpg", "self.jpg"):
        assert got[rel][S.STATUS] == S.STATUS_UNREADABLE
        assert "loop" in got[rel][S.ERROR] and "broken" not in got[rel][S.ERROR]


@pytest.mark.quick
def test_an_unlistable_folder_becomes_a_row_and_a_count(ws, tmp_path, monkeypatch):
    root = tmp_path / "r"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(jpeg())
    (root / "cat" / "private").mkdir()
    (root / "cat" / "private" / "hidden_from_us.jpg").write_bytes(jpeg(1))
    locked = str(root / "cat" / "private")
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root, so refuse the listing here
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(walk_mod.os, "scandir", scandir)
    summary = run_scan(ws, ScanConfig(root, "d"), "r1")
    got = rows(ws)
    assert set(got) == {"cat/a.jpg", "cat/private"}
    row = got["cat/private"]
    assert row[S.STATUS] == S.STATUS_UNREADABLE and row[S.IMAGE_ID] is None
    assert "cannot list the folder" in row[S.ERROR] and "Permission denied" in row[S.ERROR]
    assert summary.skipped.get("unlistable_dir") == 1


def _in_thread(fn, timeout: float, release) -> tuple[bool, object]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        release()
        t.join(5)
        return False, None
    return True, out[0]


def _release_fifo(path: Path):
    def release():
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    return release


@pytest.mark.quick
def test_probing_a_fifo_does_not_hang_and_says_not_a_regular_file(tmp_path):
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)  # a file swapped for a FIFO after the walk stat'ed it
    finished, probe = _in_thread(lambda: probe_file(str(fifo), 10**8), 5, _release_fifo(fifo))
    assert finished, "probing a FIFO hung"
    assert probe.status == S.STATUS_UNREADABLE and "not a regular file" in probe.error


def test_follow_links_to_a_fifo_and_to_proc_pagemap_never_hang(ws, tmp_path):
    root, outside = tmp_path / "r", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.mkfifo(outside / "pipe.jpg")
    (root / "pipe.jpg").symlink_to(outside / "pipe.jpg")
    (root / "pagemap.jpg").symlink_to("/proc/self/pagemap")
    (root / "ok.jpg").write_bytes(jpeg())
    code = (
        "import sys, json; from imgfeat.core.workspace import Workspace;"
        "from imgfeat.scan.scan import ScanConfig, run_scan;"
        "s = run_scan(Workspace.resolve(sys.argv[1]), ScanConfig(sys.argv[2], 'd', follow_links=True), 'r1');"
        "print(json.dumps(s.skipped))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(ws.root), str(root)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scan --follow-links hung on a link to a FIFO or /proc/self/pagemap")
    assert done.returncode == 0, done.stderr
    assert '"special_file": 2' in done.stdout  # the FIFO and pagemap: skipped, never opened
    assert set(rows(ws)) == {"ok.jpg"} and rows(ws)["ok.jpg"][S.STATUS] == S.STATUS_OK


@pytest.mark.quick
def test_probing_a_zero_size_file_that_has_content_says_not_a_regular_file():
    # What a /proc file swapped in after the walk looks like to the probe: size 0, endless.
    probe = probe_file("/proc/self/pagemap", 10**8)
    assert probe.status == S.STATUS_UNREADABLE and "not a regular file" in probe.error
