"""Head artifacts on disk: ``heads/<head_id>/`` written model-first, head.json last, loaded only after a sha256 check."""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
from importlib import metadata
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat import __version__
from imgfeat.core import schemas as S
from imgfeat.core.errors import ImgfeatError, unknown_value
from imgfeat.heads.estimators import KerasMLPClassifier
from imgfeat.core.storage import remove_stale_tmp, write_bytes_atomic, write_json_atomic, write_table_atomic
from imgfeat.core.workspace import Workspace

HEAD_FILE = "head.json"
METRICS_FILE = "metrics.json"
ROWS_FILE = "rows.parquet"  # the exact train/test ids and labels the head saw
CURVES_FILE = "training_curves.png"
MODEL_FILES = {"joblib": "model.joblib", "keras": "model.keras"}

ROLE, ROWS_SCHEMA = S.ROLE, S.HEAD_ROWS_SCHEMA  # the schema lives in core/schemas.py; old names kept


@dataclass(frozen=True)
class LoadedHead:
    """A verified, loaded head: its head.json and the fitted estimator."""

    meta: dict[str, Any]
    estimator: Any

    @property
    def head_id(self) -> str:
        return self.meta["head_id"]

    @property
    def featureset(self) -> str:
        return self.meta["featureset"]


def head_exists(ws: Workspace, head_id: str) -> bool:
    """A head counts as done only once its head.json is committed."""
    return (ws.head_dir(head_id) / HEAD_FILE).is_file()


def read_head_meta(ws: Workspace, head_id: str) -> dict[str, Any]:
    if not head_exists(ws, head_id):
        done = [h for h in ws.list_names("heads") if head_exists(ws, h)]
        hint = "" if done else f"none under {ws.root / 'heads'}; run 'imgfeat train' first"
        raise unknown_value("head", head_id, done, hint=hint)
    return json.loads((ws.head_dir(head_id) / HEAD_FILE).read_text())


def model_bytes(estimator: Any) -> tuple[str, bytes]:
    """Serialise a fitted head: ``.keras`` for the dense net, joblib for scikit-learn."""
    if isinstance(estimator, KerasMLPClassifier):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_FILES["keras"]
            estimator.save(path)  # Keras insists on the .keras suffix, so not straight to a .tmp
            return "keras", path.read_bytes()
    buf = io.BytesIO()
    joblib.dump(estimator, buf)
    return "joblib", buf.getvalue()


def write_head(ws: Workspace, head_id: str, estimator: Any, meta: dict[str, Any], metrics: dict[str, Any],
               rows: pa.Table, extra_files: dict[str, bytes]) -> Path:
    """Commit protocol: model, rows, plots, metrics.json, then head.json (which marks it done)."""
    folder = ws.head_dir(head_id)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(folder)
    fmt, blob = model_bytes(estimator)
    write_bytes_atomic(blob, folder / MODEL_FILES[fmt])
    write_table_atomic(rows.cast(ROWS_SCHEMA), folder / ROWS_FILE)
    for name, data in extra_files.items():
        write_bytes_atomic(data, folder / name)
    write_json_atomic(metrics, folder / METRICS_FILE)
    full = {**meta, "model_file": MODEL_FILES[fmt], "model_format": fmt,
            "model_sha256": hashlib.sha256(blob).hexdigest(), "versions": library_versions(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(full, folder / HEAD_FILE)
    return folder


def load_head(ws: Workspace, head_id: str) -> LoadedHead:
    """Read head.json, check the model file's sha256 against it, then (only then) deserialise."""
    meta = read_head_meta(ws, head_id)
    path = ws.head_dir(head_id) / meta["model_file"]
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ImgfeatError(f"cannot read head model {path}: {exc.strerror}; retrain the head") from exc
    got = hashlib.sha256(blob).hexdigest()
    if got != meta["model_sha256"]:
        raise ImgfeatError(
            f"refusing to load {path}: its sha256 is {got[:16]}..., but head.json recorded "
            f"{meta['model_sha256'][:16]}...; the file was modified or corrupted. Delete "
            f"{ws.head_dir(head_id)} and run 'imgfeat train' again"
        )
    return LoadedHead(meta, _deserialise(meta, blob))


def _deserialise(meta: dict[str, Any], blob: bytes) -> Any:
    # Deserialise the bytes that were verified, never re-read the file (it could change between).
    if meta["model_format"] == "joblib":
        return joblib.load(io.BytesIO(blob))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILES["keras"]
        path.write_bytes(blob)
        return KerasMLPClassifier.load(path, meta["classes"], meta.get("mlp_params"))


def read_rows(ws: Workspace, head_id: str) -> pa.Table:
    return pq.read_table(ws.head_dir(head_id) / ROWS_FILE)


def library_versions() -> dict[str, str]:
    # importlib.metadata, not imports: a logistic-regression head should not pay for loading Keras.
    out = {"imgfeat": __version__, "python": platform.python_version()}
    for dist in ("numpy", "scikit-learn", "joblib", "keras", "tensorflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["keras_backend"] = os.environ.get("KERAS_BACKEND", "tensorflow")
    return out
