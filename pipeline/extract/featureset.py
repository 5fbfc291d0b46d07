"""Reading featuresets: provenance, committed ids, and feature matrices for the heads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.errors import ImgfeatError, unknown_value
from imgfeat.core.storage import column_values, list_shards, read_shards
from imgfeat.core.workspace import Workspace

PROVENANCE_FILE = "_featureset.json"


def featureset_info(ws: Workspace, featureset: str) -> dict[str, Any]:
    """The provenance written when the featureset was created; exit 2 if it does not exist."""
    path = ws.featureset_dir(featureset) / PROVENANCE_FILE
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
        raise ImgfeatError(f"cannot read {path}: {why}; the featureset's provenance is damaged: delete "
                           f"{path.parent} and run 'imgfeat extract' again")
    return info


def feature_shards(ws: Workspace, featureset: str) -> list[Path]:
    return list_shards(ws.featureset_dir(featureset))


def error_shards(ws: Workspace, featureset: str) -> list[Path]:
    return list_shards(ws.featureset_errors_dir(featureset))


def committed_ids(ws: Workspace, featureset: str) -> set[str]:
    """image_ids that already have a feature row (reads only the ``image_id`` column)."""
    return set(column_values(feature_shards(ws, featureset), S.IMAGE_ID))


def errored_ids(ws: Workspace, featureset: str) -> set[str]:
    """image_ids that already ended as an error row in this featureset."""
    return set(column_values(error_shards(ws, featureset), S.IMAGE_ID))


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
