"""The local executor: decoders (threads, processes or the GPU) feed fixed-shape uint8 batches to one model here."""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from imgfeat.core.results import JsonObject
from imgfeat.extract.batches import Batch, InputSpec, Item, chunked, make_batch, resolve_decode
from imgfeat.extract.executors import BatchReport, ExecutorConfig, ExtractJob, timed_build
from imgfeat.extract.forward import DEFAULT_DEPTH, Forward, in_flight
from imgfeat.extract.shards import refuse_non_finite

log = logging.getLogger(__name__)

# Decode threads run at a lower priority than the model's threads. On a CPU-only host both share
# the cores, and a decode thread preempting one of TensorFlow's intra-op threads stalls the whole op
# at its barrier; niced, decoding fills the model's idle gaps instead (prefetch keeps batches ready).
DECODE_NICE = 10
PROCESS_AHEAD = 3  # batches decoding in worker processes ahead of the model


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: decode at normal priority
        pass


def default_workers() -> int:
    """Decode threads: every core (Pillow's decode and resize release the GIL)."""
    return max(1, os.cpu_count() or 1)


def thread_batches(items: Iterable[Item], spec: InputSpec, run_id: str, workers: int) -> Iterator[Batch]:
    """Batches in todo order, each decoded by a pool thread, at most ``workers + 1`` ahead."""
    ahead = workers + 1
    initializer = _lower_priority if DECODE_NICE else None
    with ThreadPoolExecutor(workers, thread_name_prefix="imgfeat-decode", initializer=initializer) as pool:
        pending: collections.deque[Future] = collections.deque()
        try:
            for chunk in chunked(items, spec.batch_size):
                pending.append(pool.submit(make_batch, chunk, spec, run_id))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def decoded_batches(items: Iterable[Item], spec: InputSpec, run_id: str, workers: int,
                    depth: int = DEFAULT_DEPTH) -> Iterator[Batch]:
    """The decode mode's batch stream: threads, worker processes or the GPU (same contract)."""
    mode = resolve_decode(spec.decode, workers)
    log.debug("decoding with %s (%d workers)", mode, workers)
    if mode == "threads":
        return thread_batches(items, spec, run_id, workers)
    if mode == "processes":
        from imgfeat.extract.decodepool import process_batches

        # Every worker decodes a part of each batch, so a few batches ahead keep them all busy.
        return process_batches(items, spec, run_id, workers, ahead=PROCESS_AHEAD, held=depth + 1)
    from imgfeat.extract.gpudecode import gpu_batches

    return gpu_batches(items, spec, run_id, workers, ahead=depth + 1)


class LocalExecutor:
    """One model built here; batches from the decode mode's decoders; rows handed to the driver's sink."""

    name = "local"

    def __init__(self, cfg: ExecutorConfig = ExecutorConfig()) -> None:
        self.cfg = cfg
        self.workers = cfg.workers or default_workers()
        self.depth = cfg.in_flight

    def run(self, job: ExtractJob, items: Iterable[Item], sink: Any) -> Iterator[BatchReport]:
        if resolve_decode(job.inputs.decode, self.workers) == "processes":
            from imgfeat.extract.decodepool import prestart

            prestart()  # the decode processes' server starts while the model builds
        model, build = timed_build(job.resolved, job.resolved.recipe.precision)
        forward = Forward(model, job.resolved.spec.family, job.inputs.batch_shape)
        batches = decoded_batches(items, job.inputs, job.run_id, self.workers, self.depth)
        for landed in in_flight(forward, batches, self.depth):
            batch = landed.batch
            ids, X, refused = refuse_non_finite(batch.ids, landed.features, job.run_id)
            errors = batch.errors + refused
            sink.put(ids, X, errors)
            yield BatchReport(len(ids), errors, model_seconds=landed.model_seconds,
                              decode_seconds=batch.decode_seconds,
                              input_wait_seconds=landed.input_wait_seconds, build_seconds=build)
            build = 0.0

    def info(self) -> JsonObject:
        return {}
