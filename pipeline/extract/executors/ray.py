"""The Ray executor: the driver plans and records; Ray maps the shard task over backbone actors.

The extract driver does what it does for every executor before and after the model: it holds
the featureset lock for the whole run, writes the provenance, walks the manifest against the
committed ids (resume) and writes the scan-error rows. Only the todo list goes to Ray, cut into
shards of todo rows:

    todo rows --map_batches(ShardActor, actor pool, one per GPU)--> typed shard reports

Each actor builds the model once, then runs the shard task (``executors/local.run_shard``: decode,
forward, commit through the one FeaturesetWriter) on each shard it is given, writing the shard
straight into the workspace, and returns the shard's report (a ``BatchReport``) to the driver.

Why retries cannot duplicate or lose rows: every todo row carries its position in the todo list,
and a shard is named after its first position (``part-<run>-c<call>-ray-<first>.parquet``;
``c<call>`` keeps another extract call of the same run into this featureset apart), so names
never collide. A shard retried after its actor died is the same shard (Ray re-runs the task on the
same input block) and its writer is idempotent: a table whose shard is recorded already is not
written again, and one left unrecorded by the dead actor is never replaced (the retry takes the
next name; readers ignore the unrecorded one and the next writer sets it aside). The driver still
audits the outcome (every todo id ends as a feature or an error row, no id twice in this call's
committed shards) and fails the run otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.mirror import open_mirror
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import SHARD_PREFIX, column_values, remove_tree
from imgfeat.core.stores import parse_location, set_storage_options
from imgfeat.core.workspace import Workspace
from imgfeat.extract.batches import Item
from imgfeat.extract.decode import own_pixel_limit_warnings
from imgfeat.extract.executors.base import BatchReport, ExecutorConfig, ExtractJob, timed_build
from imgfeat.extract.executors.local import NO_SEAM, Shard, ShardSeam, default_workers, run_shard, shard_report
from imgfeat.extract.featureset import committed_ids, errored_ids, feature_shards
from imgfeat.extract.forward import DEFAULT_DEPTH, Forward

log = logging.getLogger(__name__)

NEEDS_RAY = "--executor ray needs Ray: pip install 'imgfeat[ray]'"
SHARD_TAG = "ray"  # part-<run>-c<call>-ray-<first todo position>.parquet
MAX_BATCH_ATTEMPTS = 3  # starts of one shard (a worker killed mid-shard restarts it) before the run fails
SHARDS_PER_WORKER = 4  # small todo lists are cut finer so decode overlaps the model
# Environment the workers must share with the driver so they build the same model.
# (Not CUDA_VISIBLE_DEVICES: Ray sets it per actor from the GPUs it assigns.)
FORWARDED_ENV = ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")

# Columns of the rows flowing through Ray (the shared ones come from schemas).
ROW = "row"  # position in the todo list: names the shard, keeps retries idempotent
REPORT = "report"  # the shard's BatchReport, as a Python object


def ray_tag(job: ExtractJob) -> str:
    """The call's shard tag plus ``ray``: a batch's shard is named by its first todo position, so a
    retried batch replaces only its own shard, never another call's."""
    return f"{job.shard_tag}-{SHARD_TAG}"


def attempts_dir(ws: Workspace, run_id: str) -> Path:
    """Per-run attempt counters, on the workspace's (shared) filesystem so every node sees them."""
    return ws.locks_dir / f"ray-{run_id}"


def count_attempt(folder: Path, first: int) -> int:
    """Record one more start of the batch named ``first``; return how many starts there were."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"batch-{first}"
    # O_APPEND: one byte per start, so the size is the count; O_NOFOLLOW: never through a planted link.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, b".")
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _attempt(job: ExtractJob, first: int) -> int:
    """count_attempt on the workspace's disk, or, for a workspace in a bucket, in the bucket."""
    mirror = job.ws.mirror
    if mirror is not None:
        return mirror.count(f".locks/ray-{job.run_id}/batch-{first}")
    return count_attempt(attempts_dir(job.ws, job.run_id), first)


# ------------------------------------------------------------------------------- the actor (runs on Ray)


class ShardActor:
    """A backbone actor: built once from the job, then the shard task on each shard of todo rows."""

    def __init__(self, job: ExtractJob, seam: ShardSeam, workers: int | None, depth: int = DEFAULT_DEPTH) -> None:
        own_pixel_limit_warnings()  # this actor's process is ours: no warning line forwarded to the driver
        if job.inputs.storage:  # --storage-option of the driver: this process reads the same objects
            set_storage_options(dict(job.inputs.storage))
        if job.workspace_uri is not None:
            # A workspace in a bucket: this worker shares no disk with the driver. It writes its
            # shards into a working folder of its own, each pushed to the bucket as it is committed.
            loc = parse_location(job.workspace_uri, "workspace")
            job = dataclasses.replace(
                job, ws=Workspace(open_mirror(loc, Path(tempfile.mkdtemp(prefix="imgfeat-worker-"))).root)
            )
        model, self.build_seconds = timed_build(job.resolved, job.resolved.recipe.precision)
        self.model = Forward(model, job.resolved.spec.family, job.inputs.batch_shape)
        # Decode threads in the actor (Pillow releases the GIL): every core of its node unless told.
        self.job, self.seam, self.depth = job, seam, depth
        self.workers = workers or default_workers(job.inputs.decode)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = int(batch[ROW].min())
        if _attempt(self.job, first) > MAX_BATCH_ATTEMPTS:
            # Ray retries a dead actor's batch for ever; a batch that keeps killing it must end the run.
            raise ImgfeatError(
                f"the batch of todo rows {first}..{int(batch[ROW].max())} killed its worker "
                f"{MAX_BATCH_ATTEMPTS} times (first image: {batch[S.IMAGE_ID][0]})"
            )
        items = [Item(str(i), str(p)) for i, p in zip(batch[S.IMAGE_ID], batch[S.PATH])]
        shard = Shard(first, items, ray_tag(self.job), seq=first, idempotent=True)
        report = shard_report(
            run_shard(self.job, shard, self.model, self.workers, self.depth, self.seam), self.build_seconds
        )
        self.build_seconds = 0.0
        out = np.empty(1, dtype=object)
        out[0] = report
        return {REPORT: out}


# ------------------------------------------------------------------------------- the executor


class RayExecutor:
    """``--executor ray``: the whole todo list goes to a Ray Dataset; actors commit their own shards."""

    name = "ray"

    def __init__(self, cfg: ExecutorConfig, seam: ShardSeam = NO_SEAM) -> None:
        self.cfg, self.seam = cfg, seam
        self.ray = import_ray()
        self.plan: dict[str, Any] = {}

    def run(self, job: ExtractJob, items: Iterable[Item], sink: Any) -> Iterator[BatchReport]:
        todo = list(items)  # the walk also hands the scan-error rows to the driver's sink
        try:
            with _connected(self.ray, self.cfg):
                self.plan = plan_pool(self.ray, self.cfg, len(todo), job.inputs.batch_size, job.shard_size)
                log.info(
                    "ray: %d image(s) in shards of %d on %d worker(s) (%s GPU, %s CPU each)",
                    len(todo),
                    self.plan["rows_per_shard"],
                    self.plan["workers"],
                    self.plan["gpus_per_worker"],
                    self.cfg.cpus_per_worker,
                )
                ds = _dataset(self.ray, job, self.cfg, todo, self.plan, self.seam)
                with contextlib.closing(_reports(ds)) as reports:
                    yield from reports
        finally:
            remove_tree(attempts_dir(job.ws, job.run_id), job.ws.root)
            if job.ws.mirror is not None:
                job.ws.mirror.remove_prefix(f".locks/ray-{job.run_id}")
        if job.ws.mirror is not None:  # the workers' shards are in the bucket: bring them here
            job.ws.mirror.pull()
        self.plan["duplicate_rows"] = _audit(job, todo)

    def info(self) -> JsonObject:
        # Timings are summed over actors (a restarted actor's build counts again: it was paid again).
        return {**self.plan, "ray_address": self.cfg.address or "default"}


def import_ray():
    """Ray is an optional extra: without it, a usage error (exit 2) that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(NEEDS_RAY) from None
    return ray


class _connected:
    """ray.init unless the caller already did; shut down only what we started."""

    def __init__(self, ray, ray_cfg: ExecutorConfig) -> None:
        self.ray, self.cfg, self.started = ray, ray_cfg, False

    def __enter__(self) -> None:
        if self.ray.is_initialized():
            return
        try:
            self.ray.init(address=self.cfg.address, include_dashboard=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            if "auth" in str(exc.__cause__ or "").lower():
                raise ConfigError(
                    f"the Ray cluster at {self.cfg.address!r} refused this client's token: export "
                    "RAY_AUTH_MODE=token and put the cluster's token in ~/.ray/auth_token (or $RAY_AUTH_TOKEN)"
                ) from None
            raise ConfigError(
                f"no Ray cluster at {self.cfg.address!r} ({exc}); start one with 'ray start --head' "
                "or leave --ray-address out to start a local one"
            ) from None
        self.started = True

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()


def plan_pool(ray, ray_cfg: ExecutorConfig, todo: int, batch_size: int, shard_size: int) -> JsonObject:
    """Actor count, GPUs per actor and rows per shard for this cluster; fail fast where Ray would hang."""
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    per_gpu = ray_cfg.gpus_per_worker if ray_cfg.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if per_gpu > gpus:
        raise ConfigError(f"--gpus-per-worker {per_gpu:g}: the Ray cluster has {gpus:g} GPU(s)")
    workers = ray_cfg.actors or (int(gpus // per_gpu) if per_gpu else _alive_nodes(ray))
    if workers * ray_cfg.cpus_per_worker >= cpus:  # Ray would wait for ever for a CPU to decode on
        raise ConfigError(
            f"{workers} worker(s) x {ray_cfg.cpus_per_worker:g} CPU would take all {cpus:g} CPU(s) "
            "of the Ray cluster and leave none for decoding; use fewer --ray-actors"
        )
    rows = min(shard_size, max(batch_size, math.ceil(todo / (SHARDS_PER_WORKER * workers))))
    rows = min(shard_size, math.ceil(rows / batch_size) * batch_size)
    workers = max(1, min(workers, math.ceil(todo / rows)))  # an actor with no shard is a wasted build
    return {"workers": workers, "gpus_per_worker": per_gpu, "rows_per_shard": rows}


def _alive_nodes(ray) -> int:
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def _dataset(ray, job: ExtractJob, ray_cfg: ExecutorConfig, todo: list[Item], plan: dict[str, Any], seam: ShardSeam):
    """The lazy Ray Dataset: todo blocks of one shard each -> a fixed pool of backbone actors."""
    _quiet_ray_data(ray)
    rows = plan["rows_per_shard"]
    ds = ray.data.from_arrow(_todo_blocks(todo, rows))
    return ds.map_batches(
        ShardActor,
        batch_size=rows,
        fn_constructor_args=(job, seam, ray_cfg.workers, ray_cfg.in_flight),
        compute=ray.data.ActorPoolStrategy(size=plan["workers"]),
        num_cpus=ray_cfg.cpus_per_worker,
        num_gpus=plan["gpus_per_worker"],
        runtime_env=_worker_env(plan["gpus_per_worker"]),
    )


def _quiet_ray_data(ray) -> None:
    """One progress bar (ours, on a TTY only) and no Ray Data INFO lines among the job's logs."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # uses up Ray's "progress bars disabled" notice


def _worker_env(gpus: float) -> dict[str, Any]:
    """Workers build the model the driver would: same Keras backend; GPU shares grow, not grab."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if 0 < gpus < 1:  # several actors per GPU: neither TensorFlow nor JAX may take all its memory
        env.update(TF_FORCE_GPU_ALLOW_GROWTH="true", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return {"env_vars": env}


def _todo_blocks(todo: list[Item], rows: int) -> list[pa.Table]:
    table = pa.table(
        {
            ROW: pa.array(range(len(todo)), pa.int64()),
            S.IMAGE_ID: pa.array([i.image_id for i in todo], pa.string()),
            S.PATH: pa.array([i.path for i in todo], pa.string()),
        }
    )
    return [table.slice(start, rows) for start in range(0, len(todo), rows)]


def _reports(ds: Any) -> Generator[BatchReport]:
    rows = ds.iter_rows()
    try:
        for row in rows:
            yield row[REPORT]
    finally:
        # Stop the streaming executor (and its actors) now, not whenever the generator is collected,
        # so an interrupted driver leaves no actor writing behind it.
        close = getattr(rows, "close", None)
        if close:
            close()


def _audit(job: ExtractJob, todo: list[Item]) -> int:
    """Every todo id ended as a feature or error row (raise if one is missing); return how many ids
    this call's shards hold twice."""
    ws, fs = job.ws, job.featureset
    prefix = f"{SHARD_PREFIX}{ray_tag(job)}-"
    mine = [p for p in feature_shards(ws, fs) if p.name.startswith(prefix)]
    ids = column_values(mine, S.IMAGE_ID)
    ended = committed_ids(ws, fs) | errored_ids(ws, fs)
    missing = [i.image_id for i in todo if i.image_id not in ended]
    if missing:
        raise ImgfeatError(
            f"the Ray run ended with {len(missing)} image(s) neither extracted nor errored "
            f"(first: {missing[0]}); rerun to extract them"
        )
    return len(ids) - len(set(ids))
