"""The local executor: decode threads feed fixed-shape uint8 batches to one model on this machine."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from imgfeat.extract.batches import Batch, InputSpec, Item, chunked, make_batch, model_input
from imgfeat.extract.executors import BatchReport, ExecutorConfig, ExtractJob, timed_build

log = logging.getLogger(__name__)

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


def prepared_batch(items: list[Item], spec: InputSpec, preprocess: Callable, run_id: str) -> Batch:
    """make_batch plus the family's preprocessing, in a decode thread (off the model's)."""
    batch = make_batch(items, spec, run_id)
    batch.x = model_input(batch.raw, preprocess)
    return batch


def prefetch_batches(items: Iterable[Item], spec: InputSpec, preprocess: Callable, run_id: str,
                     workers: int) -> Iterator[Batch]:
    """Batches in todo order, each decoded by a pool thread, at most ``workers + 1`` ahead."""
    ahead = workers + 1
    initializer = _lower_priority if DECODE_NICE else None
    with ThreadPoolExecutor(workers, thread_name_prefix="imgfeat-decode", initializer=initializer) as pool:
        pending: collections.deque[Future] = collections.deque()
        try:
            for chunk in chunked(items, spec.batch_size):
                pending.append(pool.submit(prepared_batch, chunk, spec, preprocess, run_id))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


class LocalExecutor:
    """One model built here; batches decoded by a thread pool; rows handed to the driver's sink."""

    name = "local"

    def __init__(self, cfg: ExecutorConfig = ExecutorConfig()) -> None:
        self.cfg = cfg
        self.workers = cfg.workers or default_workers()

    def run(self, job: ExtractJob, items: Iterable[Item], sink: Any) -> Iterator[BatchReport]:
        model, build = timed_build(job.resolved, job.resolved.recipe.precision)
        preprocess = job.resolved.spec.preprocess_fn()
        waited = time.perf_counter()
        for batch in prefetch_batches(items, job.inputs, preprocess, job.run_id, self.workers):
            report = BatchReport(len(batch.ids), batch.errors, decode_seconds=batch.decode_seconds,
                                 input_wait_seconds=time.perf_counter() - waited, build_seconds=build)
            build, X = 0.0, None
            if batch.ids:
                t0 = time.perf_counter()
                X = np.asarray(model.predict_on_batch(batch.x), dtype=np.float32)[:len(batch.ids)]
                report.model_seconds = time.perf_counter() - t0
            sink.put(batch.ids, X, batch.errors)
            yield report
            waited = time.perf_counter()

    def info(self) -> dict[str, Any]:
        return {}
