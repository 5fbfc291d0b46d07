"""The shard task both executors run (a shard's items -> decode -> forward -> commit -> reports) and the
local executor, which runs it shard after shard with one model here; Ray maps it (executors/ray.py)."""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from imgfeat.core.errors import ImgfeatError
from imgfeat.core.results import JsonObject
from imgfeat.extract.batches import Batch, InputSpec, Item, chunked, make_batch, resolve_decode
from imgfeat.extract.decodepool import prestart, process_batches
from imgfeat.extract.executors.base import BatchReport, ExecutorConfig, ExtractJob, timed_build
from imgfeat.extract.forward import DEFAULT_DEPTH, Forward, in_flight
from imgfeat.extract.gpudecode import gpu_batches
from imgfeat.extract.shards import FeaturesetDirs, FeaturesetWriter, refuse_non_finite

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


def decoded_batches(
    items: Iterable[Item], spec: InputSpec, run_id: str, workers: int, depth: int = DEFAULT_DEPTH
) -> Iterator[Batch]:
    """The decode mode's batch stream: threads, worker processes or the GPU (same contract)."""
    mode = resolve_decode(spec.decode, workers)
    log.debug("decoding with %s (%d workers)", mode, workers)
    if mode == "threads":
        return thread_batches(items, spec, run_id, workers)
    if mode == "processes":
        # Every worker decodes a part of each batch, so a few batches ahead keep them all busy.
        return process_batches(items, spec, run_id, workers, ahead=PROCESS_AHEAD, held=depth + 1)

    return gpu_batches(items, spec, run_id, workers, ahead=depth + 1)


# ------------------------------------------------------------------------------- the shard task


@dataclass(frozen=True)
class Shard:
    """One unit of executor work: ``items`` from position ``first`` of the todo list. ``tag``,
    ``seq`` and ``idempotent`` name its shards (see FeaturesetWriter)."""

    first: int
    items: Sequence[Item]
    tag: str
    seq: int = 0
    idempotent: bool = False


SEAM_POINTS = ("before_commit", "after_commit")


class ShardSeam:
    """The shard task's test seam: ``at(point, shard)`` runs at each of SEAM_POINTS of every shard.
    This one does nothing; ``Fault`` fails there. An object a caller passes in (it travels to Ray
    workers, so it must pickle), never something read from the environment."""

    def at(self, point: str, shard: Shard) -> None:
        pass


NO_SEAM = ShardSeam()
FAULT_ACTIONS = ("exit_before_commit", "exit_after_commit", "stop_after_one_shard")
FAULT_EXIT_CODE = 17


@dataclass(frozen=True)
class Fault(ShardSeam):
    """Injected faults for tests; the ``marker`` file (created once, atomically) makes one strike
    once across processes. ``exit_before_commit`` / ``exit_after_commit``: the first shard to
    claim the marker kills its process there (on Ray the actor restarts and the shard is retried).
    ``stop_after_one_shard``: the first shard commits, every later one raises before its commit,
    so the run fails with exactly one shard written (an interrupted run, for resume tests)."""

    action: str
    marker: str

    def __post_init__(self) -> None:
        if self.action not in FAULT_ACTIONS:
            raise ValueError(f"fault action {self.action!r}: expected one of {', '.join(FAULT_ACTIONS)}")

    def at(self, point: str, shard: Shard) -> None:
        if self.action == "stop_after_one_shard" and point == "before_commit":
            if not self._claim():
                raise ImgfeatError("test fault: the run stops after one shard")
        elif self.action == f"exit_{point}" and self._claim():
            log.warning("test fault %s: process %d exits now", self.action, os.getpid())
            os._exit(FAULT_EXIT_CODE)

    def _claim(self) -> bool:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False


def run_shard(
    job: ExtractJob, shard: Shard, forward: Forward, workers: int, depth: int = DEFAULT_DEPTH, seam: ShardSeam = NO_SEAM
) -> Iterator[BatchReport]:
    """The one shard task: decode the shard's items (the input mapper, ``decoded_batches``), run the
    model over them (``in_flight``), commit their feature and error rows through one FeaturesetWriter,
    and report. One report per batch as it lands (for progress); the last, after the commit, names
    the feature shards committed. A failure before the commit commits nothing of the shard."""
    dirs = FeaturesetDirs.of(job.ws, job.featureset)
    # One feature shard per task, committed at its end (shard_size above the items: never sooner).
    writer = FeaturesetWriter(
        dirs, shard.tag, job.provenance, len(shard.items) + 1, job.npy, start_seq=shard.seq, idempotent=shard.idempotent
    )
    for landed in in_flight(forward, decoded_batches(shard.items, job.inputs, job.run_id, workers, depth), depth):
        batch = landed.batch
        ids, X, refused = refuse_non_finite(batch.ids, landed.features, job.run_id) if batch.ids else ([], None, [])
        errors = batch.errors + refused
        writer.add_errors(errors)
        if ids:
            writer.add_features(ids, X)
        yield BatchReport(
            len(ids),
            errors,
            model_seconds=landed.model_seconds,
            decode_seconds=batch.decode_seconds,
            input_wait_seconds=landed.input_wait_seconds,
        )
    seam.at("before_commit", shard)
    writer.flush()
    seam.at("after_commit", shard)
    yield BatchReport(0, shards=writer.feature_shards)


def shard_report(reports: Iterable[BatchReport], build_seconds: float = 0.0) -> BatchReport:
    """A shard's batch reports as one (what a Ray worker sends back)."""
    out = BatchReport(0, build_seconds=build_seconds)
    for r in reports:
        out.extracted += r.extracted
        out.errors += r.errors
        out.model_seconds += r.model_seconds
        out.decode_seconds += r.decode_seconds
        out.input_wait_seconds += r.input_wait_seconds
        out.shards += r.shards
    return out


# ------------------------------------------------------------------------------- the local executor


class LocalExecutor:
    """One model built here; the todo list cut into shards of ``shard_size`` items, each run by the
    shard task in turn (rows committed by it, scan-error rows by the driver's sink)."""

    name = "local"

    def __init__(self, cfg: ExecutorConfig = ExecutorConfig(), seam: ShardSeam = NO_SEAM) -> None:
        self.cfg, self.seam = cfg, seam
        self.workers = cfg.workers or default_workers()
        self.depth = cfg.in_flight

    def run(self, job: ExtractJob, items: Iterable[Item], sink: Any) -> Iterator[BatchReport]:
        if resolve_decode(job.inputs.decode, self.workers) == "processes":
            prestart()  # the decode processes' server starts while the model builds
        model, build = timed_build(job.resolved, job.resolved.recipe.precision)
        forward = Forward(model, job.resolved.spec.family, job.inputs.batch_shape)
        first = 0
        for k, chunk in enumerate(chunked(items, job.shard_size)):
            shard = Shard(first, chunk, job.shard_tag, seq=k)
            for report in run_shard(job, shard, forward, self.workers, self.depth, self.seam):
                report.build_seconds, build = build, 0.0
                yield report
            first += len(chunk)

    def info(self) -> JsonObject:
        return {}
