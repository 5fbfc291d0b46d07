"""The extract stage: a manifest + a backbone spec -> a featureset (feature shards, error rows, provenance)."""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.extract.decode import EXIF_MODES, INTERPOLATIONS, DecodeConfig
from imgfeat.core.errors import ConfigError, unknown_value
from imgfeat.extract.featureset import PROVENANCE_FILE, committed_ids, error_shards, featureset_info
from imgfeat.extract.fingerprint import featureset_name as _name_of
from imgfeat.extract.fingerprint import make_provenance, weights_identity
from imgfeat.scan.manifest import dataset_root, manifest_file
from imgfeat.extract.shards import ShardWriter, error_row
from imgfeat.core.storage import WAIT_HINT, FileLock, read_shards, remove_stale_tmp, write_json_atomic
from imgfeat.core.workspace import Workspace

log = logging.getLogger(__name__)

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
STAGE_SCAN = "scan"
MANIFEST_BATCH_ROWS = 8192  # the manifest is streamed in record batches of this many rows
_MANIFEST_COLUMNS = [S.IMAGE_ID, S.PATH, S.STATUS, S.ERROR]


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `imgfeat extract` needs; every field but dataset/batch/shard/workers/wait is in the fingerprint."""

    dataset: str
    backbone: str
    weights: str | None = "imagenet"
    pooling: str = "avg"
    layer: str | None = None
    input_size: int | None = None
    batch_size: int = 32
    precision: str = "float32"
    dtype: str = "float16"
    shard_size: int = 1024
    npy: bool = False
    interpolation: str = "bilinear"
    fast_decode: bool = False
    exif: str = "rotate"
    seed: int = 0
    workers: int | None = None
    wait: float | None = None

    def __post_init__(self) -> None:
        from imgfeat.backbones import POOLINGS, get_backbone

        get_backbone(self.backbone)
        for kind, value, allowed in (
            ("pooling", self.pooling, POOLINGS),
            ("precision", self.precision, PRECISIONS),
            ("storage dtype", self.dtype, S.STORAGE_DTYPES),
            ("interpolation", self.interpolation, INTERPOLATIONS),
            ("exif mode", self.exif, EXIF_MODES),
        ):
            if value not in allowed:
                raise unknown_value(kind, str(value), allowed)
        for kind, value in (("batch size", self.batch_size), ("shard size", self.shard_size),
                            ("workers", self.workers if self.workers is not None else 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{kind} must be a positive integer, got {value!r}")


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
    scan_errors: collections.Counter = field(default_factory=collections.Counter)
    known_error_rows: int = 0  # rows whose image already has an error row in the featureset
    todo_rows: collections.Counter = field(default_factory=collections.Counter)  # id -> manifest rows


# ------------------------------------------------------------------------------- identity


def provenance_core(cfg: ExtractConfig) -> dict[str, Any]:
    """The inputs of the numbers, resolved (canonical backbone name, weights sha256, input size)."""
    from imgfeat.backbones import get_backbone
    from imgfeat.backbones.weights import resolve_weights

    spec = get_backbone(cfg.backbone)
    size = spec.check_input_size(cfg.input_size)
    ref = resolve_weights(spec, cfg.weights, size)
    return {
        "backbone": spec.name,
        "weights": weights_identity(ref.kind, ref.sha256, cfg.seed),
        "weights_kind": ref.kind,
        "weights_source": str(ref.path) if ref.kind == "file" else ref.kind,
        "seed": cfg.seed,
        "input_size": size,
        "pooling": cfg.pooling,
        "layer": cfg.layer,
        "interpolation": cfg.interpolation,
        "fast_decode": bool(cfg.fast_decode),
        "exif": cfg.exif,
        "precision": cfg.precision,
        "dtype": cfg.dtype,
    }


def featureset_name(cfg: ExtractConfig) -> str:
    """``<backbone>-<size>-<pooling or layer>-<dtype>-<fingerprint8>`` (no model work)."""
    return _name_of(provenance_core(cfg))


def config_from_provenance(prov: dict[str, Any], dataset: str = "files") -> ExtractConfig:
    """The ExtractConfig that made a featureset, rebuilt from its ``_featureset.json``."""
    weights = prov.get("weights_source") or "none"
    return ExtractConfig(
        dataset=dataset, backbone=prov["backbone"], weights=weights, pooling=prov["pooling"],
        layer=prov["layer"], input_size=prov["input_size"], precision=prov["precision"],
        dtype=prov["dtype"], interpolation=prov["interpolation"], fast_decode=prov["fast_decode"],
        exif=prov["exif"], seed=int(prov.get("seed", 0)),
    )


# ------------------------------------------------------------------------------- the reader


@dataclass
class DoneSets:
    """What a featureset already holds: ids with a feature row, ids with an error row, and the
    paths of error rows without an id (unreadable files: their resume key)."""

    features: set[str]
    errors: set[str]
    error_paths: set[str]

    @classmethod
    def read(cls, ws: Workspace, fs: str) -> "DoneSets":
        if not ws.featureset_dir(fs).is_dir():
            return cls(set(), set(), set())
        errors = read_shards(error_shards(ws, fs), [S.IMAGE_ID, S.PATH])  # one pass for both sets
        rows = [] if errors is None else errors.to_pylist()
        return cls(
            committed_ids(ws, fs),
            {r[S.IMAGE_ID] for r in rows if r[S.IMAGE_ID] is not None},
            {r[S.PATH] for r in rows if r[S.IMAGE_ID] is None and r[S.PATH] is not None},
        )


@contextlib.contextmanager
def open_featureset(ws: Workspace, fs: str, wait: float | None) -> Iterator[DoneSets]:
    """Hold the featureset's writer lock, clear a crashed writer's ``.tmp`` files, and yield what
    is already done. Every writer (local, Ray, extract_files) enters through here."""
    fs_dir = ws.featureset_dir(fs)
    with FileLock(fs_dir / ".lock", what=f"featureset {fs}", wait=wait, hint=WAIT_HINT):
        stale = remove_stale_tmp(fs_dir)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted run", stale)
        yield DoneSets.read(ws, fs)


def walk_manifest(ws: Workspace, dataset: str, done: DoneSets, tally: Tally, run_id: str,
                  on_error=None) -> Iterator[Any]:
    """Stream the manifest; yield an Item per image to extract, hand new scan-error rows to ``on_error``.

    Every row is counted exactly once: todo, reused, duplicate, known error or new scan error.
    """
    from imgfeat.extract.runner import Item

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
                        on_error(error_row(image_id, path, STAGE_SCAN, status, message, run_id))
            elif image_id in done.features:
                tally.reused += 1
            elif image_id in done.errors:
                tally.known_error_rows += 1
            else:
                tally.todo += 1
                tally.todo_rows[image_id] += 1
                yield Item(image_id, path)


def plan_extract(ws: Workspace, cfg: ExtractConfig) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------- the stage


def run_extract(ws: Workspace, cfg: ExtractConfig, run_id: str) -> dict[str, Any]:
    """Extract every manifest image not yet in the featureset; returns the run's summary."""
    t0 = time.perf_counter()
    manifest_file(ws, cfg.dataset)  # an unknown dataset fails before a featureset folder appears
    core = provenance_core(cfg)
    fs = _name_of(core)
    with open_featureset(ws, fs, cfg.wait) as done:
        plan = Tally()
        for _ in walk_manifest(ws, cfg.dataset, done, plan, run_id):
            pass
        out = _extract_manifest(ws, cfg, core, fs, done, plan.todo, run_id)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["images_per_s"] = round(out["extracted"] / out["seconds"], 2) if out["seconds"] else 0.0
    return out


def _extract_manifest(ws: Workspace, cfg: ExtractConfig, core: dict[str, Any], fs: str, done: DoneSets,
                      todo: int, run_id: str) -> dict[str, Any]:
    from imgfeat.extract.runner import LoopStats

    tally = Tally()
    if todo == 0:
        log.info("featureset %s already holds every image of %s: no model work", fs, cfg.dataset)
        session = _Session.without_model(ws, fs, core, cfg, run_id)
    else:
        session = _Session.open(ws, fs, core, cfg, run_id)
    try:
        items = walk_manifest(ws, cfg.dataset, done, tally, run_id, on_error=session.add_error)
        stats = session.run(items, todo) if todo else LoopStats()
        if not todo:
            for _ in items:  # write the scan-error rows, if any are new
                pass
        session.close()
    except BaseException:
        session.abort()
        raise
    return _summary(cfg, fs, tally, stats, session, done)


def _summary(cfg: ExtractConfig, fs: str, tally: Tally, stats, session: "_Session", done: DoneSets) -> dict:
    codes = collections.Counter(tally.scan_errors)
    codes.update(stats.errors)
    failed_rows = sum(tally.todo_rows[i] for i in stats.failed)
    error_rows = sum(tally.scan_errors.values()) + tally.known_error_rows + failed_rows
    return {
        "featureset": fs,
        "dataset": cfg.dataset,
        "manifest_rows": tally.rows,
        "extracted": stats.extracted,
        "reused": tally.reused,
        "duplicates": tally.duplicates,
        "errors": {"new": sum(codes.values()), "by_code": dict(sorted(codes.items())),
                   "known": tally.known_error_rows},
        "error_rows": error_rows,
        "error_rate": round(error_rows / tally.rows, 6) if tally.rows else 0.0,
        "model_built": session.model_built,
        "model_seconds": round(stats.model_seconds, 3),
        "decode_seconds": round(stats.decode_seconds, 3),
        "input_wait_seconds": round(stats.input_wait_seconds, 3),
        "build_seconds": round(session.build_seconds, 3),
        "shards": session.shards_written(),
        "batch_size": cfg.batch_size,
    }


class _Session:
    """One featureset write session: provenance on disk, the model (if needed) and the writer thread."""

    def __init__(self, ws: Workspace, fs: str, prov: dict[str, Any], cfg: ExtractConfig, run_id: str,
                 predict=None, preprocess=None) -> None:
        from imgfeat.extract.runner import WriterThread

        self.cfg, self.run_id, self.prov = cfg, run_id, prov
        self.predict, self.preprocess = predict, preprocess
        self.model_built = predict is not None
        self.build_seconds = 0.0
        folder = ws.featureset_dir(fs)
        self.shard_writer = ShardWriter(folder, run_id, prov, cfg.shard_size, cfg.npy)
        self.writer = WriterThread(self.shard_writer)

    @classmethod
    def without_model(cls, ws: Workspace, fs: str, core: dict, cfg: ExtractConfig, run_id: str) -> "_Session":
        path = ws.featureset_dir(fs) / PROVENANCE_FILE
        prov = featureset_info(ws, fs) if path.is_file() else None
        if prov is None:  # a manifest with only error rows still creates a described featureset
            prov = _write_provenance(ws, fs, core, _spec_dim(core))
        return cls(ws, fs, prov, cfg, run_id)

    @classmethod
    def open(cls, ws: Workspace, fs: str, core: dict, cfg: ExtractConfig, run_id: str) -> "_Session":
        # Said before Keras loads (seconds of silence otherwise): the first line a user sees is ours.
        log.info("building %s at %s px (%s weights) ...", core["backbone"], core.get("input_size"),
                 core.get("weights_kind", core.get("weights")))
        from imgfeat.backbones import get_backbone

        spec = get_backbone(core["backbone"])
        t0 = time.perf_counter()
        model = build_model(spec, cfg, core)
        build_seconds = time.perf_counter() - t0
        dim = int(model.outputs[0].shape[-1])
        path = ws.featureset_dir(fs) / PROVENANCE_FILE
        prov = featureset_info(ws, fs) if path.is_file() else _write_provenance(ws, fs, core, dim)
        preprocess = spec.preprocess_fn()
        session = cls(ws, fs, prov, cfg, run_id, predict=model.predict_on_batch, preprocess=preprocess)
        session.build_seconds = build_seconds
        return session

    def add_error(self, row: dict[str, Any]) -> None:
        self.writer.put([], None, [row])

    def run(self, items, todo: int):
        from imgfeat.extract.runner import default_workers, prefetch_batches, run_loop

        size = self.prov["input_size"]
        dcfg = DecodeConfig((size, size), self.cfg.interpolation, self.cfg.fast_decode, self.cfg.exif)
        workers = self.cfg.workers or default_workers()
        batches = prefetch_batches(items, self.cfg.batch_size, dcfg, self.preprocess, self.run_id, workers)
        return run_loop(batches, self.predict, self.writer, todo)

    def close(self) -> None:
        self.writer.close(commit=True)

    def abort(self) -> None:
        try:
            self.writer.close(commit=False)
        except BaseException:  # the original error is the one to report
            pass

    def shards_written(self) -> int:
        return sum(1 for n in self.shard_writer.written if not n.startswith("errors/"))


def _spec_dim(core: dict[str, Any]) -> int:
    from imgfeat.backbones import get_backbone

    dims = get_backbone(core["backbone"]).dims
    return int(dims.get(core["pooling"], 0)) if core["layer"] is None else 0


def _write_provenance(ws: Workspace, fs: str, core: dict[str, Any], dim: int) -> dict[str, Any]:
    prov = make_provenance(core, dim)
    assert prov["featureset"] == fs, (prov["featureset"], fs)
    write_json_atomic(prov, ws.featureset_dir(fs) / PROVENANCE_FILE)
    return prov


def build_model(spec, cfg: ExtractConfig, core: dict[str, Any]):
    """Build the backbone once, under the requested precision policy (restored afterwards)."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[cfg.precision])
    try:
        weights = core["weights_source"] if core["weights_kind"] == "file" else core["weights_kind"]
        return spec.build(weights, core["input_size"], cfg.pooling, cfg.layer, cfg.seed)
    finally:
        keras.config.set_dtype_policy(previous)


# ------------------------------------------------------------------------------- single files


def extract_files(ws: Workspace, featureset: str, paths: Sequence[str | Path], run_id: str,
                  wait: float | None = None) -> list[FileResult]:
    """Features for arbitrary image files, cached into an existing featureset (``imgfeat predict IMAGE``).

    Files are keyed by content: one already in the featureset costs a hash, not a model call.
    """
    cfg = config_from_provenance(featureset_info(ws, featureset))
    core = provenance_core(cfg)
    if _name_of(core) != featureset:
        raise ConfigError(
            f"featureset {featureset} cannot be extended here: its weights or options no longer resolve "
            f"to the same fingerprint (now {_name_of(core)}); was its weights file replaced?"
        )
    probes = [(str(p), _probe(p)) for p in paths]
    with open_featureset(ws, featureset, wait) as done:
        items, new_errors = _file_todo(probes, done, run_id)
        session = _Session.open(ws, featureset, core, cfg, run_id) if items else None
        if session is None and new_errors:
            session = _Session.without_model(ws, featureset, core, cfg, run_id)
        failed: dict[str, tuple[str, str]] = {}
        if session is not None:
            try:
                for row in new_errors:
                    session.add_error(row)
                if items:
                    failed = session.run(items, len(items)).failed
                session.close()
            except BaseException:
                session.abort()
                raise
    return _file_results(ws, featureset, probes, failed)


def _probe(path: str | Path):
    from PIL import Image

    from imgfeat.scan.probe import probe_file

    return probe_file(str(path), int(Image.MAX_IMAGE_PIXELS or 2**62))


def _file_todo(probes, done: DoneSets, run_id: str):
    from imgfeat.extract.runner import Item

    items, errors, seen = [], [], set()
    for path, pr in probes:
        key = pr.image_id or Path(path).absolute().as_posix()
        if key in seen or key in done.features or key in done.errors:
            continue
        seen.add(key)
        if pr.status != S.STATUS_OK:
            errors.append(error_row(pr.image_id, Path(path).absolute().as_posix(), STAGE_SCAN, pr.status,
                                    pr.error, run_id))
        else:
            items.append(Item(pr.image_id, Path(path).absolute().as_posix()))
    return items, errors


def _file_results(ws: Workspace, fs: str, probes, failed: dict[str, tuple[str, str]]) -> list[FileResult]:
    from imgfeat.extract.featureset import read_errors

    have = committed_ids(ws, fs)
    known = {r[S.IMAGE_ID]: (r[S.ERROR_CODE], r[S.ERROR_MESSAGE]) for r in read_errors(ws, fs).to_pylist()
             if r[S.IMAGE_ID] is not None}
    results = []
    for path, pr in probes:
        if pr.status != S.STATUS_OK:
            results.append(FileResult(path, pr.image_id, pr.status, pr.error))
        elif pr.image_id in have:
            results.append(FileResult(path, pr.image_id))
        else:
            code, message = failed.get(pr.image_id) or known.get(pr.image_id) or ("missing", "no feature row")
            results.append(FileResult(path, pr.image_id, code, message))
    return results
