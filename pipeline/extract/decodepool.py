"""Decode in worker processes straight into a ring of shared batch buffers: batches in todo order, no pixels pickled.

The thread path (``make_batch`` in a thread pool) stops scaling at a few cores: the GIL. Here
``workers`` processes, started from a ``forkserver`` (never ``fork``: the parent runs TensorFlow or
JAX threads), attach one ``multiprocessing.shared_memory`` segment that holds ``ahead + held``
batch buffers and decode into them with the same ``decode_item`` as the thread path. Every batch
is split into sub-chunks, one per worker, so one batch's latency is not one worker's; only row
numbers, error rows and seconds travel back. The parent compacts each finished buffer so the
successes are its first rows in item order (the rest zero), and yields a ``Batch`` whose ``raw``
is a view on that buffer: the buffer is reused only after the consumer calls ``batch.release()``,
and when every buffer is in use the producer waits (it never overwrites one).

A worker that dies (the OOM killer, a decoder crash) stops the iterator with an ``ImgfeatError``
naming the worker, how it died and the files it was decoding. Closing the iterator (exhausted,
``close()``, an exception in the consumer, Ctrl-C) stops the workers and unlinks the segment.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import connection, forkserver
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.schemas import ErrorRow
from imgfeat.extract.batches import (
    Batch,
    ChunkedItems,
    InputSpec,
    Item,
    batch_chunks,
    decode_error_row,
    decode_item,
)
from imgfeat.extract.decode import DecodeError, own_pixel_limit_warnings

log = logging.getLogger(__name__)

START_METHOD = "forkserver"  # a clean interpreter per worker, forked cheaply from one pre-imported server
DEFAULT_HELD = 2  # buffers the consumer may hold (e.g. batches in flight on a device) besides those decoding
MIN_PART = 8  # files per sub-chunk at least: smaller ones cost more in messages than they gain in balance
DEFAULT_NICE = 10  # as the decode threads: on a CPU-only host decoding fills the model's idle gaps
HEAVY_MODULES = frozenset({"keras", "tensorflow", "jax", "torch"})  # a worker must not carry these
JOIN_SECONDS = 5.0
RELEASE_WARN_SECONDS = 30.0
SHM_DIR = "/dev/shm"
SIGNAL_HINTS = {
    signal.SIGKILL: "the kernel's out-of-memory killer sends this",
    signal.SIGSEGV: "a crash in a native image decoder",
    signal.SIGABRT: "a crash in a native image decoder",
    signal.SIGBUS: f"shared memory ran out ({SHM_DIR} full?)",
}


class Segment(SharedMemory):
    """The parent's shared segment. Its finaliser tolerates batch views still alive when the
    interpreter exits (the stock one reports a BufferError there); the OS unmaps it then."""

    def __del__(self) -> None:
        try:
            self.close()
        except (BufferError, OSError):
            pass


_UNCLOSED: list[SharedMemory] = []  # unlinked segments whose views a consumer still held at shutdown


# ---------------------------------------------------------------- pure parts (no processes)


def split_rows(n: int, workers: int, min_part: int = MIN_PART) -> list[tuple[int, int]]:
    """Row ranges [start, stop) covering 0..n: at most ``workers`` parts, none under ``min_part`` rows
    unless n itself is smaller, sizes differing by at most one."""
    parts = max(1, min(workers, n // max(1, min_part)))
    base, extra = divmod(n, parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + base + (p < extra))
    return list(itertools.pairwise(bounds))


def compact_rows(raw: np.ndarray, ok_rows: list[int]) -> None:
    """Move the decoded rows up so they are the first ``len(ok_rows)`` rows, in order; zero the rest
    (a reused buffer still holds an older batch there)."""
    for dst, src in enumerate(ok_rows):  # dst <= src: a row is read before anything overwrites it
        if dst != src:
            raw[dst] = raw[src]
    raw[len(ok_rows) :] = 0


def death_message(name: str, pid: int | None, exitcode: int | None, files: list[str]) -> str:
    """Why a decode worker is gone, in words, with the files it was decoding."""
    if exitcode is not None and exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
        except ValueError:  # a signal without a name (real-time signals)
            sig = None
        how = f"was killed by {sig.name if sig else f'signal {-exitcode}'}"
        how += f" ({SIGNAL_HINTS[sig]})" if sig in SIGNAL_HINTS else ""
    elif exitcode is None:
        how = "stopped answering"
    else:
        how = f"exited with code {exitcode}"
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    doing = f" while decoding {shown}" if files else ""
    return f"decode worker {name} (pid {pid}) {how}{doing}; the extract stops (rerun it to resume)"


class SlotRing:
    """Which batch buffers are free. Taken to decode a batch, given back by ``Batch.release`` (from any
    thread); a taker waits for a give rather than ever reusing a buffer in use."""

    def __init__(self, slots: int) -> None:
        self._free = collections.deque(range(slots))
        self._cond = threading.Condition()

    def try_take(self) -> int | None:
        with self._cond:
            return self._free.popleft() if self._free else None

    def take(self, warn_after: float = RELEASE_WARN_SECONDS) -> int:
        with self._cond:
            while not self._free:
                if not self._cond.wait(warn_after):
                    log.warning(
                        "decode is waiting for a batch buffer: every one is held by the consumer "
                        "(call Batch.release once the model is done with raw)"
                    )
            return self._free.popleft()

    def give(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()


class Release:
    """``Batch.release`` for one buffer: gives the slot back once, however often it is called."""

    def __init__(self, ring: SlotRing, slot: int) -> None:
        self._ring, self._slot = ring, slot
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._ring.give(self._slot)


def shared_array(shm: SharedMemory, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array on the segment. ``frombuffer`` holds a buffer export for as long as any view of
    it lives, so closing the segment under a live view raises BufferError instead of unmapping it
    (``np.ndarray(buffer=...)`` holds none: its views would point at freed memory)."""
    buf = shm.buf
    assert buf is not None, "an open segment has a buffer"
    return np.frombuffer(buf, dtype=np.uint8, count=int(np.prod(shape))).reshape(shape)


# ---------------------------------------------------------------- the worker process


def _worker_main(
    shm_name: str,
    shape: tuple[int, ...],
    spec: InputSpec,
    run_id: str,
    nice: int,
    tasks: connection.Connection,
    results: connection.Connection,
) -> None:
    """Decode sub-chunks into the shared ring until the parent closes the task pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    own_pixel_limit_warnings()
    if nice:
        try:
            os.nice(nice)
        except OSError:  # not allowed: decode at normal priority
            pass
    shm = SharedMemory(shm_name)
    ring = shared_array(shm, shape)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    # A sender thread: the decode loop never blocks on a full result pipe, so it always goes back
    # to reading tasks, and the parent's task sends can never deadlock against our result sends.
    sender = threading.Thread(target=_send_all, args=(outbox, results), daemon=True)
    sender.start()
    outbox.put(("ready", os.getpid(), sorted({name.partition(".")[0] for name in sys.modules})))
    try:
        _serve(ring, spec, run_id, tasks, outbox)
    except Exception:  # a bug, not a bad image (those are rows): the parent stops the run with this text
        outbox.put(("failed", os.getpid(), traceback.format_exc()))
    outbox.put(None)
    sender.join()
    del ring
    shm.close()


def _send_all(outbox: queue.SimpleQueue, results: connection.Connection) -> None:
    while (msg := outbox.get()) is not None:
        try:
            results.send(msg)
        except OSError:  # the parent is gone or closed the pipe: nothing left to tell
            return


def _serve(
    ring: np.ndarray, spec: InputSpec, run_id: str, tasks: connection.Connection, outbox: queue.SimpleQueue
) -> None:
    while True:
        try:
            task = tasks.recv()
        except EOFError:  # the parent closed the pipe (done, or gone)
            return
        seq, part, slot, row0, pairs = task
        outbox.put(("done", seq, part, *_decode_part(ring[slot], row0, pairs, spec, run_id)))


def _decode_part(
    rows: np.ndarray, row0: int, pairs: list[tuple[str, str]], spec: InputSpec, run_id: str
) -> tuple[list[int], list[ErrorRow], float]:
    """Decode files into rows row0.. of one buffer: the rows that got an image, error rows, seconds."""
    t0 = time.perf_counter()
    ok: list[int] = []
    errors: list[ErrorRow] = []
    for row, (image_id, path) in enumerate(pairs, start=row0):
        item = Item(image_id, path)
        try:
            rows[row] = decode_item(item, spec)
            ok.append(row)
        except DecodeError as exc:
            errors.append(decode_error_row(item, exc, run_id))
    return ok, errors, time.perf_counter() - t0


# ---------------------------------------------------------------- the parent side


@dataclass
class _Worker:
    proc: Any  # multiprocessing.Process of the forkserver context
    tasks: connection.Connection
    results: connection.Connection
    sent: collections.deque = field(default_factory=collections.deque)  # (seq, paths) not yet answered

    @property
    def load(self) -> int:
        return sum(len(paths) for _, paths in self.sent)


@dataclass
class _Pending:
    """One batch being decoded: its buffer, its items and the parts answered so far."""

    seq: int
    slot: int
    items: list[Item]
    parts: int
    answers: dict[int, tuple[list[int], list[ErrorRow], float]] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return len(self.answers) == self.parts


class DecodePool:
    """``workers`` decode processes over a ring of ``slots`` shared batch buffers (a context manager).
    Made before the model is built, its start-up overlaps the build; ``batches`` then streams."""

    def __init__(self, spec: InputSpec, run_id: str, workers: int, slots: int, nice: int = DEFAULT_NICE) -> None:
        _check_positive(workers=workers, slots=slots)
        _retry_unclosed()
        self.spec, self.run_id = spec, run_id
        h, w = spec.dcfg.size
        self.shape = (slots, spec.batch_size, h, w, 3)
        self.ring = SlotRing(slots)
        self.worker_modules: dict[int, frozenset[str]] = {}  # pid -> top-level modules a worker had loaded
        self._shm = _create_segment(int(np.prod(self.shape)), self.shape)
        self._buffers = shared_array(self._shm, self.shape)
        self._workers: list[_Worker] = []
        self._pending: dict[int, _Pending] = {}
        self._seq = itertools.count()
        self._closed = False
        try:
            self._start(workers, nice)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, workers: int, nice: int) -> None:
        ctx = _context()
        for i in range(workers):
            task_r, task_w = ctx.Pipe(duplex=False)
            res_r, res_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main,
                name=f"imgfeat-decode-{i}",
                daemon=True,
                args=(self._shm.name, self.shape, self.spec, self.run_id, nice, task_r, res_w),
            )
            proc.start()
            task_r.close()  # the worker's ends: closed here, so a dead worker reads as EOF / EPIPE
            res_w.close()
            self._workers.append(_Worker(proc, task_w, res_r))

    # -- the batch stream

    def batches(self, chunks: Iterable[list[Item]], ahead: int) -> Iterator[Batch]:
        """One Batch per chunk, in order; at most ``ahead`` batches decoding at once."""
        _check_positive(ahead=ahead)
        chunks = iter(chunks)
        inflight: collections.deque[_Pending] = collections.deque()
        chunk = next(chunks, None)  # the next one to admit: known before waiting for a buffer, so the
        while True:  # end of the stream never waits on a consumer that holds them all
            while chunk is not None and len(inflight) < ahead:
                slot = self.ring.try_take() if inflight else self.ring.take()
                if slot is None:
                    break
                inflight.append(self._submit(chunk, slot))
                chunk = next(chunks, None)
            if not inflight:
                return
            head = inflight.popleft()
            while not head.done:
                self._receive()
            yield self._finish(head)

    def _submit(self, chunk: list[Item], slot: int) -> _Pending:
        seq = next(self._seq)
        parts = split_rows(len(chunk), len(self._workers))
        pending = self._pending[seq] = _Pending(seq, slot, chunk, len(parts))
        for part, (start, stop) in enumerate(parts):
            worker = min(self._workers, key=lambda w: w.load)  # the least busy: parts of a batch spread out
            pairs = [(it.image_id, it.path) for it in chunk[start:stop]]
            worker.sent.append((seq, [p for _, p in pairs]))
            try:
                worker.tasks.send((seq, part, slot, start, pairs))
            except OSError:  # EPIPE: it died before reading its tasks
                raise self._dead(worker) from None
        return pending

    def _receive(self) -> None:
        """Wait for results or a worker's death; record every answer that arrived."""
        by_conn = {w.results: w for w in self._workers}
        sentinels = {w.proc.sentinel: w for w in self._workers}
        ready = connection.wait([*by_conn, *sentinels])
        for obj in ready:
            if obj in by_conn:
                self._drain(by_conn[obj])
        for obj in ready:
            if obj in sentinels:
                raise self._dead(sentinels[obj])

    def _drain(self, worker: _Worker) -> None:
        while worker.results.poll():
            try:
                msg = worker.results.recv()
            except (EOFError, OSError):
                raise self._dead(worker) from None
            self._handle(worker, msg)

    def _handle(self, worker: _Worker, msg: tuple) -> None:
        kind = msg[0]
        if kind == "done":
            _, seq, part, ok, errors, seconds = msg
            worker.sent.popleft()
            self._pending[seq].answers[part] = (ok, errors, seconds)
        elif kind == "ready":
            _, pid, modules = msg
            self.worker_modules[pid] = frozenset(modules)
            heavy = sorted(HEAVY_MODULES.intersection(modules))
            if heavy and len(self.worker_modules) == 1:  # once per pool: they all come from one server
                log.warning(
                    "decode worker %s loaded %s (imported by the parent's __main__ module?)", pid, ", ".join(heavy)
                )
        elif kind == "failed":
            raise ImgfeatError(f"decode worker {worker.proc.name} (pid {msg[1]}) failed: {msg[2]}")

    def _dead(self, worker: _Worker) -> ImgfeatError:
        worker.proc.join(JOIN_SECONDS)
        files = [path for _, paths in worker.sent for path in paths]
        return ImgfeatError(death_message(worker.proc.name, worker.proc.pid, worker.proc.exitcode, files))

    def _finish(self, pending: _Pending) -> Batch:
        del self._pending[pending.seq]
        raw = self._buffers[pending.slot]
        ok_rows: list[int] = []
        errors: list[ErrorRow] = []
        seconds = 0.0
        for part in range(pending.parts):  # parts in order: rows and errors in item order
            ok, errs, secs = pending.answers[part]
            ok_rows += ok
            errors += errs
            seconds += secs
        compact_rows(raw, ok_rows)
        ids = [pending.items[row].image_id for row in ok_rows]
        return Batch(ids, raw, errors, seconds, release=Release(self.ring, pending.slot))

    # -- shutdown

    def close(self) -> None:
        """Stop every worker, then unlink the segment (views handed out stay readable until dropped)."""
        if self._closed:
            return
        self._closed = True
        _stop_workers(self._workers)
        del self._buffers
        _unlink_and_close(self._shm)


def _stop_workers(workers: list[_Worker]) -> None:
    """Close the task pipes (idle workers exit), terminate busy ones, kill the stuck; join all."""
    for w in workers:
        w.tasks.close()
        if w.sent:
            w.proc.terminate()
    deadline = time.monotonic() + JOIN_SECONDS
    for w in workers:
        w.proc.join(max(0.0, deadline - time.monotonic()))
        if w.proc.exitcode is None:
            w.proc.kill()
            w.proc.join()
        w.results.close()
        w.proc.close()


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"decode pool {key} must be a positive integer, got {value!r}")


def _create_segment(nbytes: int, shape: tuple[int, ...]) -> Segment:
    """The ring's shared segment, after checking it fits: a full tmpfs would kill a worker with SIGBUS."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        st = None  # no /dev/shm (not Linux): let shared_memory decide
    if st is not None and st.f_bavail * st.f_frsize < nbytes:
        free = st.f_bavail * st.f_frsize
        raise ImgfeatError(
            f"decode processes need {nbytes / 2**20:.0f} MiB of shared memory for {shape[0]} buffers of "
            f"{shape[1]} images at {shape[2]}x{shape[3]}, but {SHM_DIR} has {free / 2**20:.0f} MiB free "
            "(in Docker raise --shm-size; or use a smaller batch, fewer buffers, or decode threads)"
        )
    return Segment(create=True, size=max(1, nbytes))


def _unlink_and_close(shm: SharedMemory) -> None:
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    try:
        shm.close()
    except BufferError:  # a consumer still holds a batch view: unmap once it is dropped
        _UNCLOSED.append(shm)


@atexit.register
def _retry_unclosed() -> None:
    for shm in list(_UNCLOSED):
        try:
            shm.close()
        except BufferError:
            continue
        _UNCLOSED.remove(shm)


def _context() -> Any:
    ctx = multiprocessing.get_context(START_METHOD)
    # The server imports the decode side once; each worker is then a cheap fork of it.
    ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


def prestart() -> None:
    """Start the fork server now, e.g. while the model builds: a fresh process's first pool then
    skips its ~1 s of imports. Idempotent; a no-op cost once the server runs."""
    _context()
    forkserver.ensure_running()


def pool_size(workers: int, chunks: list[list[Item]]) -> int:
    """Workers worth starting: a job of one short batch does not pay for processes it cannot use."""
    if len(chunks) == 1:
        return min(workers, len(split_rows(len(chunks[0]), workers)))
    return workers


def process_batches(
    items: Iterable[Item] | ChunkedItems,
    spec: InputSpec,
    run_id: str,
    workers: int,
    ahead: int,
    held: int = DEFAULT_HELD,
    nice: int = DEFAULT_NICE,
) -> Iterator[Batch]:
    """The thread path's contract (``make_batch`` per chunk, in todo order) decoded by ``workers``
    processes into ``ahead + held`` shared buffers. Call ``batch.release()`` when done with ``raw``
    (a consumer that holds every buffer and asks for one more waits for a release from another
    thread); ``nice``: the workers' priority (0 keeps the caller's)."""
    _check_positive(workers=workers, ahead=ahead)
    if isinstance(held, bool) or not isinstance(held, int) or held < 0:
        raise ConfigError(f"decode pool held must be an integer, 0 or more, got {held!r}")
    chunks = batch_chunks(items, spec.batch_size)
    first = list(itertools.islice(chunks, 2))  # peek: is this a one-batch job?
    if not first:
        return
    with DecodePool(spec, run_id, pool_size(workers, first), ahead + held, nice) as pool:
        yield from pool.batches(itertools.chain(first, chunks), ahead)
