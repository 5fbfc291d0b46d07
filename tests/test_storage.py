"""The commit protocol: atomic writes, shard listing, and the writer lock across processes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgfeat.core.errors import ImgfeatError, LockBusyError
from imgfeat.core.storage import (
    FileLock,
    atomic_path,
    list_shards,
    remove_file,
    remove_stale_tmp,
    remove_tree,
    shard_name,
    write_json_atomic,
    write_table_atomic,
)


@pytest.mark.quick
def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "t.parquet"
    write_table_atomic(pa.table({"a": [1, 2]}), target)
    write_table_atomic(pa.table({"a": [3]}), target)
    assert pq.read_table(target).column("a").to_pylist() == [3]
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.parquet"]


@pytest.mark.quick
def test_failed_write_leaves_old_file_and_no_tmp(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomic({"v": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.quick
def test_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ImgfeatError, match="disk is full"):
        write_json_atomic({"v": 1}, tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.quick
def test_shards_are_named_by_run_and_tmp_files_are_never_listed(tmp_path):
    names = [shard_name("20260101T000000Z-aaaaaa", i) for i in range(3)]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / (shard_name("20260101T000000Z-bbbbbb", 0) + ".tmp")).write_bytes(b"half")
    assert [p.name for p in list_shards(tmp_path)] == names
    assert remove_stale_tmp(tmp_path) == 1
    assert len(list(tmp_path.iterdir())) == 3


HOLDER = textwrap.dedent(
    """
    import sys, time
    from imgfeat.core.storage import FileLock
    with FileLock(sys.argv[1], "the test featureset"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _hold(lock_path, seconds):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_fails_fast_naming_the_holder(tmp_path):
    lock = tmp_path / ".lock"
    proc = _hold(lock, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockBusyError, match=rf"the test featureset .* \(pid {proc.pid}\)"):
            FileLock(lock, "the test featureset").acquire()
        assert time.monotonic() - t0 < 2
    finally:
        proc.kill()
        proc.wait()
    with FileLock(lock, "the test featureset"):  # a dead holder's lock is free again
        pass


def test_waiting_writer_gets_the_lock_when_it_is_released(tmp_path):
    lock = tmp_path / ".lock"
    proc = _hold(lock, 1.0)
    try:
        t0 = time.monotonic()
        with FileLock(lock, "x", wait=20):
            waited = time.monotonic() - t0
        assert waited > 0.3  # it really waited for the holder's ~1 s, rather than failing
    finally:
        proc.wait()


@pytest.mark.quick
def test_deletion_never_follows_a_link_out_of_the_root(tmp_path):
    """Issue 23 F2b: a link planted in the workspace is removed itself; nothing it points to is deleted."""
    root, outside = tmp_path / "ws", tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    for name in ("head.json", "x.tmp", "sub/y.tmp"):
        (outside / name).write_text("keep")
    (root / "heads").mkdir(parents=True)
    (root / "heads" / "h").symlink_to(outside, target_is_directory=True)
    (root / "real").mkdir()
    (root / "real" / "link").symlink_to(outside, target_is_directory=True)
    assert not remove_file(root / "heads" / "h" / "head.json", root)
    assert remove_stale_tmp(root / "heads" / "h") == 0
    assert remove_tree(root / "real", root)  # a real folder holding a link: the link goes, not its target
    assert not remove_tree(root / "heads" / "h" / "sub", root)  # through a link: nothing is deleted
    assert sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*")) == [
        "head.json",
        "sub",
        "sub/y.tmp",
        "x.tmp",
    ]
    assert not (root / "real").exists() and (root / "heads" / "h").is_symlink()
    assert remove_tree(root / "heads" / "h", root)  # the link itself goes, its target stays
    assert not (root / "heads" / "h").is_symlink() and (outside / "head.json").is_file()
    (root / "f").write_text("mine")
    assert remove_file(root / "f", root) and not (root / "f").exists()


@pytest.mark.quick
@pytest.mark.parametrize("name", ["x.json", "x.parquet"])
def test_a_link_planted_at_a_temporary_name_is_never_written_through(tmp_path, name):
    """Issue 23 F2: a link where the commit protocol writes its temporary file would have the
    write land outside, and the rename commit the link."""
    from imgfeat.core.storage import temp_path

    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    final = tmp_path / "ws" / "t" / name
    tmp = temp_path(final)
    tmp.parent.mkdir(parents=True)
    tmp.symlink_to(outside)
    if name.endswith(".json"):
        write_json_atomic({"a": 1}, final)
    else:
        write_table_atomic(pa.table({"a": [1]}), final)
    assert outside.read_text() == "keep" and not final.is_symlink() and final.is_file()
