"""The predict stage: a head applied to a dataset's features (streamed) or to image files, into the predictions table."""

from __future__ import annotations

import glob
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.core import names as N
from imgfeat.core import schemas as S
from imgfeat.core.commits import Adoptable, ShardWriter, list_committed, reconcile
from imgfeat.core.errors import ConfigError
from imgfeat.core.keys import KeyIndex, KeySet, keys_to_arrow
from imgfeat.core.options import opt
from imgfeat.core.progress import progress
from imgfeat.core.ranges import check_fields
from imgfeat.core.results import JsonObject, JsonResult
from imgfeat.core.sizes import memory_budget, release_freed_memory
from imgfeat.core.storage import WAIT_HINT, FileLock, remove_stale_tmp
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.extract.extract import FileResult, extract_files
from imgfeat.extract.featureset import iter_features, load_features
from imgfeat.heads.artifacts import LoadedHead, load_head
from imgfeat.heads.data import LEFT_OUT_JSON_MAX, ManifestImages
from imgfeat.heads.versions import resolve_head
from imgfeat.scan.walk import WalkOptions, WalkStats, walk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictConfig:
    """Which head (id, name or name@id), and what to predict: a dataset's images or image files.

    ``paths`` may hold files, folders (walked like ``imgfeat scan``) and glob patterns.
    """

    head_id: str = opt(flag="--head", metavar="HEAD", help="a head name (its latest version), NAME@ID, or id")
    dataset: str | None = opt(None, metavar="NAME", help="predict every image of this dataset")
    paths: tuple[str, ...] = ()
    top_k: int = opt(5, metavar="K", help="labels kept per image")
    chunk_rows: int = 8192  # feature rows read and scored at a time: memory stays flat
    shard_rows: int = 262_144  # rows per output shard
    wait: float | None = opt(
        None,
        metavar="SECONDS",
        help="wait up to this long for another process writing this head's predictions (or its featureset, for image files), instead of exiting at once",
    )
    trust_pickle: bool = False  # load an old joblib (pickle) head; only for files you trust
    memory_budget: int | None = opt(
        None, metavar="SIZE", help="memory for features held at once, e.g. 256MB or 2GiB (default: a quarter of RAM)"
    )

    def __post_init__(self) -> None:
        N.check_ref(N.HEADS, self.head_id)
        if (self.dataset is None) == (not self.paths):
            raise ConfigError("predict needs either a dataset (--dataset NAME) or image paths, not both")
        if self.dataset is not None:
            check_name("dataset", self.dataset)
        for name in ("top_k", "chunk_rows", "shard_rows"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        check_fields(self)  # the ranges its flags and job-file keys have (core/ranges.py)


@dataclass(frozen=True)
class Scored:
    """Mapper output for a batch of feature rows."""

    pred_label: np.ndarray
    pred_score: np.ndarray
    topk_labels: pa.Array
    topk_scores: pa.Array


def score(head: LoadedHead, X: np.ndarray, top_k: int) -> Scored:
    """Pure mapper: features -> best label, its probability, and the top-k labels and scores."""
    proba = np.asarray(head.estimator.predict_proba(X), dtype=np.float32)
    classes = np.asarray(head.estimator.classes_, dtype=object)
    k = min(top_k, len(classes))
    # argsort of the negation is stable, so ties keep the classes' order (as argmax does).
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(proba, order, axis=1)
    offsets = pa.array(np.arange(0, (len(X) + 1) * k, k, dtype=np.int32))
    return Scored(
        pred_label=classes[order[:, 0]] if len(X) else np.array([], dtype=object),
        pred_score=top_scores[:, 0] if len(X) else np.array([], dtype=np.float32),
        topk_labels=pa.ListArray.from_arrays(offsets, pa.array(classes[order].ravel().tolist(), pa.string())),
        topk_scores=pa.ListArray.from_arrays(offsets, pa.array(top_scores.ravel(), pa.float32())),
    )


def predictions_table(
    ids: Sequence[str] | pa.Array | pa.ChunkedArray,
    paths: Sequence[str | None] | pa.Array | pa.ChunkedArray,
    labels: Sequence[str | None] | pa.Array | pa.ChunkedArray,
    splits: Sequence[str | None] | pa.Array | pa.ChunkedArray,
    scored: Scored,
    head: LoadedHead,
    run_id: str,
    dataset: str,
) -> pa.Table:
    """Pure mapper: scored rows -> the predictions table; ``dataset`` is a dataset or ``files``."""
    n = len(ids)
    return pa.table(
        {
            S.IMAGE_ID: _strings(ids),
            S.PATH: _strings(paths),
            S.LABEL: _strings(labels),
            S.SPLIT: _strings(splits),
            S.PRED_LABEL: pa.array(scored.pred_label.tolist(), pa.string()),
            S.PRED_SCORE: pa.array(scored.pred_score, pa.float32()),
            S.TOPK_LABELS: scored.topk_labels.cast(pa.list_(pa.string())),
            S.TOPK_SCORES: scored.topk_scores.cast(pa.list_(pa.float32())),
            S.HEAD_ID: pa.array([head.head_id] * n, pa.string()),
            S.FEATURESET: pa.array([head.featureset] * n, pa.string()),
            S.RUN_ID: pa.array([run_id] * n, pa.string()),
            S.DATASET: pa.array([dataset] * n, pa.string()),
        },
        schema=S.PREDICTIONS_SCHEMA,
    )


def _strings(values: Sequence[str | None] | pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values.cast(pa.string())
    return pa.array(list(values), pa.string())


def predicted_ids(ws: Workspace, head_id: str, dataset: str | None = None) -> set[str]:
    """image_ids this head already predicted (for ``dataset``, or for image files when None).

    Rows of tables written before the ``dataset`` column existed count for every dataset.
    """
    folder = ws.predictions_dir(head_id) if dataset else ws.file_predictions_dir(head_id)
    table = _read(prediction_shards(folder), [S.IMAGE_ID, S.DATASET])
    if dataset:
        keep = [d is None or d == dataset for d in table.column(S.DATASET).to_pylist()]
        table = table.filter(pa.array(keep, pa.bool_()))
    return {i for i in table.column(S.IMAGE_ID).to_pylist() if i is not None}


def predicted_keys(ws: Workspace, head_id: str, dataset: str) -> KeySet:
    """``predicted_ids`` of a dataset as compact keys, read a shard at a time."""
    done = KeySet()
    for path in prediction_shards(ws.predictions_dir(head_id)):
        t = _read([path], [S.IMAGE_ID, S.DATASET])
        keep = pc.and_kleene(
            pc.is_valid(t[S.IMAGE_ID]), pc.or_kleene(pc.is_null(t[S.DATASET]), pc.equal(t[S.DATASET], dataset))
        )
        done.add(t.filter(pc.fill_null(keep, False))[S.IMAGE_ID])
    return done


def read_predictions(ws: Workspace, head_id: str, files: bool = False) -> pa.Table:
    """A head's dataset predictions (or, ``files=True``, its image-file predictions), old tables included."""
    folder = ws.file_predictions_dir(head_id) if files else ws.predictions_dir(head_id)
    return _read(prediction_shards(folder))


def prediction_shards(folder: Path) -> list[Path]:
    """The shards of a predictions folder that count: committed (recorded and still matching,
    ``core/commits.py``); a folder written before records existed reads as before, with a warning."""
    return list_committed(folder, f"the predictions in {folder}").paths


def reconcile_predictions(folder: Path) -> dict[str, int]:
    """Set a predictions folder right before writing to it (its lock held), as extract does a
    featureset: a dead run's complete but unrecorded shard is adopted when its rows parse as
    predictions and repeat none already committed; any other is moved to ``.rejected/``; a folder
    of an older version has its shards recorded. Returns how many of each."""
    if not Path(folder).is_dir():
        return {}
    done = reconcile(
        folder,
        _inspect_predictions,
        lambda p, _: _prediction_keys(_read([p], _KEY_COLUMNS)),
        f"the predictions in {folder}",
    )
    return {k: len(getattr(done, k)) for k in ("recorded", "adopted", "set_aside")}


_KEY_COLUMNS = [S.IMAGE_ID, S.DATASET]


def _inspect_predictions(shard: Path) -> Adoptable | str:
    with pq.ParquetFile(shard) as pf:
        names = pf.schema_arrow.names
        if S.IMAGE_ID not in names or not set(names) <= set(S.PREDICTIONS_SCHEMA.names):
            return "its columns are not a predictions table's"
        rows = pf.metadata.num_rows
    return Adoptable(_prediction_keys(_read([shard], _KEY_COLUMNS)), rows)


def _prediction_keys(t: pa.Table) -> pa.Array:
    """One key per row: the image and the dataset it was predicted for (a row is that pair's prediction)."""
    ids = [f"{i}\x1f{d or ''}" for i, d in zip(t.column(S.IMAGE_ID).to_pylist(), t.column(S.DATASET).to_pylist())]
    return pa.array(ids, pa.string())


def _read(paths: list[Path], columns: list[str] | None = None) -> pa.Table:
    """Shards as PREDICTIONS_SCHEMA (or its ``columns``), a missing ``dataset`` column read as null."""
    schema = S.PREDICTIONS_SCHEMA if columns is None else pa.schema([S.PREDICTIONS_SCHEMA.field(c) for c in columns])
    tables = []
    for p in paths:
        with pq.ParquetFile(p) as pf:
            have = [c for c in schema.names if c in pf.schema_arrow.names]
            t = pf.read(columns=have)
        for c in schema.names:
            if c not in have:
                t = t.append_column(schema.field(c), pa.nulls(t.num_rows, schema.field(c).type))
        tables.append(t.select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


@dataclass(frozen=True)
class PredictSummary(JsonResult):
    """What predict did: rows written and skipped, and why any image got no prediction."""

    head_id: str
    featureset: str
    written: int
    shards: list[str]
    predictions_dir: str
    seconds: float
    load_seconds: float
    rows_per_s: float | None
    skipped: int = 0
    missing_features: int = 0
    dataset: str | None = None  # a dataset run ...
    images: int | None = None
    not_readable: int | None = None
    duplicates: int | None = None
    left_out_files: list[dict[str, Any]] | None = None
    files: int | None = None  # ... or an image-file run
    errors: int | None = None
    errors_by_code: dict[str, int] | None = None
    predictions: list[dict[str, Any]] | None = None

    def to_json(self) -> JsonObject:
        """Only the keys of this kind of run (a dataset run has no ``files``), as before."""
        return {
            k: getattr(self, k)
            for k in self.__dataclass_fields__
            if getattr(self, k) is not None or k in ("rows_per_s",)
        }


class DatasetOutcome(TypedDict):
    """The fields of ``PredictSummary`` a dataset run fills."""

    dataset: str
    images: int
    skipped: int
    missing_features: int
    not_readable: int
    duplicates: int
    left_out_files: list[dict[str, Any]]


class FilesOutcome(TypedDict):
    """The fields of ``PredictSummary`` an image-file run fills."""

    files: int
    errors: int
    errors_by_code: dict[str, int]
    skipped: int
    missing_features: int
    predictions: list[dict[str, Any]]


def run_predict(ws: Workspace, cfg: PredictConfig, run_id: str) -> PredictSummary:
    """Predict what is new for this head: dataset rows to ``predictions/<head_id>/``, files to ``file_predictions/``."""
    t0 = time.perf_counter()
    head_id = resolve_head(ws, cfg.head_id)
    head = load_head(ws, head_id, trust_pickle=cfg.trust_pickle, lazy=True)  # read only if there is work
    t_load = time.perf_counter()
    folder = ws.predictions_dir(head_id) if cfg.dataset is not None else ws.file_predictions_dir(head_id)
    with FileLock(
        ws.locks_dir / f"predictions-{head_id}.lock", f"predictions of head {head_id}", cfg.wait, hint=WAIT_HINT
    ):
        remove_stale_tmp(folder)
        reconcile_predictions(folder)
        writer = ShardWriter(folder, run_id, cfg.shard_rows)
        out: DatasetOutcome | FilesOutcome
        if cfg.dataset is not None:
            out = _predict_dataset(ws, cfg, cfg.dataset, head, writer, run_id)
        else:
            out = _predict_files(ws, cfg, head, writer, run_id)
        writer.flush()
    now = time.perf_counter()
    # rows/s of the predict loop (read, score, write); loading the head (Keras start-up) is apart.
    loop = now - t_load
    if not writer.written:
        log.info("nothing new to predict for head %s", head_id)
    return PredictSummary(
        head_id=head_id,
        featureset=head.featureset,
        written=writer.written,
        shards=[str(p) for p in writer.shards],
        predictions_dir=str(folder),
        seconds=round(now - t0, 3),
        load_seconds=round(t_load - t0, 3),
        rows_per_s=round(writer.written / loop, 1) if loop > 0 and writer.written else None,
        **out,
    )


def _predict_dataset(
    ws: Workspace, cfg: PredictConfig, dataset: str, head: LoadedHead, writer: ShardWriter, run_id: str
) -> DatasetOutcome:
    """Every readable image of the dataset this head has not predicted, a feature chunk at a time.

    Memory holds a compact key and a manifest position per image (``scan/rows.py``), not the
    manifest: each chunk's paths, labels and splits are read from the row groups that hold them."""
    images = ManifestImages(ws, dataset)
    try:
        done = predicted_keys(ws, head.head_id, dataset)
        was_done = done.contains(images.keys)
        del done
        # positions among images.keys; None: every one (no array of them, 8 bytes an image)
        todo = np.flatnonzero(~was_done) if was_done.any() else None
        n_todo = len(was_done) if todo is None else len(todo)
        where = KeyIndex(images.keys if todo is None else images.keys[todo])
        images.keys = np.zeros(0, "S1")  # `where` holds what is needed now
        release_freed_memory()  # the dedupe's and the sort's transient copies
        left = np.ones(n_todo, dtype=bool)  # not predicted yet: a duplicate feature row is skipped
        with progress(total=n_todo, desc=f"predict {dataset}") as bar:
            if n_todo:
                batch_rows = _chunk_rows(cfg, head)
                for ids, X in iter_features(ws, head.featureset, ids=where, batch_rows=batch_rows, as_keys=True):
                    at = where.positions(ids)
                    fresh = (at >= 0) & left[np.maximum(at, 0)]
                    if not fresh.all():
                        ids, X, at = ids[fresh], X[fresh], at[fresh]
                    if not len(at):
                        continue
                    meta = images.rows(at if todo is None else todo[at])
                    writer.add(
                        predictions_table(
                            keys_to_arrow(ids),
                            meta[S.PATH],
                            meta[S.LABEL],
                            meta[S.SPLIT],
                            score(head, X, cfg.top_k),
                            head,
                            run_id,
                            dataset,
                        )
                    )
                    left[at] = False
                    bar.update(len(at))
    finally:
        images.close()
    missing = int(left.sum())
    if missing:
        log.warning(
            "%d images of dataset %s have no features in %s: run 'imgfeat extract --dataset %s' first",
            missing,
            dataset,
            head.featureset,
            dataset,
        )
    return {
        "dataset": dataset,
        "images": int(len(was_done)),
        "skipped": int(was_done.sum()),
        "missing_features": missing,
        "not_readable": images.counts["not_readable"],
        "duplicates": images.counts["duplicates"],
        "left_out_files": images.files.head(LEFT_OUT_JSON_MAX).to_dict("records"),
    }


def _chunk_rows(cfg: PredictConfig, head: LoadedHead) -> int:
    """``chunk_rows``, fewer when a chunk of the head's features would pass a sixteenth of the budget."""
    dim = max(1, int(head.meta.get("dim") or 1))
    return int(max(1, min(cfg.chunk_rows, memory_budget(cfg.memory_budget) // (16 * 4 * dim))))


def expand_paths(items: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files as given, folders walked like ``imgfeat scan`` (sorted, hidden skipped), globs expanded.

    Returns the image files and the items that matched nothing.
    """
    found: list[Path] = []
    unmatched: list[str] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found += [Path(e.abs) for e in walk(str(path), WalkOptions(), WalkStats())]
        elif path.exists() or path.is_symlink() or not glob.has_magic(item):
            found.append(path)  # a missing plain path becomes an error row, not a crash
        else:
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            files = [Path(m) for m in matches if not Path(m).is_dir()]
            found += files
            if not files:
                unmatched.append(item)
    return [p.absolute() for p in found], unmatched


def _predict_files(
    ws: Workspace, cfg: PredictConfig, head: LoadedHead, writer: ShardWriter, run_id: str
) -> FilesOutcome:
    paths, unmatched = expand_paths(cfg.paths)
    results = extract_files(ws, head.featureset, paths, run_id, wait=cfg.wait) if paths else []
    ids, X = load_features(ws, head.featureset, [r.image_id for r in results if r.image_id and not r.error_code])
    scored = score(head, X, cfg.top_k) if len(ids) else None
    by_id = {i: k for k, i in enumerate(ids.tolist())}
    done = predicted_ids(ws, head.head_id)
    lines = [_file_line(r, by_id.get(r.image_id), scored) for r in results]
    lines += [
        {"path": item, "error_code": "no_match", "error_message": "no file matches this pattern"} for item in unmatched
    ]
    new: dict[str, tuple[int, str]] = {}  # image_id -> (row in scored, path): once per content
    for r in results:
        if r.image_id is not None and r.image_id in by_id and r.image_id not in done:
            new.setdefault(r.image_id, (by_id[r.image_id], Path(r.path).as_posix()))
    if new and scored is not None:  # (new ids were scored)
        rows = [k for k, _ in new.values()]
        sub = Scored(
            scored.pred_label[rows],
            scored.pred_score[rows],
            scored.topk_labels.take(rows),
            scored.topk_scores.take(rows),
        )
        none = [None] * len(rows)
        writer.add(
            predictions_table(list(new), [p for _, p in new.values()], none, none, sub, head, run_id, S.FILES_DATASET)
        )
    codes = Counter(code for x in lines if isinstance(code := x.get("error_code"), str))
    if not by_id:
        log.warning(
            "none of the %d file(s) given could be predicted (%s)",
            len(lines),
            ", ".join(f"{c} {n}" for c, n in codes.most_common()) or "no files",
        )
    return {
        "files": len(lines),
        "errors": sum(codes.values()),
        "errors_by_code": dict(codes),
        "skipped": sum(1 for x in lines if x.get("image_id") in done),
        "missing_features": 0,
        "predictions": lines,
    }


def _file_line(result: FileResult, k: int | None, scored: Scored | None) -> JsonObject:
    """What a person reads for one file: its best label and score, or why there is none."""
    if k is None or scored is None:
        return {
            "path": str(result.path),
            "error_code": result.error_code or "no_features",
            "error_message": result.error_message or "no feature row was written",
        }
    return {
        "path": str(result.path),
        "image_id": result.image_id,
        "pred_label": str(scored.pred_label[k]),
        "pred_score": float(scored.pred_score[k]),
        # [label, score] pairs, as JSON holds them (lists, as from_json gives them back, not tuples)
        "topk": [[label, p] for label, p in zip(scored.topk_labels[k].as_py(), scored.topk_scores[k].as_py())],
    }
