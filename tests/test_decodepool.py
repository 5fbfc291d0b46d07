"""Decode processes into shared batch buffers: the thread path's batches exactly, back-pressure, cleanup, dead workers."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from tiny_images import corrupt_png, jpeg_bytes, png_bytes

from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.hashing import content_id
from imgfeat.extract.batches import InputSpec, Item, chunked, make_batch
from imgfeat.extract.decode import DecodeConfig
from imgfeat.extract.decodepool import (
    HEAVY_MODULES,
    DecodePool,
    Release,
    SlotRing,
    compact_rows,
    death_message,
    pool_size,
    prestart,
    process_batches,
    split_rows,
)

SPEC = InputSpec(DecodeConfig((12, 16)), batch_size=5)  # (h, w) not square: a swapped axis shows


def _write(path: Path, data: bytes) -> Item:
    path.write_bytes(data)
    return Item(content_id(data), str(path))


def _mixed_items(folder: Path, n: int = 23) -> list[Item]:
    """Good JPEGs and PNGs with every kind of failure spread over the batches (item i by i % 8)."""
    items = []
    for i in range(n):
        path, kind = folder / f"{i:03d}", i % 8
        if kind == 1:
            items.append(_write(path.with_suffix(".png"), png_bytes(i, (20, 14))))
        elif kind == 2:
            items.append(_write(path.with_suffix(".png"), corrupt_png(i)))
        elif kind == 3:
            items.append(_write(path.with_suffix(".jpg"), jpeg_bytes(i, (30, 20))[:150]))  # truncated
        elif kind == 4:
            item = _write(path.with_suffix(".jpg"), jpeg_bytes(i))
            path.with_suffix(".jpg").write_bytes(jpeg_bytes(i + 1000))  # changed since the scan
            items.append(item)
        elif kind == 6:
            items.append(Item(content_id(b"gone %d" % i), str(path) + ".jpg"))  # vanished
        else:
            items.append(_write(path.with_suffix(".jpg"), jpeg_bytes(i, (24 + i, 18))))
    return items


def _thread_path(items: list[Item], spec: InputSpec = SPEC) -> list:
    return [make_batch(chunk, spec, "run1") for chunk in chunked(items, spec.batch_size)]


def _same(batch, ref) -> bool:
    return batch.ids == ref.ids and batch.errors == ref.errors and np.array_equal(batch.raw, ref.raw)


def _our_segments() -> set[str]:
    """Shared-memory segments this process has mapped (from /proc/self/maps)."""
    with open("/proc/self/maps") as fh:
        return {line.split()[5] for line in fh if "/dev/shm/" in line and len(line.split()) > 5}


def _decode_workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("imgfeat-decode-")]


# ---------------------------------------------------------------- pure parts


@pytest.mark.quick
@pytest.mark.parametrize(
    "n, workers, expected",
    [
        (32, 4, [(0, 8), (8, 16), (16, 24), (24, 32)]),
        (10, 4, [(0, 10)]),  # under two parts' worth of MIN_PART: one part
        (17, 2, [(0, 9), (9, 17)]),
        (3, 8, [(0, 3)]),
        (0, 2, [(0, 0)]),
    ],
)
def test_split_rows_covers_every_row_in_balanced_parts(n, workers, expected):
    assert split_rows(n, workers) == expected


@pytest.mark.quick
def test_compact_rows_keeps_order_and_zeroes_stale_rows():
    raw = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1) + 1  # a reused buffer: every row non-zero
    compact_rows(raw, [1, 2, 4])
    assert raw.ravel().tolist() == [2, 3, 5, 0, 0, 0]


@pytest.mark.quick
def test_death_message_says_how_and_which_files():
    msg = death_message("imgfeat-decode-1", 42, -signal.SIGKILL, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert "pid 42" in msg and "SIGKILL" in msg and "out-of-memory" in msg and "a.jpg, b.jpg, c.jpg and 1 more" in msg
    assert "SIGSEGV (a crash in a native image decoder)" in death_message("w", 1, -signal.SIGSEGV, [])
    assert "exited with code 1" in death_message("w", 1, 1, ["x"])
    assert "was killed by signal 40 while" in death_message("w", 1, -40, ["x"])


@pytest.mark.quick
def test_the_ring_blocks_a_taker_until_a_release_from_another_thread():
    ring = SlotRing(1)
    slot = ring.try_take()
    assert slot == 0 and ring.try_take() is None
    release = Release(ring, slot)
    timer = threading.Timer(0.2, release)
    t0 = time.perf_counter()
    timer.start()
    assert ring.take() == 0 and time.perf_counter() - t0 >= 0.15
    release()  # a second call gives nothing back twice
    assert ring.try_take() is None


@pytest.mark.quick
def test_bad_pool_arguments_are_config_errors_and_an_empty_todo_starts_nothing():
    for kw in ({"workers": 0, "ahead": 1}, {"workers": 1, "ahead": 0}, {"workers": 1, "ahead": 1, "held": -1}):
        with pytest.raises(ConfigError, match="decode pool"):
            next(process_batches([], SPEC, "r", **kw))
    assert list(process_batches([], SPEC, "r", workers=2, ahead=2)) == []
    one = [[Item("a", "a")] * 3]
    assert pool_size(4, one) == 1 and pool_size(4, one * 2) == 4


@pytest.mark.quick
def test_a_ring_larger_than_free_shared_memory_is_refused_before_any_worker_starts():
    huge = InputSpec(DecodeConfig((100_000, 100_000)), batch_size=4096)
    with pytest.raises(ImgfeatError, match=r"decode processes need \d+ MiB of shared memory .* /dev/shm has"):
        DecodePool(huge, "r", workers=2, slots=3)
    assert not _decode_workers()


# ---------------------------------------------------------------- worker processes


@pytest.mark.parametrize("workers, ahead", [(3, 2), (1, 1)])
def test_batches_equal_the_thread_path(tmp_path, workers, ahead):
    prestart()  # idempotent: the pool uses the server already up
    prestart()
    items = _mixed_items(tmp_path)
    refs = _thread_path(items)
    got = []
    for batch in process_batches(items, SPEC, "run1", workers=workers, ahead=ahead):
        assert batch.raw.shape == (5, 12, 16, 3) and batch.raw.dtype == np.uint8 and batch.release
        got.append((_same(batch, refs[len(got)]), batch.decode_seconds))
        batch.release()
    assert [ok for ok, _ in got] == [True] * len(refs) and all(s > 0 for _, s in got)
    codes = {e.error_code for r in refs for e in r.errors}
    assert {"changed_since_scan", "vanished", "truncated"} <= codes  # the mix really has failures
    assert sum(len(r.ids) for r in refs) > 10


@pytest.mark.parametrize("ahead, held", [(1, 1), (2, 1)])
def test_a_held_batch_is_never_overwritten_the_producer_waits(tmp_path, ahead, held):
    items = _mixed_items(tmp_path, 40)
    refs = _thread_path(items)
    gen = process_batches(items, SPEC, "run1", workers=2, ahead=ahead, held=held)
    slots = ahead + held
    kept = [next(gen) for _ in range(slots)]  # every buffer now held by us
    box: list = []
    waiter = threading.Thread(target=lambda: box.append(next(gen)))
    waiter.start()
    waiter.join(0.6)
    assert waiter.is_alive() and not box  # blocked: no free buffer
    assert all(_same(b, r) for b, r in zip(kept, refs))
    kept[0].release()
    waiter.join(10)
    assert box and _same(box[0], refs[slots]) and all(_same(b, r) for b, r in zip(kept[1:], refs[1:]))
    held_now = [(box[0], slots), *((b, i) for i, b in enumerate(kept[1:], start=1))]  # (batch, its index)
    seen = slots + 1
    while held_now:  # from here on: release the oldest, then ask for the next
        held_now.pop(0)[0].release()
        if (batch := next(gen, None)) is not None:
            held_now.append((batch, seen))
            seen += 1
        assert all(_same(b, refs[i]) for b, i in held_now)
    assert seen == len(refs)


def test_workers_do_not_inherit_the_parents_modules(tmp_path):
    marker = "imgfeat_test_parent_only"
    sys.modules[marker] = types.ModuleType(marker)  # as Keras would be: imported by the parent only
    try:
        with DecodePool(SPEC, "r", 2, 2) as pool:
            batches = list(pool.batches(chunked(_mixed_items(tmp_path, 10), 5), ahead=2))
            assert len(batches) == 2 and len(pool.worker_modules) == 2
            for modules in pool.worker_modules.values():
                assert "PIL" in modules and "numpy" in modules
                assert marker not in modules and not HEAVY_MODULES & modules
    finally:
        del sys.modules[marker]


def test_closing_early_stops_workers_and_unlinks_the_segment(tmp_path):
    items = _mixed_items(tmp_path, 40)
    before = _our_segments()
    gen = process_batches(items, SPEC, "run1", workers=2, ahead=2)
    next(gen)
    ours = _our_segments() - before
    assert len(ours) == 1 and all(os.path.exists(p) for p in ours) and len(_decode_workers()) == 2
    gen.close()
    assert not any(os.path.exists(p) for p in ours) and not _decode_workers()


def test_a_consumer_exception_stops_workers_and_unlinks_the_segment(tmp_path):
    items = _mixed_items(tmp_path, 40)
    before, seen = _our_segments(), set()

    def consume():
        for _ in process_batches(items, SPEC, "run1", workers=2, ahead=2):
            seen.update(_our_segments() - before)
            raise ValueError("the model failed")

    with pytest.raises(ValueError, match="the model failed"):
        consume()
    assert seen and not any(os.path.exists(p) for p in seen) and not _decode_workers()


@pytest.mark.parametrize(
    "sig, why",
    [(signal.SIGKILL, "the kernel's out-of-memory killer"), (signal.SIGSEGV, "a crash in a native image decoder")],
)
def test_a_killed_worker_raises_a_clear_error_not_a_hang(tmp_path, sig, why):
    items = _mixed_items(tmp_path, 60)
    before, seen = _our_segments(), set()
    gen = process_batches(items, SPEC, "run1", workers=2, ahead=2)
    next(gen)
    seen.update(_our_segments() - before)
    victim = _decode_workers()[0]
    os.kill(victim.pid, sig)
    t0 = time.perf_counter()
    with pytest.raises(
        ImgfeatError,
        match=rf"decode worker imgfeat-decode-\d \(pid {victim.pid}\) was killed by "
        rf"{sig.name} \({why}",
    ):
        for _ in gen:
            pass
    assert time.perf_counter() - t0 < 10
    assert seen and not any(os.path.exists(p) for p in seen) and not _decode_workers()


def test_a_worker_bug_stops_the_stream_with_its_traceback(tmp_path):
    items = _mixed_items(tmp_path, 10)
    items[7] = Item("0" * 32, None)  # not a path: a TypeError in the worker, not an image's error row
    with pytest.raises(ImgfeatError, match=r"(?s)decode worker imgfeat-decode-\d \(pid \d+\) failed: .*TypeError"):
        list(process_batches(items, SPEC, "run1", workers=2, ahead=2, held=2))
    assert not _decode_workers()


CTRL_C_CONSUMER = """
import json, multiprocessing, sys, time
from imgfeat.extract.batches import InputSpec, Item
from imgfeat.extract.decode import DecodeConfig
from imgfeat.extract.decodepool import process_batches
items = [Item(*pair) for pair in json.loads(sys.argv[1])] * 50
for batch in process_batches(items, InputSpec(DecodeConfig((12, 16)), 5), "r", workers=2, ahead=2):
    maps = [line.split()[5] for line in open("/proc/self/maps") if "/dev/shm/" in line]
    pids = [p.pid for p in multiprocessing.active_children() if p.name.startswith("imgfeat-decode-")]
    print(json.dumps([sorted(set(maps)), pids]), flush=True)
    time.sleep(0.05)
    batch.release()
"""


def test_ctrl_c_stops_the_workers_and_unlinks_the_segment(tmp_path):
    import json
    import subprocess

    pairs = [(it.image_id, it.path) for it in _mixed_items(tmp_path, 20)]
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_CONSUMER, json.dumps(pairs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    segments, pids = json.loads(proc.stdout.readline())
    assert len(segments) == 1 and len(pids) == 2 and os.path.exists(segments[0])
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(timeout=20)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err and "leaked" not in err
    assert not os.path.exists(segments[0])
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height gray pixels, with one short IDAT: enough for Image.open."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_an_image_over_the_pixel_limit_is_an_error_row_and_no_warning_line(tmp_path, decode):
    """Pillow warns (DecompressionBombWarning) for an image between its pixel limit and twice it;
    extract makes the file a too_large error row, and stderr shows ours, not Pillow's warning.
    A fresh process with the command line's logging: its decode workers start there too."""
    import subprocess

    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(10_000, 10_000))  # 100M pixels: over Pillow's 89.5M, under twice it
    code = f"""
import logging, sys
from imgfeat.core.hashing import content_id
from imgfeat.core.logs import setup_logging
from imgfeat.extract.batches import InputSpec, Item, make_batch
from imgfeat.extract.decode import DecodeConfig
from imgfeat.extract.decodepool import process_batches
setup_logging("info")
data = open({str(path)!r}, "rb").read()
items = [Item(content_id(data), {str(path)!r})]
spec = InputSpec(DecodeConfig((12, 16)), batch_size=2)
if {decode!r} == "threads":
    batches = [make_batch(items, spec, "run1")]
else:
    batches = list(process_batches(items, spec, "run1", workers=1, ahead=1))
errors = [e for b in batches for e in b.errors]
logging.getLogger("imgfeat").info("codes %s", [e.error_code for e in errors])
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "codes ['too_large']" in res.stderr
    assert "DecompressionBomb" not in res.stderr and "exceeds limit" not in res.stderr, res.stderr
