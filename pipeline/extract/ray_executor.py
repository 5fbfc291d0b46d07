"""Extract on Ray Data: todo rows -> CPU decode tasks -> backbone actors that commit their own shards.

The driver does what the local executor does before and after the model: it holds the
featureset lock for the whole run, writes the provenance, walks the manifest against the
committed ids (resume) and writes the scan-error rows. Only the todo list goes to Ray:

    todo rows --map_batches(decode_rows, CPU tasks)--> uint8 pixels + decode errors
              --map_batches(ShardActor, actor pool, one per GPU)--> one committed shard per batch

Why retries cannot duplicate or lose rows: every todo row carries its position in the
todo list, and an actor names the shard it writes after the first position of its batch
(``part-<run>-ray-<first>.parquet``). Batches partition the rows, so names never collide;
a batch retried after an actor dies is the same batch (Ray re-runs the task on the same
input blocks), so it rewrites the same name with the same rows through ``os.replace``.
A shard is committed only after all its rows are computed, so a crash leaves either the
whole shard or nothing. The driver still audits the outcome (every todo id ends as a
feature or an error row, no id twice in this run's shards) and fails the run otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from imgfeat.core import schemas as S
from imgfeat.extract.decode import DecodeConfig, decode_batch
from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.extract.extract import (
    DoneSets,
    ExtractConfig,
    Tally,
    _Session,
    _spec_dim,
    _summary,
    _write_provenance,
    build_model,
    open_featureset,
    provenance_core,
    walk_manifest,
)
from imgfeat.extract.runner import STAGE_DECODE, Item, LoopStats
from imgfeat.extract.fingerprint import featureset_name as featureset_name_of
from imgfeat.extract.featureset import PROVENANCE_FILE, featureset_info
from imgfeat.scan.manifest import manifest_file
from imgfeat.core.progress import progress
from imgfeat.extract.shards import ShardWriter, error_row
from imgfeat.core.storage import column_values, list_shards, shard_name
from imgfeat.core.workspace import Workspace

log = logging.getLogger(__name__)

NEEDS_RAY = "--executor ray needs Ray: pip install 'imgfeat[ray]'"
SHARD_TAG = "ray"  # part-<run>-ray-<first todo position>.parquet
ENV_FAULT = "IMGFEAT_RAY_FAULT"  # test hook, see Fault
FAULT_ACTIONS = ("exit_before_commit", "exit_after_commit", "stop_after_one_shard")
FAULT_EXIT_CODE = 17
MAX_BATCH_ATTEMPTS = 3  # starts of one batch (a worker killed mid-batch restarts it) before the run fails
SHARDS_PER_WORKER = 4  # small todo lists are cut finer so decode overlaps the model
# Environment the workers must share with the driver so they build the same model.
# (Not CUDA_VISIBLE_DEVICES: Ray sets it per actor from the GPUs it assigns.)
FORWARDED_ENV = ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")

# Columns of the rows flowing through Ray (the shared ones come from schemas).
ROW = "row"  # position in the todo list: names the shard, keeps retries idempotent
PIXELS = "pixels"
DECODE_SECONDS = "decode_seconds"
REPORT = "report"


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide to run: the cluster address and the backbone actor pool.

    ``address``: None connects to ``$RAY_ADDRESS`` or a cluster started on this machine, else
    starts a local one; ``"auto"`` requires an existing cluster; ``"ray://host:10001"`` is Ray
    Client; ``"local"`` always starts a private one. ``workers``: backbone actors (default one
    per GPU, or one per node without GPUs). ``gpus_per_worker``: default 1 when the cluster
    has GPUs, else 0. Batch and shard sizes come from the ExtractConfig.
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        a = self.address
        if a is not None and not (a in ("auto", "local") or a.startswith("ray://") or _host_port(a)):
            raise ConfigError(
                f"invalid Ray address {a!r}: use 'auto', 'local', 'ray://HOST:PORT' or HOST:PORT"
            )
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}")
        if self.gpus_per_worker is not None and not 0 <= self.gpus_per_worker:
            raise ConfigError(f"gpus per worker must be 0 or more, got {self.gpus_per_worker!r}")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"cpus per worker must be more than 0, got {self.cpus_per_worker!r}")


def _host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


@dataclass(frozen=True)
class Fault:
    """Test-only, from ``$IMGFEAT_RAY_FAULT=<action>:<marker file>``; the marker makes it strike once.

    ``exit_before_commit`` / ``exit_after_commit``: the first batch to claim the marker kills its
    actor process there (Ray restarts the actor and retries the batch). ``stop_after_one_shard``:
    the first batch claims the marker and commits, every later batch raises before committing,
    so the run fails with exactly one shard written (an interrupted run, for resume tests).
    """

    action: str
    marker: str

    @classmethod
    def from_env(cls) -> "Fault | None":
        value = os.environ.get(ENV_FAULT)
        if not value:
            return None
        action, _, marker = value.partition(":")
        if action not in FAULT_ACTIONS or not marker:
            raise ConfigError(f"{ENV_FAULT}={value!r}: expected '<{'|'.join(FAULT_ACTIONS)}>:<marker file>'")
        return cls(action, marker)

    def strike(self, point: str) -> None:
        """Called at ``before_commit`` and ``after_commit`` of every batch."""
        if self.action == "stop_after_one_shard" and point == "before_commit":
            if not self._claim():
                raise ImgfeatError("test fault: the run stops after one shard")
        elif self.action == f"exit_{point}" and self._claim():
            log.warning("test fault %s: worker %d exits now", self.action, os.getpid())
            os._exit(FAULT_EXIT_CODE)

    def _claim(self) -> bool:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False


def attempts_dir(ws: Workspace, run_id: str) -> Path:
    """Per-run attempt counters, on the workspace's (shared) filesystem so every node sees them."""
    return ws.locks_dir / f"ray-{run_id}"


def count_attempt(folder: Path, first: int) -> int:
    """Record one more start of the batch named ``first``; return how many starts there were."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"batch-{first}"
    with open(path, "ab") as fh:  # O_APPEND: one byte per start, so the size is the count
        fh.write(b".")
    return path.stat().st_size


# ------------------------------------------------------------------------------- mappers (run on Ray)


def decode_rows(batch: dict[str, np.ndarray], dcfg: DecodeConfig) -> dict[str, np.ndarray]:
    """CPU task: todo rows -> uint8 pixels at the model's size, plus the decode error per row."""
    t0 = time.perf_counter()
    pixels, errors = decode_batch(list(batch[S.PATH]), dcfg)
    codes = np.array([e.code if e else "" for e in errors], dtype=object)
    messages = np.array([e.message if e else "" for e in errors], dtype=object)
    seconds = (time.perf_counter() - t0) / max(1, len(errors))
    return {ROW: batch[ROW], S.IMAGE_ID: batch[S.IMAGE_ID], S.PATH: batch[S.PATH], PIXELS: pixels,
            S.ERROR_CODE: codes, S.ERROR_MESSAGE: messages, DECODE_SECONDS: np.full(len(errors), seconds)}


@dataclass
class ShardReport:
    """What one actor batch did; travels back to the driver as one JSON row."""

    shard: str
    extracted: int
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # image_id -> (code, message)
    model_seconds: float = 0.0
    decode_seconds: float = 0.0
    input_wait_seconds: float = 0.0  # the actor idle before this batch: the pipeline's stall time
    build_seconds: float = 0.0  # the actor's model build, reported with its first batch only
    pid: int = 0


@dataclass(frozen=True)
class ShardJob:
    """What every actor needs to build its model and write its shards: builders, not objects."""

    ws: Workspace
    cfg: ExtractConfig
    core: dict[str, Any]  # resolved inputs of the numbers (weights path as resolved now)
    prov: dict[str, Any]  # the featureset's provenance, as on disk: goes into every shard footer
    run_id: str
    fault: Fault | None = None


class ShardActor:
    """A backbone actor: built once from the job, then one committed shard per batch."""

    def __init__(self, job: ShardJob) -> None:
        from imgfeat.backbones import get_backbone

        t0 = time.perf_counter()
        spec = get_backbone(job.core["backbone"])
        self.model = build_model(spec, job.cfg, job.core)
        self.preprocess = spec.preprocess_fn()
        self.job, self.cfg, self.prov, self.run_id, self.fault = job, job.cfg, job.prov, job.run_id, job.fault
        self.idle_since = time.perf_counter()
        self.build_seconds = self.idle_since - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        first = int(batch[ROW].min())
        if count_attempt(attempts_dir(self.job.ws, self.run_id), first) > MAX_BATCH_ATTEMPTS:
            # Ray retries a dead actor's batch for ever; a batch that keeps killing it must end the run.
            raise ImgfeatError(f"the batch of todo rows {first}..{int(batch[ROW].max())} killed its worker "
                               f"{MAX_BATCH_ATTEMPTS} times (first file: {batch[S.PATH][0]})")
        ok = batch[S.ERROR_CODE] == ""
        t0 = time.perf_counter()
        X = self.forward(batch[PIXELS][ok])
        report = ShardReport(self._name(first), int(ok.sum()), model_seconds=time.perf_counter() - t0,
                             decode_seconds=float(batch[DECODE_SECONDS].sum()), pid=os.getpid(),
                             input_wait_seconds=t0 - self.idle_since, build_seconds=self.build_seconds)
        self.build_seconds = 0.0
        errors = [error_row(i, p, STAGE_DECODE, c, m, self.run_id) for i, p, c, m in zip(
            batch[S.IMAGE_ID][~ok], batch[S.PATH][~ok], batch[S.ERROR_CODE][~ok], batch[S.ERROR_MESSAGE][~ok])]
        report.failed = {r[S.IMAGE_ID]: (r[S.ERROR_CODE], r[S.ERROR_MESSAGE]) for r in errors}
        if self.fault:
            self.fault.strike("before_commit")
        self.commit(first, list(batch[S.IMAGE_ID][ok]), X, errors)
        if self.fault:
            self.fault.strike("after_commit")
        self.idle_since = time.perf_counter()
        return {REPORT: [json.dumps(report.__dict__)]}

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """Run the model in fixed-shape batches of ``batch_size`` (padded), as the local loop does."""
        n, bs = len(pixels), self.cfg.batch_size
        out = np.zeros((n, int(self.prov["dim"])), dtype=np.float32)
        for start in range(0, n, bs):
            chunk = pixels[start:start + bs]
            raw = np.zeros((bs, *chunk.shape[1:]), dtype=np.float32)
            raw[:len(chunk)] = chunk
            x = np.asarray(self.preprocess(raw), dtype=np.float32)
            out[start:start + len(chunk)] = np.asarray(self.model.predict_on_batch(x), np.float32)[:len(chunk)]
        return out

    def commit(self, first: int, ids: list[str], X: np.ndarray, errors: list[dict[str, Any]]) -> None:
        """Features then errors, each under the same deterministic name (so a retry overwrites)."""
        tag = f"{self.run_id}-{SHARD_TAG}"
        writer = ShardWriter(self.job.ws.featureset_dir(self.prov["featureset"]), tag, self.prov,
                             shard_size=max(1, len(ids) + 1), npy=self.cfg.npy, _seq=first, _err_seq=first)
        writer.add_errors(errors)
        if ids:
            writer.add_features(ids, X)
        writer.flush()

    def _name(self, first: int) -> str:
        return shard_name(f"{self.run_id}-{SHARD_TAG}", first)


# ------------------------------------------------------------------------------- the driver


def run_extract_ray(ws: Workspace, cfg: ExtractConfig, ray_cfg: RayConfig, run_id: str) -> dict[str, Any]:
    """``imgfeat extract --executor ray``: the local run's summary, computed on a Ray cluster."""
    ray = import_ray()
    fault = Fault.from_env()
    t0 = time.perf_counter()
    manifest_file(ws, cfg.dataset)  # an unknown dataset fails (did you mean ...?) before any folder appears
    core = provenance_core(cfg)
    fs = featureset_name_of(core)
    with open_featureset(ws, fs, cfg.wait) as done:
        prov = _ensure_provenance(ws, fs, core, cfg)
        session = _Session(ws, fs, prov, cfg, run_id)  # the driver's writer: scan-error rows only
        tally = Tally()
        try:
            todo = list(walk_manifest(ws, cfg.dataset, done, tally, run_id, on_error=session.add_error))
            job = ShardJob(ws, cfg, core, prov, run_id, fault)
            stats, info = _run_on_ray(ray, job, ray_cfg, todo) if todo else (LoopStats(), {"shards": 0})
            session.close()
        except BaseException:
            session.abort()
            raise
        finally:
            shutil.rmtree(attempts_dir(ws, run_id), ignore_errors=True)
        info.update(_audit(ws, fs, run_id, todo))
    out = _summary(cfg, fs, tally, stats, session, done)
    out.update(info, model_built=bool(todo), executor="ray")
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["images_per_s"] = round(out["extracted"] / out["seconds"], 2) if out["seconds"] else 0.0
    return out


def import_ray():
    """Ray is an optional extra: without it, a usage error (exit 2) that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(NEEDS_RAY) from None
    return ray


def _ensure_provenance(ws: Workspace, fs: str, core: dict[str, Any], cfg: ExtractConfig) -> dict[str, Any]:
    """The featureset's provenance, written first (by the driver) when the featureset is new."""
    if (ws.featureset_dir(fs) / PROVENANCE_FILE).is_file():
        return featureset_info(ws, fs)
    dim = _spec_dim(core)
    if not dim:  # a layer tap: its width is only known from the built graph (random weights are enough)
        from imgfeat.backbones import get_backbone

        model = get_backbone(core["backbone"]).build("none", core["input_size"], cfg.pooling, cfg.layer)
        dim = int(model.outputs[0].shape[-1])
    return _write_provenance(ws, fs, core, dim)


def _run_on_ray(ray, job: ShardJob, ray_cfg: RayConfig, todo: list[Item]) -> tuple[LoopStats, dict[str, Any]]:
    with _connected(ray, ray_cfg):
        plan = plan_pool(ray, ray_cfg, len(todo), job.cfg)
        log.info("ray: %d image(s) in shards of %d on %d worker(s) (%s GPU, %s CPU each)", len(todo),
                 plan["rows_per_shard"], plan["workers"], plan["gpus_per_worker"], ray_cfg.cpus_per_worker)
        ds = _dataset(ray, job, ray_cfg, todo, plan)
        stats, shards, build = LoopStats(), 0, 0.0
        with progress(total=len(todo), desc="extract (ray)") as bar, contextlib.closing(_reports(ds)) as reports:
            for report in reports:
                _add_report(stats, report)
                shards += 1 if report.extracted else 0
                build += report.build_seconds
                bar.update(report.extracted + len(report.failed))
    # Timings are summed over actors (a restarted actor's build counts again: it was paid again).
    return stats, {"shards": shards, "build_seconds": round(build, 3), "ray_address": ray_cfg.address or "default",
                   **plan}


class _connected:
    """ray.init unless the caller already did; shut down only what we started."""

    def __init__(self, ray, ray_cfg: RayConfig) -> None:
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


def plan_pool(ray, ray_cfg: RayConfig, todo: int, cfg: ExtractConfig) -> dict[str, Any]:
    """Actor count, GPUs per actor and rows per shard for this cluster; fail fast where Ray would hang."""
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    per_gpu = ray_cfg.gpus_per_worker if ray_cfg.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if per_gpu > gpus:
        raise ConfigError(f"--gpus-per-worker {per_gpu:g}: the Ray cluster has {gpus:g} GPU(s)")
    workers = ray_cfg.workers or (int(gpus // per_gpu) if per_gpu else _alive_nodes(ray))
    if workers * ray_cfg.cpus_per_worker >= cpus:  # Ray would wait for ever for a CPU to decode on
        raise ConfigError(
            f"{workers} worker(s) x {ray_cfg.cpus_per_worker:g} CPU would take all {cpus:g} CPU(s) "
            "of the Ray cluster and leave none for decoding; use fewer --workers"
        )
    rows = min(cfg.shard_size, max(cfg.batch_size, math.ceil(todo / (SHARDS_PER_WORKER * workers))))
    rows = min(cfg.shard_size, math.ceil(rows / cfg.batch_size) * cfg.batch_size)
    workers = max(1, min(workers, math.ceil(todo / rows)))  # an actor with no shard is a wasted build
    return {"workers": workers, "gpus_per_worker": per_gpu, "rows_per_shard": rows}


def _alive_nodes(ray) -> int:
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def _dataset(ray, job: ShardJob, ray_cfg: RayConfig, todo: list[Item], plan: dict[str, Any]):
    """The lazy Ray Dataset: todo blocks -> decode tasks -> a fixed pool of backbone actors."""
    _quiet_ray_data(ray)
    cfg, size = job.cfg, job.prov["input_size"]
    dcfg = DecodeConfig((size, size), cfg.interpolation, cfg.fast_decode, cfg.exif)
    ds = ray.data.from_arrow(_todo_blocks(todo, cfg.batch_size))
    # The memory reservation is real (a batch of pixels plus the worker), and also keeps Ray from
    # fusing decode into the actor, which would serialise decoding and the model in one process.
    decode_mem = 256 * 2**20 + 2 * cfg.batch_size * size * size * 3
    ds = ds.map_batches(decode_rows, batch_size=cfg.batch_size, fn_args=(dcfg,), num_cpus=1,
                        memory=decode_mem, runtime_env=_worker_env(0))
    return ds.map_batches(
        ShardActor, batch_size=plan["rows_per_shard"], fn_constructor_args=(job,),
        compute=ray.data.ActorPoolStrategy(size=plan["workers"]), num_cpus=ray_cfg.cpus_per_worker,
        num_gpus=plan["gpus_per_worker"], runtime_env=_worker_env(plan["gpus_per_worker"]),
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
    table = pa.table({ROW: pa.array(range(len(todo)), pa.int64()),
                      S.IMAGE_ID: pa.array([i.image_id for i in todo], pa.string()),
                      S.PATH: pa.array([i.path for i in todo], pa.string())})
    return [table.slice(start, rows) for start in range(0, len(todo), rows)]


def _reports(ds) -> Iterator[ShardReport]:
    rows = ds.iter_rows()
    try:
        for row in rows:
            yield ShardReport(**json.loads(row[REPORT]))
    finally:
        # Stop the streaming executor (and its actors) now, not whenever the generator is collected,
        # so an interrupted driver leaves no actor writing behind it.
        close = getattr(rows, "close", None)
        if close:
            close()


def _add_report(stats: LoopStats, report: ShardReport) -> None:
    stats.extracted += report.extracted
    stats.model_seconds += report.model_seconds
    stats.decode_seconds += report.decode_seconds
    stats.input_wait_seconds += report.input_wait_seconds
    stats.batches += 1
    for image_id, (code, message) in report.failed.items():
        stats.errors[code] += 1
        stats.failed[image_id] = (code, message)


def _audit(ws: Workspace, fs: str, run_id: str, todo: list[Item]) -> dict[str, Any]:
    """Every todo id ended as exactly one feature or error row; raise if one is missing."""
    prefix = f"part-{run_id}-{SHARD_TAG}-"
    mine = [p for p in list_shards(ws.featureset_dir(fs)) if p.name.startswith(prefix)]
    ids = column_values(mine, S.IMAGE_ID)
    done = DoneSets.read(ws, fs)
    missing = [i.image_id for i in todo if i.image_id not in done.features and i.image_id not in done.errors]
    if missing:
        raise ImgfeatError(
            f"the Ray run ended with {len(missing)} image(s) neither extracted nor errored "
            f"(first: {missing[0]}); rerun to extract them"
        )
    return {"duplicate_rows": len(ids) - len(set(ids))}
