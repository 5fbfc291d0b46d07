"""Head artifacts on disk: ``heads/<head_id>/`` written model-first, head.json last, loaded without pickles."""

from __future__ import annotations

import datetime as _dt
import functools
import io
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import joblib
import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat import __version__
from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ImgfeatError, unknown_value
from imgfeat.core.hashing import sha256_bytes
from imgfeat.core.results import JsonObject, json_str
from imgfeat.core.storage import (
    remove_stale_tmp,
    write_bytes_atomic,
    write_json_atomic,
    write_parts_atomic,
    write_table_atomic,
)
from imgfeat.core.workspace import Workspace
from imgfeat.heads.zeroshot import ZeroShotClassifier

log = logging.getLogger(__name__)

HEAD_FILE = "head.json"
METRICS_FILE = "metrics.json"
ROWS_FILE = "rows.parquet"  # the exact train/test ids and labels the head saw
CURVES_FILE = "training_curves.png"
# skops for scikit-learn heads, .keras (safe_mode) for the dense net; joblib only in old heads.
MODEL_FILES = {
    "skops": "model.skops",
    "keras": "model.keras",
    "joblib": "model.joblib",
    "npz": "model.npz",
}  # npz: a zero-shot head's prompt embeddings (heads/zeroshot.py)
# The types a skops head may hold beyond skops' own default-trusted ones (numpy, scikit-learn's
# public estimators): the calibrated SVM's private pieces. Anything else in a file is refused.
SKOPS_TRUSTED = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
)

# head.json keys every reader relies on (strings), and the types of those that older heads lack.
HEAD_KEYS = ("head_id", "featureset", "model_file", "model_format", "model_sha256")
HEAD_OPTIONAL = {
    "name": str,
    "dataset": str,
    "head": str,
    "model_kind": str,
    "created_at": str,
    "classes": list,
    "metrics": dict,
}

ROLE, ROWS_SCHEMA = S.ROLE, S.HEAD_ROWS_SCHEMA  # the schema lives in core/schemas.py; old names kept


@dataclass(frozen=True)
class LoadedHead:
    """A head: its head.json, and the fitted estimator, verified and deserialised on first use.

    ``load_head(..., lazy=True)`` defers the model file: a predict with nothing new never reads
    it (nor imports scikit-learn to unpack it).
    """

    meta: dict[str, Any]
    load: Callable[[], Any] = field(repr=False, compare=False)

    @functools.cached_property
    def estimator(self) -> Any:
        return self.load()

    @property
    def head_id(self) -> str:
        return self.meta["head_id"]

    @property
    def featureset(self) -> str:
        return self.meta["featureset"]


def head_exists(ws: Workspace, head_id: str) -> bool:
    """A head counts as done only once its head.json is committed (something else in its place is
    a damaged head, which ``read_head_meta`` names)."""
    path = ws.head_dir(head_id) / HEAD_FILE
    return path.exists() or path.is_symlink()


def read_head_meta(ws: Workspace, head_id: str) -> JsonObject:
    if not head_exists(ws, head_id):
        done = [h for h in ws.list_names("heads") if head_exists(ws, h)]
        hint = "" if done else f"none under {ws.root / 'heads'}; run 'imgfeat train' first"
        raise unknown_value("head", head_id, done, hint=hint)
    meta, damage = load_head_meta(ws, head_id)
    if damage is not None:
        raise damage
    return meta


def load_head_meta(ws: Workspace, head_id: str) -> tuple[dict[str, Any], ImgfeatError | None]:
    """A committed head's head.json, or ({}, the error naming the file) when it is damaged."""
    path = ws.head_dir(head_id) / HEAD_FILE
    if not path.is_file():  # a folder (or a FIFO, which would block the read) where the file belongs
        return {}, _corrupt_head(ws, head_id, path, "not a regular file")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {}, _corrupt_head(ws, head_id, path, exc)
    why = head_meta_problem(meta, head_id)
    return (meta, None) if why is None else ({}, _corrupt_head(ws, head_id, path, why))


def head_meta_problem(meta: object, head_id: str) -> str | None:
    """Pure: what is wrong with a parsed head.json (None when every reader can rely on it)."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    missing = [k for k in HEAD_KEYS if k not in meta]
    if missing:
        return f"missing {', '.join(missing)}"
    wrong = [k for k in HEAD_KEYS if not isinstance(meta[k], str)]
    wrong += [k for k, kind in HEAD_OPTIONAL.items() if meta.get(k) is not None and not isinstance(meta[k], kind)]
    if wrong:
        return "wrong types: " + ", ".join(f"{k} {meta[k]!r:.40}" for k in wrong)
    if meta["head_id"] != head_id:
        return f"it describes head {meta['head_id']!r:.80}, not {head_id!r}"
    return None


def _corrupt_head(ws: Workspace, head_id: str, path: Path, why: object) -> ImgfeatError:
    return ImgfeatError(
        f"cannot read {path}: {why}; the head is damaged: delete {ws.head_dir(head_id)} and run 'imgfeat train' again"
    )


def model_bytes(estimator: Any) -> tuple[str, bytes]:
    """Serialise a fitted head without pickles: ``.keras`` for the dense net, skops for scikit-learn."""
    import skops.io

    from imgfeat.heads.estimators import KerasMLPClassifier  # scikit-learn: only where a model is handled

    if isinstance(estimator, ZeroShotClassifier):
        return "npz", estimator.to_bytes()
    if isinstance(estimator, KerasMLPClassifier):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_FILES["keras"]
            estimator.save(path)  # Keras insists on the .keras suffix, so not straight to a .tmp
            return "keras", path.read_bytes()
    return "skops", skops.io.dumps(estimator)


def write_head(
    ws: Workspace,
    head_id: str,
    estimator: Any,
    meta: dict[str, Any],
    metrics: dict[str, Any],
    rows: pa.Table | Iterable[pa.Table],
    extra_files: dict[str, bytes],
) -> Path:
    """Commit protocol: model, rows, plots, metrics.json, then head.json (which marks it done).

    ``rows``: the rows file's table, or its parts in order (written one at a time)."""
    folder = ws.head_dir(head_id)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(folder)
    fmt, blob = model_bytes(estimator)
    write_bytes_atomic(blob, folder / MODEL_FILES[fmt])
    if isinstance(rows, pa.Table):
        write_table_atomic(rows.cast(ROWS_SCHEMA), folder / ROWS_FILE)
    else:
        write_parts_atomic(rows, ROWS_SCHEMA, folder / ROWS_FILE)
    for name, data in extra_files.items():
        write_bytes_atomic(data, folder / name)
    write_json_atomic(metrics, folder / METRICS_FILE)
    full = {
        **meta,
        "model_file": MODEL_FILES[fmt],
        "model_format": fmt,
        "model_sha256": sha256_bytes(blob),
        "versions": library_versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(full, folder / HEAD_FILE)
    return folder


def load_head(ws: Workspace, head_id: str, trust_pickle: bool = False, lazy: bool = False) -> LoadedHead:
    """Read head.json, check the model file's sha256 against it, then (only then) deserialise.

    Old heads saved as joblib pickles load only with ``trust_pickle`` (a pickle can run code).
    ``lazy``: the model file is read, checked and deserialised when the estimator is first used.
    """
    meta = read_head_meta(ws, head_id)
    if meta["model_format"] == "joblib" and not trust_pickle:
        folder = ws.head_dir(head_id)
        raise ConfigError(
            f"head {head_id} was saved by an older imgfeat as a pickle ({folder / json_str(meta, 'model_file')}), "
            "and loading a pickle can run any code. Retrain it to save it without pickles (delete "
            f"{folder} and run 'imgfeat train' again), or pass --trust-pickle (trust_pickle=True in "
            "Python) if you trust the file"
        )
    head = LoadedHead(meta, functools.partial(_load_model, ws, meta))
    if not lazy:
        head.estimator  # noqa: B018  (verify and deserialise now)
    return head


def _load_model(ws: Workspace, meta: dict[str, Any]) -> Any:
    head_id = meta["head_id"]
    path = ws.head_dir(head_id) / meta["model_file"]
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ImgfeatError(f"cannot read head model {path}: {exc.strerror}; retrain the head") from exc
    got = sha256_bytes(blob)
    if got != meta["model_sha256"]:
        raise ImgfeatError(
            f"refusing to load {path}: its sha256 is {got[:16]}..., but head.json recorded "
            f"{meta['model_sha256'][:16]}...; the file was modified or corrupted. Delete "
            f"{ws.head_dir(head_id)} and run 'imgfeat train' again"
        )
    return _deserialise(meta, blob)


def _deserialise(meta: dict[str, Any], blob: bytes) -> Any:
    # Deserialise the bytes that were verified, never re-read the file (it could change between).
    fmt = meta["model_format"]
    if fmt == "skops":
        return _load_skops(meta, blob)
    if fmt == "joblib":  # load_head let it through only with trust_pickle
        log.warning(
            "loading head %s from a joblib pickle (--trust-pickle): loading a pickle can run code", meta["head_id"]
        )
        return joblib.load(io.BytesIO(blob))
    if fmt == "npz":
        return _load_npz(meta, blob)
    if fmt != "keras":
        raise ImgfeatError(f"head {meta['head_id']}: unknown model format {fmt!r} in head.json")
    return _load_keras(meta, blob)


def _load_keras(meta: dict[str, Any], blob: bytes) -> Any:
    from imgfeat.heads.estimators import KerasMLPClassifier  # scikit-learn: only where a model is handled

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILES["keras"]
        path.write_bytes(blob)
        try:
            return KerasMLPClassifier.load(path, meta["classes"], meta.get("mlp_params"))
        except Exception as exc:  # safe_mode refusing a Lambda layer, a damaged archive, ...
            raise ImgfeatError(
                f"refusing to load head {meta['head_id']}: its model.keras cannot be loaded in safe mode "
                f"({type(exc).__name__}: {str(exc)[:200]}); delete the head and run 'imgfeat train' again"
            ) from exc


def _load_npz(meta: dict[str, Any], blob: bytes) -> Any:
    try:
        return ZeroShotClassifier.from_bytes(blob, meta["classes"])  # allow_pickle=False: plain arrays only
    except Exception as exc:
        raise ImgfeatError(
            f"head {meta['head_id']}: cannot read its model.npz: {type(exc).__name__}: {exc}; "
            "delete the head and run 'imgfeat train' again"
        ) from exc


def _load_skops(meta: dict[str, Any], blob: bytes) -> Any:
    import skops.io

    try:
        untrusted = set(skops.io.get_untrusted_types(data=blob)) - set(SKOPS_TRUSTED)
        if untrusted:
            raise ImgfeatError(
                f"refusing to load head {meta['head_id']}: its model file holds types a head never "
                f"has ({', '.join(sorted(untrusted))}); delete the head and run 'imgfeat train' again"
            )
        return skops.io.loads(blob, trusted=list(SKOPS_TRUSTED))
    except ImgfeatError:
        raise
    except Exception as exc:  # a corrupt archive raises zipfile, JSON and skops errors alike
        raise ImgfeatError(
            f"head {meta['head_id']}: cannot read its model file: {type(exc).__name__}: {exc}; "
            "delete the head and run 'imgfeat train' again"
        ) from exc


def read_rows(ws: Workspace, head_id: str) -> pa.Table:
    path = ws.head_dir(head_id) / ROWS_FILE
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise _corrupt_head(ws, head_id, path, str(exc).rstrip(".")) from None


def rows_count(ws: Workspace, head_id: str) -> int:
    """How many training rows the head has (its rows file's footer says)."""
    path = ws.head_dir(head_id) / ROWS_FILE
    try:
        with pq.ParquetFile(path) as f:
            return int(f.metadata.num_rows)
    except (OSError, pa.ArrowException) as exc:
        raise _corrupt_head(ws, head_id, path, str(exc).rstrip(".")) from None


def row_groups(ws: Workspace, head_id: str, columns: list[str]) -> Iterator[tuple[int, pa.Table]]:
    """The training rows a row group at a time, with each group's first row number: at 10M rows
    the whole table is ~550 MB of Arrow."""
    path = ws.head_dir(head_id) / ROWS_FILE
    try:
        with pq.ParquetFile(path) as f:
            start = 0
            for g in range(f.num_row_groups):
                t = f.read_row_group(g, columns=columns)
                yield start, t
                start += t.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise _corrupt_head(ws, head_id, path, str(exc).rstrip(".")) from None


def library_versions() -> dict[str, str | None]:
    # importlib.metadata, not imports: a logistic-regression head should not pay for loading Keras.
    out: dict[str, str | None] = {"imgfeat": __version__, "python": platform.python_version()}
    for dist in ("numpy", "scikit-learn", "joblib", "keras", "tensorflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["keras_backend"] = os.environ.get("KERAS_BACKEND", "tensorflow")
    return out
