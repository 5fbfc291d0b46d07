"""The extract driver: lock, provenance, resume plan, error rows, summary and timing, over an executor."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.backbones import POOLINGS, build_model, get_backbone
from imgfeat.backbones.hub import EMBEDDINGS
from imgfeat.core import names
from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ErrorRateExceeded, unknown_value
from imgfeat.core.options import opt
from imgfeat.core.progress import progress
from imgfeat.core.ranges import check_fields
from imgfeat.core.results import JsonObject
from imgfeat.core.schemas import ErrorRow
from imgfeat.core.storage import WAIT_HINT, FileLock, read_shards, remove_stale_tmp, write_json_atomic
from imgfeat.core.stores import storage_options
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.extract import gpudecode  # gpudecode.check_gpu_decode: looked up when called (tests patch it)
from imgfeat.extract.batches import DECODE_MODES, PROCESS_DECODE_MIN_WORKERS, InputSpec, Item, decode_mode_of, is_final
from imgfeat.extract.decode import (
    DEFAULT_MAX_FILE_BYTES,
    EXIF_MODES,
    INTERPOLATIONS,
    DecodeConfig,
    ReadError,
    open_regular_file,
)
from imgfeat.extract.executors import (
    PRECISIONS,
    BatchReport,
    Executor,
    ExecutorConfig,
    ExtractJob,
    make_executor,
)
from imgfeat.extract.executors.local import ShardSeam
from imgfeat.extract.featureset import (
    committed_ids,
    error_shards,
    migrate_layout,
    provenance_path,
    read_errors,
    read_provenance,
)
from imgfeat.extract.recipe import Provenance, Resolved, resolve_recipe
from imgfeat.extract.shards import FeaturesetDirs, FeaturesetWriter, ShardSink, next_shard_tag
from imgfeat.scan.manifest import dataset_root, manifest_file
from imgfeat.scan.probe import Probe, probe_file

log = logging.getLogger(__name__)

NOT_FOUND = "not_found"  # a file given to extract_files that does not exist (its error code)

__all__ = [
    "ExtractConfig",
    "ExtractSummary",
    "FileResult",
    "run_extract",
    "extract_files",
    "plan_extract",
    "featureset_name",
    "check_error_rate",
    "check_extract_error_rate",
    "check_recipe_name",
    "record_recipe_name",
    "open_featureset",
    "walk_manifest",
    "PRECISIONS",
]

STAGE_SCAN = "scan"
MANIFEST_BATCH_ROWS = 8192  # the manifest is streamed in record batches of this many rows
MAX_BATCH_BYTES = 8 << 30  # one float32 input batch above 8 GiB is a typo, not a plan
_MANIFEST_COLUMNS = [S.IMAGE_ID, S.PATH, S.STATUS, S.ERROR]


@dataclass(frozen=True)
class ExtractConfig:
    """What `imgfeat extract` is asked: the recipe's inputs (resolved into a Recipe once, by
    ``resolve_recipe``) and run options (dataset, batch_size, shard_size, npy, workers, wait,
    max_file_bytes, and decode unless it is "gpu") that never change the numbers."""

    dataset: str = opt(metavar="NAME", help="a dataset made by 'imgfeat scan'")
    backbone: str = opt(metavar="NAME", help="e.g. mobilenet_v2, resnet50 ('imgfeat backbones' lists them)")
    weights: str | None = opt(
        "imagenet",
        metavar="imagenet|none|PATH",
        help="ImageNet weights from the Keras cache, 'none' (seeded random, for tests), or a .weights.h5 file",
    )
    pooling: str = opt("avg", metavar="avg|max", help="global pooling of the last feature map")
    layer: str | None = opt(
        None, metavar="NAME", help="tap this inner layer (pooled with --pooling) instead of the last one"
    )
    input_size: int | None = opt(None, metavar="N", help="square input side (default: the backbone's, e.g. 224)")
    batch_size: int = opt(32, metavar="N", help="images per model call")
    precision: str = opt(
        "float32",
        metavar="float32|bfloat16|float16",
        help="compute precision (mixed policy); bfloat16 can help on recent CPUs, float16 is for GPUs",
    )
    dtype: str = opt(
        "float32",
        metavar="float32|float16",
        help="storage dtype of the features (default float32; float16 halves the disk but "
        "Spark cannot read it: 'Illegal Parquet type: FIXED_LEN_BYTE_ARRAY (FLOAT16)')",
    )
    shard_size: int = opt(1024, metavar="N", help="rows per shard")
    npy: bool = opt(False, help="also write part-*.npy sidecars (same row order)")
    interpolation: str = opt(
        "bilinear", metavar="NAME", help="resize filter: bilinear, nearest, bicubic, lanczos, box, hamming"
    )
    fast_decode: bool = opt(
        False,
        help="decode large JPEGs at 1/2, 1/4 or 1/8 scale before resizing (much "
        "faster, close to but not equal to a full decode; part of the fingerprint)",
    )
    exif: str = opt(
        "rotate",
        metavar="rotate|ignore",
        help="apply the EXIF orientation tag (rotate) or not, like keras.utils.load_img (ignore)",
    )
    seed: int = opt(0, metavar="N", help="seed of the random init with --weights none")
    workers: int | None = opt(
        None,
        metavar="N",
        help="decoders: threads or processes here (default: the CPU count; with --decode gpu, 4 read "
        "threads), concurrent decode tasks with --executor ray (default: as many as the cluster fits)",
    )
    wait: float | None = opt(
        None, metavar="SECONDS", help="wait this long for another writer of the same featureset instead of failing"
    )
    max_file_bytes: int = opt(
        DEFAULT_MAX_FILE_BYTES,
        metavar="N",
        help="a file larger than this is an error row (file_too_large), never read whole "
        f"(default {DEFAULT_MAX_FILE_BYTES >> 20} MiB; changes no numbers)",
    )
    # where files are decoded (DECODE_MODES); "gpu" also changes the numbers
    decode: str = opt(
        "auto",
        metavar="auto|threads|processes|gpu",
        help="where images are decoded: Pillow in threads, or in worker processes writing "
        "into shared batch buffers (auto: processes from %d workers up, where threads "
        "stop scaling); gpu (experimental: slower than processes where last measured, see the "
        "README): JPEGs decoded and resized in batches on the GPU, other files on the CPU "
        "(pip install 'imgfeat[gpu]', KERAS_BACKEND=jax; its numbers differ slightly from "
        "Pillow's, so it is part of the fingerprint)" % PROCESS_DECODE_MIN_WORKERS,
    )

    def __post_init__(self) -> None:
        get_backbone(self.backbone)
        check_fields(self)  # batch, shard and file sizes, workers, seed: the ranges of their flags and keys
        for kind, value, allowed in (
            # a keras-hub backbone's embedding (cls, proj, pool) passes; the message names avg and max
            ("pooling", self.pooling, EMBEDDINGS if self.pooling in EMBEDDINGS else POOLINGS),
            ("precision", self.precision, PRECISIONS),
            ("storage dtype", self.dtype, S.STORAGE_DTYPES),
            ("interpolation", self.interpolation, INTERPOLATIONS),
            ("exif mode", self.exif, EXIF_MODES),
            ("decode", self.decode, DECODE_MODES),
        ):
            if value not in allowed:
                raise unknown_value(kind, str(value), allowed)
        if self.decode == "gpu":  # before anything is written: the extra, the backend, a GPU
            gpudecode.check_gpu_decode(DecodeConfig((32, 32), self.interpolation, self.fast_decode, self.exif))

    def input_spec(self, resolved: Resolved) -> InputSpec:
        size = resolved.recipe.input_size
        if self.batch_size * size * size * 3 * 4 > MAX_BATCH_BYTES:
            raise ConfigError(
                f"batch size {self.batch_size} at input size {size} needs more than "
                f"{MAX_BATCH_BYTES >> 30} GiB per batch; use a smaller --batch-size"
            )
        storage = tuple(sorted(storage_options().items()))  # the workers' own, wherever they run
        return InputSpec(resolved.recipe.decode_config(), self.batch_size, self.max_file_bytes, self.decode, storage)

    @classmethod
    def from_provenance(cls, prov: Provenance, dataset: str = "files") -> ExtractConfig:
        """The config that made a featureset, rebuilt from its provenance (``imgfeat predict IMAGE``)."""
        r, src = prov.recipe, prov.source
        # A preset directory is found again by its path; a preset name through the cache.
        backbone = (
            src.path
            if src.kind == "preset" and src.path is not None and r.backbone.startswith("preset_")
            else r.backbone
        )
        return cls(
            dataset=dataset,
            backbone=backbone,
            weights=src.build_arg(),
            pooling=r.pooling,
            layer=r.layer,
            input_size=r.input_size,
            precision=r.precision,
            dtype=r.dtype,
            interpolation=r.interpolation,
            fast_decode=r.fast_decode,
            exif=r.exif,
            seed=src.seed,
            decode=decode_mode_of(r.decoder),
        )


@dataclass(frozen=True)
class FileResult:
    """One file given to extract_files: its image_id, or why it has no feature."""

    path: str
    image_id: str | None
    error_code: str | None = None
    error_message: str | None = None


@dataclass
class Tally:
    """What walking the manifest against the featureset found (counts only, no arrays)."""

    rows: int = 0
    todo: int = 0
    reused: int = 0
    duplicates: int = 0
    scan_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    known_error_rows: int = 0  # rows whose image already has an error row in the featureset
    todo_rows: collections.Counter[str] = field(default_factory=collections.Counter)  # id -> manifest rows
    other_paths: dict[str, list[str]] = field(default_factory=dict)  # todo id -> its later ok paths


@dataclass
class LoopStats:
    """The executor's reports, added up by the driver."""

    extracted: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    # image_id -> (code, message, final)
    failed: dict[str, tuple[str, str | None, bool]] = field(default_factory=dict)  # image_id -> (code, message, final)
    model_seconds: float = 0.0
    decode_seconds: float = 0.0  # summed over decode workers
    input_wait_seconds: float = 0.0  # the model waiting for a batch: the pipeline's stall time
    build_seconds: float = 0.0
    loop_seconds: float = 0.0  # wall time of the model loop, model builds excluded
    batches: int = 0
    shards: set[str] = field(default_factory=set)  # feature shards the shard tasks committed

    def add(self, report: BatchReport) -> None:
        self.extracted += report.extracted
        self.model_seconds += report.model_seconds
        self.decode_seconds += report.decode_seconds
        self.input_wait_seconds += report.input_wait_seconds
        self.build_seconds += report.build_seconds
        self.batches += 1
        self.shards.update(report.shards)
        for row in report.errors:
            self.errors[row.error_code] += 1
            if row.image_id is not None:  # always: an executor's rows are about items, which have ids
                self.failed[row.image_id] = (row.error_code, row.error_message, is_final(row.stage, row.error_code))


@dataclass(frozen=True)
class ExtractSummary:
    """One extract run's outcome; ``to_json()`` is the ``--json`` object and ``runs/<id>.json``.

    Timings are seconds rounded to the millisecond, as they are shown; the rates derive from them.
    """

    featureset: str
    dataset: str
    manifest_rows: int
    extracted: int
    reused: int
    duplicates: int
    errors_new: int
    errors_by_code: dict[str, int]
    errors_known: int
    error_rows: int
    model_built: bool
    shards: int
    batch_size: int
    seconds: float
    model_seconds: float = 0.0
    decode_seconds: float = 0.0  # summed over decode workers
    input_wait_seconds: float = 0.0
    build_seconds: float = 0.0
    loop_seconds: float = 0.0  # the model loop's wall time, model builds excluded
    executor: str = "local"
    executor_info: dict[str, Any] = field(default_factory=dict)
    # Shards this run's writer set right before planning: legacy ones recorded, a dead run's adopted,
    # strays or changed ones set aside (see core/commits.py).
    commit_records: dict[str, int] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return round(self.error_rows / self.manifest_rows, 6) if self.manifest_rows else 0.0

    @property
    def images_per_s(self) -> float:
        """Over the whole run: manifest walk, model build, decode, model and writes."""
        return round(self.extracted / self.seconds, 2) if self.seconds else 0.0

    @property
    def images_per_s_loop(self) -> float:
        """Over the model loop only (the model build and the manifest walk left out)."""
        loop = self.loop_seconds
        return round(self.extracted / loop, 2) if loop else 0.0

    def to_json(self) -> JsonObject:
        out: JsonObject = {
            "featureset": self.featureset,
            "dataset": self.dataset,
            "manifest_rows": self.manifest_rows,
            "extracted": self.extracted,
            "reused": self.reused,
            "duplicates": self.duplicates,
            "errors": {"new": self.errors_new, "by_code": dict(self.errors_by_code), "known": self.errors_known},
            "error_rows": self.error_rows,
            "error_rate": self.error_rate,
            "model_built": self.model_built,
            "model_seconds": self.model_seconds,
            "decode_seconds": self.decode_seconds,
            "input_wait_seconds": self.input_wait_seconds,
            "build_seconds": self.build_seconds,
            "loop_seconds": self.loop_seconds,
            "shards": self.shards,
            "batch_size": self.batch_size,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "images_per_s_loop": self.images_per_s_loop,
            "commit_records": {k: self.commit_records.get(k, 0) for k in ("recorded", "adopted", "set_aside")},
        }
        if self.executor != "local":
            out.update(self.executor_info, executor=self.executor)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ExtractSummary:
        derived = {"errors", "error_rate", "images_per_s", "images_per_s_loop", "executor"}
        own = {f.name for f in dataclasses.fields(cls)} | derived
        errors = obj["errors"]
        return cls(
            **{f.name: obj[f.name] for f in dataclasses.fields(cls) if f.name in obj and f.name not in derived},
            errors_new=errors["new"],
            errors_by_code=dict(errors["by_code"]),
            errors_known=errors["known"],
            executor=obj.get("executor", "local"),
            executor_info={k: v for k, v in obj.items() if k not in own},
        )


# ------------------------------------------------------------------------------- the error-rate policy


def check_error_rate(rates: dict[str, tuple[int, int]], limit: float | None) -> None:
    """The one error-rate policy: exit 3 when the error rows of any ``what -> (errors, images)`` are
    over ``limit`` (a fraction); everything was committed before this is asked."""
    if limit is None:
        return
    over = {what: (bad, total) for what, (bad, total) in rates.items() if total and bad / total > limit}
    if over:
        what, (bad, total) = max(over.items(), key=lambda kv: kv[1][0] / kv[1][1])
        raise ErrorRateExceeded(
            f"{bad} of {total} images ({bad / total:.1%}) in {what} ended as error rows, over "
            f"--max-error-rate {limit:g}; everything was committed (see the errors table)"
        )


def check_extract_error_rate(summary: ExtractSummary, limit: float | None) -> None:
    """The error-rate policy for one extract run's summary (``imgfeat extract --max-error-rate``)."""
    what = f"{summary.dataset} -> {summary.featureset}"
    check_error_rate({what: (summary.error_rows, summary.manifest_rows)}, limit)


# ------------------------------------------------------------------------------- recipe names


def check_recipe_name(name: str) -> None:
    """A recipe name is checked before any work, so a bad one never costs an extract."""
    check_name("featureset recipe", name)


def record_recipe_name(ws: Workspace, name: str, featureset: str) -> None:
    """Make ``featureset`` the latest of recipe ``name`` (``train --featureset NAME`` then means it):
    what ``extract --name``, a job file's ``[features.NAME]`` and ``imgfeat.extract(name=)`` record."""
    names.record(ws, names.FEATURESETS, name, featureset)


# ------------------------------------------------------------------------------- the reader side


@dataclass
class DoneSets:
    """What a featureset already holds: ids with a feature row, ids with a final error row, and the
    paths of error rows without an id (unreadable files: their resume key). Only a decode failure
    of the id's own bytes is final (``is_final``): read failures and files changed since the scan
    are tried again, and their old rows stay as history."""

    features: set[str]
    errors: set[str]
    error_paths: set[str]
    repaired: dict[str, int] = field(default_factory=dict)  # shards the opening writer recorded, adopted, set aside

    @classmethod
    def read(cls, ws: Workspace, fs: str) -> DoneSets:
        if not ws.featureset_dir(fs).is_dir():
            return cls(set(), set(), set())
        errors = read_shards(error_shards(ws, fs), [S.IMAGE_ID, S.PATH, S.STAGE, S.ERROR_CODE])  # one pass
        if errors is None:
            return cls(committed_ids(ws, fs), set(), set())
        final = errors.filter(_final_mask(errors))  # Arrow columns, never a dict per error row
        no_id = pc.is_null(final[S.IMAGE_ID])
        return cls(
            committed_ids(ws, fs),
            set(final[S.IMAGE_ID].drop_null().to_pylist()),
            set(final.filter(no_id)[S.PATH].drop_null().to_pylist()),
        )


def _final_mask(errors: pa.Table) -> pa.ChunkedArray:
    """Which error rows are final (``is_final``), asked once per distinct (stage, code) pair."""
    keys = pc.binary_join_element_wise(
        pc.fill_null(errors[S.STAGE], ""), pc.fill_null(errors[S.ERROR_CODE], ""), "\x1f"
    )
    # "stage\x1fcode", "" for a null one: is_final compares them with non-empty names only
    final = [k for k in pc.unique(keys).to_pylist() if is_final(*k.split("\x1f"))]
    return pc.is_in(keys, value_set=pa.array(final, pa.string()))


@contextlib.contextmanager
def open_featureset(ws: Workspace, fs: str, wait: float | None) -> Iterator[DoneSets]:
    """Hold the featureset's writer lock (under the workspace's ``.locks/``), bring an old layout
    up to date, clear a crashed writer's ``.tmp`` files, and yield what is already done."""
    with FileLock(ws.featureset_lock(fs), what=f"featureset {fs}", wait=wait, hint=WAIT_HINT):
        repaired = migrate_layout(ws, fs)
        stale = sum(remove_stale_tmp(d) for d in FeaturesetDirs.of(ws, fs).all())
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted run", stale)
        done = DoneSets.read(ws, fs)
        done.repaired = repaired
        yield done


def walk_manifest(
    ws: Workspace,
    dataset: str,
    done: DoneSets,
    tally: Tally,
    run_id: str,
    on_error: Callable[[ErrorRow], object] | None = None,
) -> Iterator[Item]:
    """Stream the manifest; yield an Item per image to extract, hand new scan-error rows to ``on_error``.

    Every row is counted exactly once: todo, reused, duplicate, known error or new scan error.
    """
    root = dataset_root(ws, dataset)
    seen: set[str] = set()
    pf = pq.ParquetFile(manifest_file(ws, dataset))
    for rb in pf.iter_batches(batch_size=MANIFEST_BATCH_ROWS, columns=_MANIFEST_COLUMNS):
        cols = rb.to_pydict()
        for image_id, rel, status, message in zip(*(cols[c] for c in _MANIFEST_COLUMNS)):
            tally.rows += 1
            path = (root / rel).as_posix()
            if image_id is not None and image_id in seen:
                tally.duplicates += 1
                if image_id in tally.todo_rows:
                    tally.todo_rows[image_id] += 1
                    if status == S.STATUS_OK:  # a second way to the same bytes, if the first fails
                        tally.other_paths.setdefault(image_id, []).append(path)
                elif status != S.STATUS_OK or image_id in done.errors:
                    tally.known_error_rows += 1
                continue
            if image_id is not None:
                seen.add(image_id)
            if status != S.STATUS_OK:
                key_done = image_id in done.errors if image_id is not None else path in done.error_paths
                if key_done:
                    tally.known_error_rows += 1
                else:
                    tally.scan_errors[status] += 1
                    if on_error is not None:
                        on_error(ErrorRow(image_id, path, STAGE_SCAN, status, message, run_id))
            elif image_id in done.features:
                tally.reused += 1
            elif image_id in done.errors:
                tally.known_error_rows += 1
            else:
                tally.todo += 1
                tally.todo_rows[image_id] += 1
                yield Item(image_id, path)


def featureset_name(cfg: ExtractConfig) -> str:
    """``<backbone>-<size>-<pooling or layer>-<dtype>-<fingerprint8>`` (no model work)."""
    return resolve_recipe(cfg).recipe.name()


def plan_extract(ws: Workspace, cfg: ExtractConfig) -> JsonObject:
    """What a run would do: featureset name, images to extract, rows already done (no model work)."""
    fs = featureset_name(cfg)
    tally = Tally()
    for _ in walk_manifest(ws, cfg.dataset, DoneSets.read(ws, fs), tally, run_id="plan"):
        pass
    return {
        "featureset": fs,
        "dataset": cfg.dataset,
        "todo": tally.todo,
        "done": tally.reused + tally.known_error_rows,
        "duplicates": tally.duplicates,
        "scan_errors": sum(tally.scan_errors.values()),
        "manifest_rows": tally.rows,
    }


# ------------------------------------------------------------------------------- provenance


def check_new_featureset(ws: Workspace, resolved: Resolved) -> int | None:
    """For a featureset that does not exist yet, what only a built model can tell, asked before
    any lock, folder or provenance is written (a run refused here leaves the workspace as it was):
    a weights file must fit the backbone, a layer tap must exist (and its width is only known from
    the built graph). The feature width, or None when the featureset exists already."""
    if provenance_path(ws, resolved.recipe.name()).is_file():
        return None
    r = resolved.recipe
    if resolved.source.kind != "file" and r.layer is None:
        return resolved.spec_dim()
    if resolved.source.kind != "file":
        return int(_layer_model(resolved).outputs[0].shape[-1])
    model = build_model(
        resolved.spec, resolved.source.build_arg(), r.input_size, r.pooling, r.layer, resolved_weights=resolved.ref
    )
    return int(model.outputs[0].shape[-1])


def ensure_provenance(ws: Workspace, resolved: Resolved, dim: int | None = None) -> Provenance:
    """The featureset's provenance: checked against its folder's name when it exists, written first
    when new, with the (empty) featureset folder, so a featureset of only error rows still lists.
    ``dim``: the width check_new_featureset found (without it, a layer tap's width is found by
    building the graph with random weights, which also rejects an unknown layer)."""
    fs = resolved.recipe.name()
    path = provenance_path(ws, fs)
    if path.is_file():
        prov = read_provenance(ws, fs)
        if prov.recipe != resolved.recipe or not prov.matches_name():
            raise ConfigError(
                f"{path} does not describe featureset {fs} (it was edited or copied from another "
                f"featureset); refusing to add rows to it. Restore the file, or move it and "
                f"{ws.featureset_dir(fs)} away and extract again"
            )
        return prov
    dim = dim or resolved.spec_dim()
    if not dim:
        dim = int(_layer_model(resolved).outputs[0].shape[-1])
    prov = Provenance.create(resolved, dim)
    write_json_atomic(prov.to_json(), ws.featureset_provenance(fs))
    ws.featureset_dir(fs).mkdir(parents=True, exist_ok=True)
    return prov


def _layer_model(resolved: Resolved) -> Any:  # a keras.Model
    r = resolved.recipe
    return build_model(resolved.spec, "none", r.input_size, r.pooling, r.layer)


# ------------------------------------------------------------------------------- the driver


def run_extract(
    ws: Workspace,
    cfg: ExtractConfig,
    run_id: str,
    executor: ExecutorConfig | None = None,
    seam: ShardSeam | None = None,
) -> ExtractSummary:
    """Extract every manifest image not yet in the featureset: the driver (resolve once, lock,
    provenance, plan, executor, error rows); returns the run's typed summary. ``seam``: the shard
    task's test seam (``executors.local.Fault``), for tests only."""
    t0 = time.perf_counter()
    manifest_file(ws, cfg.dataset)  # an unknown dataset fails before a featureset folder appears
    resolved = resolve_recipe(cfg)
    inputs = cfg.input_spec(resolved)
    ex_cfg = executor or ExecutorConfig()
    if ex_cfg.workers is None and cfg.workers is not None:  # workers given in the extract options
        ex_cfg = dataclasses.replace(ex_cfg, workers=cfg.workers)
    if ex_cfg.name == "ray" and cfg.decode not in ("auto", "processes"):
        raise ConfigError(
            f"decode = {cfg.decode!r} is for the local executor; on Ray, decode tasks are "
            "worker processes already (allowed there: auto, processes)"
        )
    ex = make_executor(ex_cfg, seam)
    fs = resolved.recipe.name()
    dim = check_new_featureset(ws, resolved)  # nothing is written before this has passed
    with open_featureset(ws, fs, cfg.wait) as done:
        plan = Tally()
        for _ in walk_manifest(ws, cfg.dataset, done, plan, run_id):
            pass
        prov = ensure_provenance(ws, resolved, dim)
        job = ExtractJob(
            ws,
            resolved,
            prov,
            inputs,
            cfg.shard_size,
            cfg.npy,
            run_id,
            next_shard_tag(FeaturesetDirs.of(ws, fs), run_id),
            ws.mirror.remote.uri if ws.mirror is not None else None,
        )
        tally, stats, sink = Tally(), LoopStats(), _sink(job)
        with _committing(sink):
            items = walk_manifest(ws, cfg.dataset, done, tally, run_id, on_error=sink.add_error)
            if plan.todo:
                _run_executor(ex, job, items, plan.todo, sink, stats)
                _retry_other_paths(ex, job, tally, sink, stats)
            else:
                log.info("featureset %s already holds every image of %s: no model work", fs, cfg.dataset)
                for _ in items:  # write the scan-error rows, if any are new
                    pass
    return _summary(cfg, fs, tally, stats, sink, ex, bool(plan.todo), time.perf_counter() - t0, done.repaired)


def _sink(job: ExtractJob) -> ShardSink:
    dirs = FeaturesetDirs.of(job.ws, job.featureset)
    return ShardSink(FeaturesetWriter(dirs, job.shard_tag, job.provenance, job.shard_size, job.npy))


@contextlib.contextmanager
def _committing(sink: ShardSink) -> Iterator[None]:
    """Flush the sink's last shard on success; on failure keep only what was committed."""
    try:
        yield
    except BaseException:
        sink.abort()
        raise
    sink.close(commit=True)


def _run_executor(
    ex: Executor, job: ExtractJob, items: Iterable[Item], total: int, sink: ShardSink, stats: LoopStats
) -> None:
    t0 = time.perf_counter()
    bar = None  # made at the first batch: the model's build log comes first, not a bar stuck at 0%
    try:
        for report in ex.run(job, items, sink):
            if bar is None:
                bar = progress(total=total, desc=f"extract ({ex.name})" if ex.name != "local" else "extract")
            stats.add(report)
            bar.update(report.extracted + len(report.errors))
    finally:
        if bar is not None:
            bar.close()
    stats.loop_seconds = max(0.0, time.perf_counter() - t0 - stats.build_seconds)


def _retry_other_paths(ex: Executor, job: ExtractJob, tally: Tally, sink: ShardSink, stats: LoopStats) -> None:
    """An id whose path failed to read (or no longer holds its bytes) gets its feature from another
    manifest path of the same bytes: one more round per copy left, until each id has a feature,
    a final error, or no path left."""
    while retry := [
        Item(i, tally.other_paths[i].pop(0))
        for i, (_, _, final) in stats.failed.items()
        if not final and tally.other_paths.get(i)
    ]:
        log.info("%d image(s) failed at one path: trying another copy of the same bytes", len(retry))
        for item in retry:
            del stats.failed[item.image_id]
        job = dataclasses.replace(job, shard_tag=next_shard_tag(FeaturesetDirs.of(job.ws, job.featureset), job.run_id))
        _run_executor(ex, job, retry, len(retry), sink, stats)


def _summary(
    cfg: ExtractConfig,
    fs: str,
    tally: Tally,
    stats: LoopStats,
    sink: ShardSink,
    ex: Executor,
    model_built: bool,
    seconds: float,
    repaired: dict[str, int],
) -> ExtractSummary:
    codes = collections.Counter(tally.scan_errors)
    codes.update(stats.errors)
    failed_rows = sum(tally.todo_rows[i] for i in stats.failed)
    return ExtractSummary(
        featureset=fs,
        dataset=cfg.dataset,
        manifest_rows=tally.rows,
        extracted=stats.extracted,
        reused=tally.reused,
        duplicates=tally.duplicates,
        errors_new=sum(codes.values()),
        errors_by_code=dict(sorted(codes.items())),
        errors_known=tally.known_error_rows,
        error_rows=sum(tally.scan_errors.values()) + tally.known_error_rows + failed_rows,
        model_built=model_built,
        shards=len(stats.shards),
        batch_size=cfg.batch_size,
        seconds=round(seconds, 3),
        model_seconds=round(stats.model_seconds, 3),
        decode_seconds=round(stats.decode_seconds, 3),
        input_wait_seconds=round(stats.input_wait_seconds, 3),
        build_seconds=round(stats.build_seconds, 3),
        loop_seconds=round(stats.loop_seconds, 3),
        executor=ex.name,
        executor_info=ex.info(),
        commit_records=dict(repaired),
    )


# ------------------------------------------------------------------------------- single files


def extract_files(
    ws: Workspace, featureset: str, paths: Sequence[str | Path], run_id: str, wait: float | None = None
) -> list[FileResult]:
    """Features for arbitrary image files, cached into an existing featureset (``imgfeat predict IMAGE``).

    The same driver over a file todo list. Files are keyed by content: one already in the
    featureset costs a hash, not a model call.
    """
    cfg = ExtractConfig.from_provenance(read_provenance(ws, featureset))
    resolved = resolve_recipe(cfg)
    if resolved.recipe.name() != featureset:
        raise ConfigError(
            f"featureset {featureset} cannot be extended here: its weights or options no longer resolve "
            f"to the same fingerprint (now {resolved.recipe.name()}); was its weights file replaced?"
        )
    probes = [(str(p), _probe(p)) for p in paths]
    stats = LoopStats()
    with open_featureset(ws, featureset, wait) as done:
        items, new_errors = _file_todo(probes, done, run_id)
        if items or new_errors:
            tag = next_shard_tag(FeaturesetDirs.of(ws, featureset), run_id)
            job = ExtractJob(
                ws,
                resolved,
                ensure_provenance(ws, resolved),
                cfg.input_spec(resolved),
                cfg.shard_size,
                cfg.npy,
                run_id,
                tag,
                ws.mirror.remote.uri if ws.mirror is not None else None,
            )
            sink = _sink(job)
            with _committing(sink):
                for row in new_errors:
                    sink.add_error(row)
                if items:
                    _run_executor(make_executor(ExecutorConfig()), job, items, len(items), sink, stats)
    return _file_results(ws, featureset, probes, stats.failed)


def _probe(path: str | Path) -> Probe:
    from PIL import Image

    if not os.path.lexists(path):  # given, never scanned: it may never have existed ("vanished" is for scanned files)
        return Probe(None, NOT_FOUND, f"{path}: no such file or folder")
    try:  # a FIFO or device given as a file must not hang the probe's plain open()
        open_regular_file(path).close()
    except ReadError as exc:
        return Probe(None, S.STATUS_UNREADABLE, exc.message)
    return probe_file(str(path), int(Image.MAX_IMAGE_PIXELS or 2**62))


def _file_todo(probes: Sequence[tuple[str, Probe]], done: DoneSets, run_id: str) -> tuple[list[Item], list[ErrorRow]]:
    items: list[Item] = []
    errors: list[ErrorRow] = []
    seen: set[str] = set()
    for path, pr in probes:
        key = pr.image_id or Path(path).absolute().as_posix()
        if key in seen or key in done.features or key in done.errors:
            continue
        seen.add(key)
        if pr.status == S.STATUS_OK and pr.image_id is not None:  # (an ok probe always has its id)
            items.append(Item(pr.image_id, Path(path).absolute().as_posix()))
        elif pr.image_id is not None:  # the bytes were read: a fact about this content, kept for every user
            errors.append(
                ErrorRow(pr.image_id, Path(path).absolute().as_posix(), STAGE_SCAN, pr.status, pr.error, run_id)
            )
        # A given file that could not be read at all is the caller's to report (predict prints it):
        # it says nothing about any image's content, so the shared featureset does not keep it.
    return items, errors


def _file_results(
    ws: Workspace,
    fs: str,
    probes: Sequence[tuple[str, Probe]],
    failed: Mapping[str, tuple[str, str | None, bool]],
) -> list[FileResult]:
    have = committed_ids(ws, fs)
    known = {
        r[S.IMAGE_ID]: (r[S.ERROR_CODE], r[S.ERROR_MESSAGE])
        for r in read_errors(ws, fs).to_pylist()
        if r[S.IMAGE_ID] is not None
    }
    results = []
    for path, pr in probes:
        if pr.status != S.STATUS_OK:
            results.append(FileResult(path, pr.image_id, pr.status, pr.error))
        elif pr.image_id in have:
            results.append(FileResult(path, pr.image_id))
        else:
            key = pr.image_id or ""  # an ok probe always has its id
            code, message = (failed.get(key) or known.get(key) or ("missing", "no feature row"))[:2]
            results.append(FileResult(path, pr.image_id, code, message))
    return results
