"""Reading featuresets: provenance, shards that carry it, committed ids, feature matrices; the layout migration."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.errors import ImgfeatError, unknown_value
from imgfeat.core.logs import warn_once
from imgfeat.core.storage import column_values, list_shards, read_shards, remove_file, remove_tree
from imgfeat.core.workspace import Workspace
from imgfeat.extract.recipe import Provenance
from imgfeat.extract.shards import FeaturesetDirs, sidecar_name

log = logging.getLogger(__name__)

OLD_ERRORS_DIR = "errors"  # the first layouts kept side files inside the featureset folder
OLD_LOCK = ".lock"
OLD_PROVENANCE_FILE = "_featureset.json"  # Polars and Hugging Face datasets stop at it


def provenance_path(ws: Workspace, featureset: str) -> Path:
    """``features/_provenance/<fs>.json``; a folder of an older layout (not yet migrated by a
    writer) keeps its ``_featureset.json``, which is read where it is."""
    path = ws.featureset_provenance(featureset)
    old = ws.featureset_dir(featureset) / OLD_PROVENANCE_FILE
    return old if not path.is_file() and old.is_file() else path


def featureset_info(ws: Workspace, featureset: str) -> dict[str, Any]:
    """The provenance written when the featureset was created; exit 2 if it does not exist."""
    path = provenance_path(ws, featureset)
    if not path.is_file():
        raise unknown_value(
            "featureset",
            featureset,
            ws.list_names("features"),
            hint=f"none under {ws.root / 'features'}; run 'imgfeat extract' first"
            if not ws.list_names("features")
            else "",
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        info, why = None, exc
    else:
        why = "not a JSON object"
    if not isinstance(info, dict):
        raise ImgfeatError(f"cannot read {path}: {why}; the featureset's provenance is damaged: delete it and "
                           f"{ws.featureset_dir(featureset)}, and run 'imgfeat extract' again")
    return info


def read_provenance(ws: Workspace, featureset: str) -> Provenance:
    """The typed provenance of a featureset; exit 2 if it does not exist."""
    return Provenance.from_json(featureset_info(ws, featureset))


def feature_shards(ws: Workspace, featureset: str) -> list[Path]:
    """Committed shards that carry this featureset's provenance; any other is left out, with a warning."""
    shards = list_shards(ws.featureset_dir(featureset))
    if not shards:
        return []
    info = featureset_info(ws, featureset)
    want = (info.get("featureset"), info.get("fingerprint"))
    ok = [p for p in shards if _shard_identity(p) == want]
    if len(ok) < len(shards):
        foreign = sorted(set(shards) - set(ok))
        warn_once(log, "ignoring %d shard(s) in %s that do not carry its provenance (first: %s)",
                  len(foreign), ws.featureset_dir(featureset), foreign[0].name)
    return ok


def _shard_identity(path: Path) -> tuple[str | None, str | None]:
    try:
        meta = pq.read_metadata(path).metadata or {}
        prov = json.loads(meta.get(S.META_PROVENANCE, b"{}"))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ImgfeatError(f"cannot read the footer of {path} ({exc}): the shard is damaged; delete it (or move "
                           "it away) and rerun imgfeat extract, which writes its rows again") from None
    return (prov.get("featureset"), prov.get("fingerprint")) if isinstance(prov, dict) else (None, None)


def sidecar_of(ws: Workspace, featureset: str, shard: Path) -> Path:
    """The ``--npy`` sidecar of a feature shard (same rows, same order)."""
    return ws.featureset_npy_dir(featureset) / sidecar_name(Path(shard).name)


def error_shards(ws: Workspace, featureset: str) -> list[Path]:
    """Error shards; a folder of the first layout (not yet migrated by a writer) is read where it is."""
    old = ws.featureset_dir(featureset) / OLD_ERRORS_DIR
    return list_shards(ws.featureset_errors_dir(featureset)) + list_shards(old)


def committed_ids(ws: Workspace, featureset: str) -> set[str]:
    """image_ids that already have a feature row (reads only the ``image_id`` column)."""
    return set(column_values(feature_shards(ws, featureset), S.IMAGE_ID))


def errored_ids(ws: Workspace, featureset: str) -> set[str]:
    """image_ids that ended as an error row in this featureset and have no feature row (a read
    failure that a later run retried successfully is history, not an error)."""
    return set(column_values(error_shards(ws, featureset), S.IMAGE_ID)) - committed_ids(ws, featureset)


def migrate_layout(ws: Workspace, featureset: str) -> None:
    """Bring a featureset of an older layout up to date (call with its lock held): provenance from
    ``<fs>/_featureset.json``, error shards from ``<fs>/errors/`` and sidecars from ``<fs>/`` to their
    places beside the folder, the old lock file out; and drop sidecars whose shard is gone (a
    sidecar never survives without its shard)."""
    dirs = FeaturesetDirs.of(ws, featureset)
    if not dirs.features.is_dir():
        return
    moved = _move_provenance(ws, featureset)
    old = dirs.features / OLD_ERRORS_DIR
    moved += _move_all(list(old.iterdir()) if old.is_dir() else [], dirs.errors)
    moved += _move_all(list(dirs.features.glob("part-*.npy")), dirs.npy)
    if old.is_dir():
        remove_tree(old, ws.root)
    remove_file(dirs.features / OLD_LOCK, ws.root)
    if moved:
        log.info("moved %d side file(s) of featureset %s out of its folder", moved, featureset)
    if dirs.npy.is_dir():
        shards = {sidecar_name(p.name) for p in list_shards(dirs.features)}
        for p in dirs.npy.glob("part-*.npy"):
            if p.name not in shards:
                log.warning("removing %s: its shard was never committed", p)
                remove_file(p, ws.root)


def _move_provenance(ws: Workspace, featureset: str) -> int:
    old = ws.featureset_dir(featureset) / OLD_PROVENANCE_FILE
    if not old.is_file():
        return 0
    new = ws.featureset_provenance(featureset)
    if new.is_file():  # both there (an old copy put back): the one under _provenance/ is in force
        remove_file(old, ws.root)
        return 0
    new.parent.mkdir(parents=True, exist_ok=True)
    old.replace(new)
    return 1


def _move_all(paths: list[Path], folder: Path) -> int:
    for p in paths:
        folder.mkdir(parents=True, exist_ok=True)
        p.replace(folder / p.name)
    return len(paths)


def read_errors(ws: Workspace, featureset: str) -> pa.Table:
    table = read_shards(error_shards(ws, featureset), schema=S.ERRORS_SCHEMA)
    return S.ERRORS_SCHEMA.empty_table() if table is None else table


def feature_matrix(column: pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    """fixed_size_list<float>[dim] -> a dense (n, dim) array without a Python loop."""
    arr = column.combine_chunks()
    dim = arr.type.list_size
    if len(arr) == 0:
        return np.zeros((0, dim), dtype=dtype)
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(dtype, copy=False)


def load_features(
    ws: Workspace,
    featureset: str,
    ids: Sequence[str] | None = None,
    dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image_ids, X)`` for the wanted ids (all when ``ids`` is None).

    Each id appears once (a duplicate row from concurrent runs is dropped); rows come back in
    the order of ``ids`` when given, ids without a feature row are simply absent.
    """
    shards = feature_shards(ws, featureset)
    if not shards:
        info = featureset_info(ws, featureset)
        return np.array([], dtype=object), np.zeros((0, int(info.get("dim", 0))), dtype=dtype)
    wanted = pa.array(list(dict.fromkeys(ids)), pa.string()) if ids is not None else None
    got_ids, mats = [], []
    for p in shards:
        t = pq.ParquetFile(p).read()
        if wanted is not None:
            t = t.filter(pc.is_in(t.column(S.IMAGE_ID), value_set=wanted))
        if t.num_rows:
            got_ids.append(np.asarray(t.column(S.IMAGE_ID).to_pylist(), dtype=object))
            mats.append(feature_matrix(t.column(S.FEATURE), np.dtype(dtype)))
    if not mats:
        info = featureset_info(ws, featureset)
        return np.array([], dtype=object), np.zeros((0, int(info.get("dim", 0))), dtype=dtype)
    all_ids = np.concatenate(got_ids)
    X = np.concatenate(mats)
    _, first = np.unique(all_ids.astype(str), return_index=True)
    first.sort()
    all_ids, X = all_ids[first], X[first]
    if ids is not None:
        pos = {k: i for i, k in enumerate(all_ids)}
        order = [pos[k] for k in dict.fromkeys(ids) if k in pos]
        all_ids, X = all_ids[order], X[order]
    return all_ids, X
