"""Locks under contention and on bad disks: --wait honoured for heads and predictions, clear errors."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from imgfeat.core.errors import ImgfeatError, LockBusyError
from imgfeat.core.storage import WAIT_HINT, FileLock


def _release_later(lock: FileLock, seconds: float) -> threading.Thread:
    t = threading.Timer(seconds, lock.release)
    t.start()
    return t


@pytest.mark.quick
def test_the_busy_message_suggests_wait_only_when_asked_to(tmp_path):
    path = tmp_path / "x.lock"
    with FileLock(path, "thing"):
        with pytest.raises(LockBusyError) as plain:
            FileLock(path, "thing").acquire()
        with pytest.raises(LockBusyError) as hinted:
            FileLock(path, "thing", hint=WAIT_HINT).acquire()
        with pytest.raises(LockBusyError) as waited:
            FileLock(path, "thing", wait=0.1, hint=WAIT_HINT).acquire()
    assert "--wait" not in str(plain.value) and "--wait" in str(hinted.value)
    assert "waited 0.1 s" in str(waited.value) and "--wait" not in str(waited.value)
    assert str(path) in str(plain.value) and "pid" in str(plain.value)


@pytest.mark.quick
@pytest.mark.parametrize(
    "code,words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")]
)
def test_disk_errors_from_the_lock_code_name_the_path(tmp_path, monkeypatch, code, words):
    import os as real_os

    from imgfeat.core import storage

    def failing_open(path, *args, **kwargs):
        raise OSError(code, real_os.strerror(code), str(path))

    monkeypatch.setattr(storage.os, "open", failing_open)
    path = tmp_path / ".locks" / "scan.lock"
    with pytest.raises(ImgfeatError) as err:
        FileLock(path, "the scan stage").acquire()
    assert not isinstance(err.value, LockBusyError)
    assert str(path) in str(err.value) and words in str(err.value)


@pytest.mark.quick
def test_a_full_disk_while_writing_the_holder_releases_and_names_the_path(tmp_path, monkeypatch):
    from imgfeat.core import storage

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "write", full)
    path = tmp_path / "x.lock"
    with pytest.raises(ImgfeatError, match="disk is full"):
        FileLock(path, "thing").acquire()
    monkeypatch.undo()
    with FileLock(path, "thing"):  # the failed attempt did not keep the lock
        pass


@pytest.fixture(scope="module")
def blob_ws(tmp_path_factory):
    from synthetic import BlobSpec, write_blob_dataset

    from imgfeat.core.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("locks") / "ws")
    write_blob_dataset(ws, "toy", "fs", BlobSpec(classes=("a", "b"), per_class=12, dim=8, separation=6.0))
    return ws


def test_a_second_train_of_one_head_waits_with_wait_and_fails_fast_without(blob_ws):
    from imgfeat.heads import TrainConfig, run_train
    from imgfeat.heads.artifacts import HEAD_FILE

    cfg = TrainConfig("toy", "fs", cv=2)
    head_id = run_train(blob_ws, cfg, "r1").head_id
    (blob_ws.head_dir(head_id) / HEAD_FILE).unlink()  # not done: the next train must write it
    holder = FileLock(blob_ws.locks_dir / f"head-{head_id}.lock", "test holder").acquire()
    try:
        with pytest.raises(LockBusyError) as err:
            run_train(blob_ws, cfg, "r2")
        assert "--wait" in str(err.value) and f"head {head_id}" in str(err.value)
        _release_later(holder, 0.5)
        t0 = time.monotonic()
        out = run_train(blob_ws, TrainConfig("toy", "fs", cv=2, wait=30), "r3")
        assert out.head_id == head_id and time.monotonic() - t0 >= 0.4
    finally:
        holder.release()


def test_predict_and_report_wait_for_their_locks(blob_ws):
    from imgfeat.heads import PredictConfig, ReportConfig, run_predict, run_report

    head_id = run_train_once(blob_ws)
    for lock_name, run in (
        (
            f"predictions-{head_id}.lock",
            lambda wait: run_predict(blob_ws, PredictConfig(head_id, "toy", wait=wait), "p"),
        ),
        (
            f"report-{head_id}.lock",
            lambda wait: run_report(blob_ws, ReportConfig(head_id, projection="pca", wait=wait), "p"),
        ),
    ):
        holder = FileLock(blob_ws.locks_dir / lock_name, "test holder").acquire()
        try:
            with pytest.raises(LockBusyError, match="--wait"):
                run(None)
            _release_later(holder, 0.5)
            run(30)
        finally:
            holder.release()


def run_train_once(ws) -> str:
    from imgfeat.heads import TrainConfig, run_train

    return run_train(ws, TrainConfig("toy", "fs", cv=2), "r1").head_id


def test_imgfeat_run_passes_wait_to_the_head_lock(blob_ws, monkeypatch):
    """`imgfeat run --wait` reaches train, predict and report (it used to stop at the stage locks);
    so does --trust-pickle, which the message for an old head suggests."""
    from imgfeat.run import run as run_mod
    from imgfeat.run.jobfile import FeatureJob, HeadJob, JobSpec
    from imgfeat.run.summary import RunSummary

    job = JobSpec(
        "job.toml",
        {"toy": {}},
        (FeatureJob("f", {"backbone": "efficientnet_lite0"}, ("toy",)),),
        (HeadJob("h", "toy", "f", {"head": "logreg"}, ("toy",)),),
        wait=42.0,
        trust_pickle=True,
    )
    hjob = job.heads[0]
    assert run_mod.train_config(job, hjob, "fs").wait == 42.0
    seen = {}
    monkeypatch.setattr(
        "imgfeat.heads.run_predict",
        lambda ws, cfg, rid: seen.setdefault("predict", (cfg.wait, cfg.trust_pickle)) and {},
    )
    monkeypatch.setattr(
        "imgfeat.heads.run_report", lambda ws, cfg, rid: seen.setdefault("report", (cfg.wait, cfg.trust_pickle)) and {}
    )
    summary = RunSummary("job.toml")
    run_mod._predict_all(blob_ws, job, {"h": "toy-logreg-x"}, "r", summary)
    run_mod._report_all(blob_ws, job, {"h": "toy-logreg-x"}, "r", summary)
    assert seen == {"predict": (42.0, True), "report": (42.0, True)}


def test_predicting_image_files_waits_for_the_featureset_lock(ws, tmp_path, keras_home):
    """`imgfeat predict --wait HEAD IMAGE` extracts into the head's featureset: --wait covers that lock too."""
    import numpy as np
    from PIL import Image

    from imgfeat.extract.extract import ExtractConfig, extract_files, run_extract
    from imgfeat.scan.scan import ScanConfig, run_scan

    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "cat" / f"{i}.png")
    run_scan(ws, ScanConfig(root, "d"), "r1")
    fs = run_extract(ws, ExtractConfig("d", "efficientnet_lite0", weights="none", input_size=32), "r1").featureset
    new = tmp_path / "new.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(new)
    holder = FileLock(ws.featureset_lock(fs), "test holder").acquire()
    try:
        with pytest.raises(LockBusyError, match="--wait"):
            extract_files(ws, fs, [new], "r2")
        _release_later(holder, 0.5)
        (result,) = extract_files(ws, fs, [new], "r2", wait=60)
        assert result.image_id and not result.error_code
    finally:
        holder.release()


def test_a_lock_file_replaced_by_a_link_is_an_error_and_nothing_is_written_through_it(ws, tmp_path, capsys):
    """Issue 23 F2a: .locks/dataset-d.lock linked to a file outside: scan wrote its lock record
    into that file. Lock files are opened without following links."""
    from tiny_images import write_noise_images

    from imgfeat.cli.main import main

    write_noise_images(tmp_path / "imgs", 2)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    ws.locks_dir.mkdir(parents=True, exist_ok=True)
    (ws.locks_dir / "dataset-d.lock").symlink_to(victim)
    assert main(["scan", str(tmp_path / "imgs"), "--dataset", "d", "--workspace", str(ws.root)]) == 1
    err = capsys.readouterr().err
    assert "dataset-d.lock" in err and "symbolic link" in err and "Traceback" not in err
    assert victim.read_text() == "keep me\n"
    with pytest.raises(ImgfeatError, match="symbolic link"):
        FileLock(ws.locks_dir / "dataset-d.lock", "thing").acquire()


@pytest.mark.quick
def test_a_lock_created_by_a_refused_run_is_removed_and_a_waiter_locks_the_file_in_place(tmp_path):
    """Issue 23 F27: a run refused under a lock it created leaves no lock file. A process waiting
    on that file meanwhile must not hold a lock on the unlinked file while a third one locks the
    new file at the path: it checks, after locking, that its file is still the one there."""
    from imgfeat.core.errors import ConfigError

    path = tmp_path / ".locks" / "x.lock"
    with pytest.raises(ConfigError):
        with FileLock(path, "x"):
            raise ConfigError("bad value")
    assert not path.exists()
    with pytest.raises(ImgfeatError):  # any other failure keeps it (the usual case: a lock stays)
        with FileLock(path, "x"):
            raise ImgfeatError("crash")
    assert path.exists()
    path.unlink()
    first = FileLock(path, "x").acquire()
    assert first.created
    got: list[FileLock] = []
    waiter = threading.Thread(target=lambda: got.append(FileLock(path, "x", wait=10).acquire()))
    waiter.start()
    time.sleep(0.3)  # the waiter has opened the file and polls its flock
    first.release(remove=True)
    waiter.join(10)
    assert got and path.exists()
    with pytest.raises(LockBusyError):  # the waiter's lock is on the file at the path
        FileLock(path, "x").acquire()
    got[0].release()


def test_finetune_refused_under_its_lock_leaves_no_lock_file(ws, tmp_path, capsys):
    """Issue 23 F27: finetune --unfreeze-blocks 999 exited 2 and left .locks/finetune-*.lock."""
    from tiny_images import write_noise_images

    from imgfeat.cli.main import main
    from imgfeat.scan.scan import ScanConfig, run_scan

    write_noise_images(tmp_path / "imgs", 18, fmt="PNG", size=(32, 32), classes=("a", "b"))
    run_scan(ws, ScanConfig(root=tmp_path / "imgs", dataset="d"), "scan")
    before = sorted(p.name for p in ws.locks_dir.iterdir())
    assert (
        main(
            [
                "finetune",
                "--dataset",
                "d",
                "--backbone",
                "mobilenet_v2",
                "--weights",
                "none",
                "--input-size",
                "32",
                "--unfreeze-blocks",
                "999",
            ]
        )
        == 2
    )
    assert "999" in capsys.readouterr().err
    assert sorted(p.name for p in ws.locks_dir.iterdir()) == before
    assert not (ws.root / "finetune").exists() or not any((ws.root / "finetune").iterdir())


@pytest.mark.quick
@pytest.mark.parametrize("wait", [float("nan"), -5, "10"])
def test_a_lock_refuses_a_wait_that_is_not_zero_or_more_seconds(tmp_path, wait):
    """Issue 23 F4/F6 from the API side: a nan wait polled for ever on a held lock."""
    from imgfeat.core.errors import ConfigError

    with pytest.raises(ConfigError, match="wait"):
        FileLock(tmp_path / "x.lock", "x", wait=wait)
    assert not (tmp_path / "x.lock").exists()
