"""The shard task both executors run (a shard's items -> decode -> forward -> commit -> reports) and the
local executor, which runs its halves shard after shard with one model here, over one decode stream
and one model queue for the whole todo list, each commit overlapping the next shard; Ray maps it
(executors/ray.py)."""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from imgfeat.core.errors import ImgfeatError
from imgfeat.core.results import JsonObject
from imgfeat.core.schemas import ErrorRow
from imgfeat.extract.batches import (
    Batch,
    ChunkedItems,
    InputSpec,
    Item,
    batch_chunks,
    chunked,
    make_batch,
    resolve_decode,
)
from imgfeat.extract.decodepool import prestart, process_batches
from imgfeat.extract.executors.base import BatchReport, ExecutorConfig, ExtractJob, timed_build
from imgfeat.extract.fetch import any_remote, prefetch
from imgfeat.extract.forward import DEFAULT_DEPTH, Forward, Landed, in_flight
from imgfeat.extract.gpudecode import READ_THREADS, gpu_batches
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


def default_workers(decode: str = "auto") -> int:
    """Decoders: every core (Pillow's decode and resize release the GIL); for GPU decode, the few read
    threads that keep nvJPEG fed (gpudecode.READ_THREADS: more only take cores from its own)."""
    cores = max(1, os.cpu_count() or 1)
    return min(cores, READ_THREADS) if decode == "gpu" else cores


def thread_batches(items: Iterable[Item] | ChunkedItems, spec: InputSpec, run_id: str, workers: int) -> Iterator[Batch]:
    """Batches in todo order, each decoded by a pool thread, at most ``workers + 1`` ahead."""
    ahead = workers + 1
    initializer = _lower_priority if DECODE_NICE else None
    with ThreadPoolExecutor(workers, thread_name_prefix="imgfeat-decode", initializer=initializer) as pool:
        pending: collections.deque[Future] = collections.deque()
        try:
            for chunk in batch_chunks(items, spec.batch_size):
                pending.append(pool.submit(make_batch, chunk, spec, run_id))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def decoded_batches(
    items: Iterable[Item] | ChunkedItems, spec: InputSpec, run_id: str, workers: int, depth: int = DEFAULT_DEPTH
) -> Iterator[Batch]:
    """The decode mode's batch stream: threads, worker processes or the GPU (same contract)."""
    mode = resolve_decode(spec.decode, workers)
    log.debug("decoding with %s (%d workers)", mode, workers)
    chunks = batch_chunks(items, spec.batch_size)
    first = next(chunks, None)
    if first is None:
        return iter(())
    chunks = itertools.chain([first], chunks)
    # objects in a store: fetched ahead by many concurrent GETs; local files: the decoders read them
    items = prefetch(ChunkedItems(chunks), spec) if any_remote(first) else ChunkedItems(chunks)
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
    the feature shards committed. A failure before the commit commits nothing of the shard.

    Its two halves are ``shard_rows`` (the landed batches into the shard's writer) and
    ``commit_shard``; the local executor runs the same two over its one stream across shards."""
    writer = shard_writer(job, shard)
    yield from shard_rows(
        job, writer, in_flight(forward, decoded_batches(shard.items, job.inputs, job.run_id, workers, depth), depth)
    )
    yield commit_shard(writer, shard, seam)


def shard_writer(job: ExtractJob, shard: Shard) -> FeaturesetWriter:
    """The shard's one FeaturesetWriter: one feature shard, committed at its end (shard_size above the
    items: never sooner)."""
    dirs = FeaturesetDirs.of(job.ws, job.featureset)
    return FeaturesetWriter(
        dirs, shard.tag, job.provenance, len(shard.items) + 1, job.npy, start_seq=shard.seq, idempotent=shard.idempotent
    )


def shard_rows(job: ExtractJob, writer: FeaturesetWriter, landed: Iterable[Landed]) -> Iterator[BatchReport]:
    """The shard's batches, back from the model, buffered into its writer (nothing written yet); one
    report per batch."""
    for one in landed:
        batch = one.batch
        ids: list[str] = []
        refused: list[ErrorRow] = []
        if batch.ids:
            assert one.features is not None, "a batch with images comes back with their features"
            ids, X, refused = refuse_non_finite(batch.ids, one.features, job.run_id)
        errors = batch.errors + refused
        writer.add_errors(errors)
        if ids:
            writer.add_features(ids, X)
        yield BatchReport(
            len(ids),
            errors,
            model_seconds=one.model_seconds,
            decode_seconds=batch.decode_seconds,
            input_wait_seconds=one.input_wait_seconds,
        )


def commit_shard(writer: FeaturesetWriter, shard: Shard, seam: ShardSeam = NO_SEAM) -> BatchReport:
    """Commit the shard's buffered rows (the seam's points either side); the report names its shards."""
    seam.at("before_commit", shard)
    writer.flush()
    seam.at("after_commit", shard)
    return BatchReport(0, shards=writer.feature_shards)


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


class ShardPlan:
    """The todo list cut into shards of ``shard_size`` items, and the shards into batch chunks for
    one decode stream (``chunks``): a batch never spans two shards. ``started`` holds, in order,
    the shards whose chunks the decoders have taken and whose batches have not all been handed out."""

    def __init__(self, items: Iterable[Item], shard_size: int, batch_size: int, tag: str) -> None:
        self.items, self.shard_size, self.batch_size, self.tag = items, shard_size, batch_size, tag
        self.started: collections.deque[Shard] = collections.deque()

    def chunks(self) -> Iterator[list[Item]]:
        first = 0
        for k, items in enumerate(chunked(self.items, self.shard_size)):
            self.started.append(Shard(first, items, self.tag, seq=k))
            first += len(items)
            yield from chunked(items, self.batch_size)

    def split(self, landed: Iterator[Landed]) -> Iterator[tuple[Shard, Iterator[Landed]]]:
        """The one landed stream as (shard, its landed batches), shard after shard; take each
        shard's batches before asking for the next shard."""
        while (head := next(landed, None)) is not None:
            shard = self.started.popleft()
            rest = -(-len(shard.items) // self.batch_size) - 1  # one batch per chunk (the decoders' contract)
            yield shard, itertools.chain([head], itertools.islice(landed, rest))


class CommitThread:
    """Shard commits off the model's thread, one at a time in shard order (as the old ShardSink
    wrote): a finished shard commits while the next one runs through the model. After a failed
    commit no later shard commits, and the failure is raised on the model's thread (``done``,
    ``wait``). ``close`` lets the commits handed over end (complete shards, which the shard task
    would have committed before going on), so a failure of a later shard leaves them committed."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="imgfeat-commit")
        self._pending: collections.deque[Future] = collections.deque()
        self._failed = False

    def submit(self, writer: FeaturesetWriter, shard: Shard, seam: ShardSeam) -> None:
        self._pending.append(self._pool.submit(self._commit, writer, shard, seam))

    def _commit(self, writer: FeaturesetWriter, shard: Shard, seam: ShardSeam) -> BatchReport | None:
        if self._failed:
            return None  # an earlier shard's commit failed: the run fails with it, this one stays out
        try:
            return commit_shard(writer, shard, seam)
        except BaseException:
            self._failed = True
            raise

    def done(self) -> Iterator[BatchReport]:
        """The reports of the commits ended so far, in shard order (a failed one raises)."""
        while self._pending and self._pending[0].done():
            if (report := self._pending.popleft().result()) is not None:
                yield report

    def wait(self, keep: int = 0) -> Iterator[BatchReport]:
        """The commits' reports, waiting for each until at most ``keep`` are left under way."""
        while len(self._pending) > keep:
            if (report := self._pending.popleft().result()) is not None:
                yield report

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class LocalExecutor:
    """One model built here, fed by one decode stream over the whole todo list (the decoders are not
    restarted per shard, nor the model's queue drained); the stream cut into shards of ``shard_size``
    items, each shard's rows and commit done by the shard task's halves (``shard_rows`` on the model's
    thread, ``commit_shard`` on a CommitThread, overlapping the next shard). Scan-error rows are
    the driver's sink's."""

    name = "local"

    def __init__(self, cfg: ExecutorConfig = ExecutorConfig(), seam: ShardSeam = NO_SEAM) -> None:
        self.cfg, self.seam = cfg, seam
        self.workers = cfg.workers
        self.depth = cfg.in_flight

    def run(self, job: ExtractJob, items: Iterable[Item], sink: Any) -> Iterator[BatchReport]:
        workers = self.workers or default_workers(job.inputs.decode)
        if resolve_decode(job.inputs.decode, workers) == "processes":
            prestart()  # the decode processes' server starts while the model builds
        model, build = timed_build(job.resolved, job.resolved.recipe.precision)
        forward = Forward(model, job.resolved.spec.family, job.inputs.batch_shape)
        plan = ShardPlan(items, job.shard_size, job.inputs.batch_size, job.shard_tag)
        batches = decoded_batches(ChunkedItems(plan.chunks()), job.inputs, job.run_id, workers, self.depth)
        commits = CommitThread()
        try:
            with contextlib.closing(in_flight(forward, batches, self.depth)) as landed:
                for shard, shard_landed in plan.split(landed):
                    writer = shard_writer(job, shard)
                    for report in shard_rows(job, writer, shard_landed):
                        report.build_seconds, build = build, 0.0
                        yield report
                        yield from commits.done()
                    commits.submit(writer, shard, self.seam)
                    # One commit under way while the next shard runs: a slow disk slows the model
                    # down instead of holding ever more finished shards in memory.
                    yield from commits.wait(keep=1)
            yield from commits.wait()
        finally:
            commits.close()

    def info(self) -> JsonObject:
        return {}
