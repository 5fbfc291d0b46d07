"""The extract loop: todo items -> parallel decode + preprocess -> one compiled model -> shard writer thread."""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgfeat.core import schemas as S
from imgfeat.extract.decode import DecodeConfig, DecodeError, decode_image
from imgfeat.core.progress import progress
from imgfeat.extract.shards import ShardWriter, error_row

log = logging.getLogger(__name__)

STAGE_DECODE = "decode"
WRITE_QUEUE_BATCHES = 4  # bounded: a slow disk slows the model down instead of filling memory


@dataclass(frozen=True)
class Item:
    """One image to extract: its content id and the absolute path to read it from."""

    image_id: str
    path: str


@dataclass
class Batch:
    """A fixed-shape model input: the first ``len(ids)`` rows are real, the rest are padding."""

    ids: list[str]
    x: np.ndarray
    errors: list[dict[str, Any]]
    decode_seconds: float


@dataclass
class LoopStats:
    extracted: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # image_id -> (code, message)
    model_seconds: float = 0.0
    decode_seconds: float = 0.0  # summed over decode threads
    input_wait_seconds: float = 0.0  # the model thread waiting for a batch: the pipeline's stall time
    batches: int = 0


# Decode threads run at a lower priority than the model's threads. On a CPU-only host both share
# the cores, and a decode thread preempting one of TensorFlow's intra-op threads stalls the whole op
# at its barrier; niced, decoding fills the model's idle gaps instead (prefetch keeps batches ready).
DECODE_NICE = 10


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: decode at normal priority
        pass


def default_workers() -> int:
    """Decode threads: every core (Pillow's decode and resize release the GIL)."""
    return max(1, os.cpu_count() or 1)


def make_batch(items: list[Item], batch_size: int, dcfg: DecodeConfig,
               preprocess: Callable[[np.ndarray], Any], run_id: str) -> Batch:
    """The pure mapper of the input side: files -> one padded, preprocessed float32 batch."""
    t0 = time.perf_counter()
    h, w = dcfg.size
    raw = np.zeros((batch_size, h, w, 3), dtype=np.uint8)
    ids: list[str] = []
    errors: list[dict[str, Any]] = []
    for item in items:
        try:
            raw[len(ids)] = decode_image(item.path, dcfg)
            ids.append(item.image_id)
        except DecodeError as exc:
            errors.append(error_row(item.image_id, item.path, STAGE_DECODE, exc.code, exc.message, run_id))
    # Our own float32 copy, so the family's preprocess_input may work in place.
    x = np.asarray(preprocess(raw.astype(np.float32)), dtype=np.float32)
    return Batch(ids, x, errors, time.perf_counter() - t0)


def chunked(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prefetch_batches(items: Iterable[Item], batch_size: int, dcfg: DecodeConfig,
                     preprocess: Callable[[np.ndarray], Any], run_id: str, workers: int) -> Iterator[Batch]:
    """Batches in todo order, each decoded by a pool thread, at most ``workers + 1`` ahead."""
    ahead = workers + 1
    initializer = _lower_priority if DECODE_NICE else None
    with ThreadPoolExecutor(workers, thread_name_prefix="imgfeat-decode", initializer=initializer) as pool:
        pending: collections.deque[Future] = collections.deque()
        try:
            for chunk in chunked(items, batch_size):
                pending.append(pool.submit(make_batch, chunk, batch_size, dcfg, preprocess, run_id))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


class WriterThread:
    """Runs the ShardWriter off the model's thread; errors surface in the caller on put/close."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self._q: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="imgfeat-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            if self._exc is not None:
                continue  # drain after a failure so the producer never blocks for ever
            try:
                ids, X, errors = job
                if errors:
                    self.writer.add_errors(errors)
                if ids:
                    self.writer.add_features(ids, X)
            except BaseException as exc:  # re-raised on the model thread
                self._exc = exc

    def put(self, ids: list[str], X: np.ndarray | None, errors: list[dict[str, Any]]) -> None:
        self._raise()
        self._q.put((ids, X, errors))

    def close(self, commit: bool = True) -> None:
        """Stop the thread; with ``commit`` flush the last partial shard (not after a failure)."""
        self._q.put(None)
        self._thread.join()
        self._raise()
        if commit:
            self.writer.flush()

    def _raise(self) -> None:
        if self._exc is not None:
            raise self._exc


def run_loop(batches: Iterator[Batch], predict: Callable[[np.ndarray], Any], writer: WriterThread,
             total: int) -> LoopStats:
    """The model thread: one compiled call per fixed-shape batch; decode and writes overlap it."""
    stats = LoopStats()
    with progress(total=total, desc="extract") as bar:
        waited = time.perf_counter()
        for batch in batches:
            stats.input_wait_seconds += time.perf_counter() - waited
            stats.decode_seconds += batch.decode_seconds
            n = len(batch.ids)
            X = None
            if n:
                t0 = time.perf_counter()
                X = np.asarray(predict(batch.x), dtype=np.float32)[:n]
                stats.model_seconds += time.perf_counter() - t0
            writer.put(batch.ids, X, batch.errors)
            stats.extracted += n
            stats.batches += 1
            for row in batch.errors:
                stats.errors[row[S.ERROR_CODE]] += 1
                stats.failed[row[S.IMAGE_ID]] = (row[S.ERROR_CODE], row[S.ERROR_MESSAGE])
            bar.update(n + len(batch.errors))
            waited = time.perf_counter()
    return stats
