"""SIGKILL an `imgfeat extract` mid-run, rerun it, and compare with an uninterrupted run: same rows, same bits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_images import write_noise_images

from imgfeat.core import schemas as S
from imgfeat.core.storage import list_shards
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import load_features
from imgfeat.scan.scan import ScanConfig, run_scan

N_IMAGES = 200
# Lite0 random weights give O(1) features that differ per image (random-init MobileNetV2 gives
# ~1e-12, all zeros in float16, and "bit-identical" would hold for any bug).
ARGS = [
    "--dataset",
    "d",
    "--backbone",
    "efficientnet_lite0",
    "--weights",
    "none",
    "--input-size",
    "64",
    "--batch-size",
    "4",
    "--shard-size",
    "8",
    "--npy",
    "--workers",
    "1",
]
REPO = Path(__file__).resolve().parents[1]


def extract_cmd(ws: Workspace, decode: str = "threads") -> list[str]:
    return [sys.executable, "-m", "imgfeat", "extract", "--workspace", str(ws.root), *ARGS, "--decode", decode]


def scanned_workspace(root: Path, images: Path) -> Workspace:
    ws = Workspace(root)
    run_scan(ws, ScanConfig(root=images, dataset="d"), "scan")
    return ws


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crash-imgs")
    write_noise_images(folder, N_IMAGES, size=(32, 24))
    return folder


def kill_after_first_shard(ws: Workspace, fs_parent: Path, decode: str = "threads") -> int:
    """Start extract, SIGKILL it once a shard is committed; return how many were committed by then."""
    proc = subprocess.Popen(extract_cmd(ws, decode), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            shards = list(fs_parent.glob("*/part-*.parquet"))
            if shards:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"extract ended before the kill: {proc.stderr.read()[-2000:]}"
    return len(list(fs_parent.glob("*/part-*.parquet")))


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_killed_run_resumes_to_the_same_features(images, tmp_path, decode):
    """Decoded in threads or in worker processes (shared buffers): the same rows, the same bits."""
    crashed = scanned_workspace(tmp_path / "crashed", images)
    committed = kill_after_first_shard(crashed, crashed.root / "features", decode)
    assert 1 <= committed < N_IMAGES // 8

    clean = scanned_workspace(tmp_path / "clean", images)
    # The resumed run and the uninterrupted one write different workspaces: run them side by side.
    procs = [
        subprocess.Popen(extract_cmd(w, d), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for w, d in ((crashed, decode), (clean, "threads"))
    ]
    for proc in procs:
        assert proc.wait() == 0, proc.stderr.read()[-2000:]

    [name] = crashed.list_names("features")
    fs_dir = crashed.featureset_dir(name)
    assert not list((crashed.root / "features").rglob("*.tmp"))
    shards = list_shards(fs_dir)
    sidecars = {p.stem for p in crashed.featureset_npy_dir(name).iterdir()}
    assert sidecars <= {p.stem for p in shards}, "a sidecar survived without its shard"
    assert len({p.name.split("-")[1] for p in shards}) == 2  # the killed run's shards plus the resumed run's
    ids_a, X_a = load_features(crashed, fs_dir.name)
    ids_b, X_b = load_features(clean, fs_dir.name)
    import pyarrow.parquet as pq

    raw_ids = [i for p in shards for i in pq.read_table(p, columns=[S.IMAGE_ID]).column(0).to_pylist()]
    assert len(raw_ids) == len(set(raw_ids)) == N_IMAGES  # resume did not redo a committed image
    order = np.argsort(ids_b)
    assert sorted(ids_a) == list(ids_b[order])
    assert np.array_equal(X_a[np.argsort(ids_a)], X_b[order])  # bit-identical on CPU
    assert np.count_nonzero(X_b) > X_b.size // 10 and len(np.unique(X_b, axis=0)) == N_IMAGES
