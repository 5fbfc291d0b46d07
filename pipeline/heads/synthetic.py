"""Synthetic labelled featuresets (class-dependent Gaussian blobs) written exactly as extract writes them: for tests and benchmarks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from imgfeat.core import schemas as S
from imgfeat.extract.featureset import PROVENANCE_FILE
from imgfeat.scan.manifest import write_manifest
from imgfeat.core.storage import shard_name, write_json_atomic, write_table_atomic
from imgfeat.core.workspace import Workspace


@dataclass(frozen=True)
class BlobSpec:
    """``per_class`` images per class around random centres ``separation`` apart (noise std 1)."""

    classes: tuple[str, ...] = ("cat", "dog", "fox")
    per_class: int = 40
    dim: int = 64
    separation: float = 2.5  # distance between class centres, in noise standard deviations
    test_fraction: float | None = 0.25  # None: no split column (train holds out its own)
    dtype: str = "float16"
    shard_rows: int = 1024
    seed: int = 0


def blob_features(spec: BlobSpec) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(labels, X, split) with classes that overlap a little, so accuracy is high but not 100%."""
    rng = np.random.default_rng(spec.seed)
    centres = rng.normal(size=(len(spec.classes), spec.dim))
    centres *= spec.separation / np.sqrt(2 * spec.dim)  # expected pairwise distance = separation
    y = np.repeat(np.arange(len(spec.classes)), spec.per_class)
    # float32 noise: a 100,000 x 1,280 benchmark set stays at half a gigabyte
    X = centres.astype(np.float32)[y] + rng.standard_normal((len(y), spec.dim), dtype=np.float32)
    n_test = 0 if spec.test_fraction is None else int(round(spec.per_class * spec.test_fraction))
    split = np.where(np.tile(np.arange(spec.per_class), len(spec.classes)) < n_test, "test", "train")
    return [spec.classes[k] for k in y], X.astype(spec.dtype), split


def fake_image_id(dataset: str, k: int) -> str:
    return hashlib.blake2b(f"{dataset}/{k}".encode(), digest_size=16).hexdigest()


def write_blob_dataset(ws: Workspace, dataset: str, featureset: str, spec: BlobSpec = BlobSpec(),
                       image_root: Path | None = None, labels: Sequence[str | None] | None = None) -> list[str]:
    """Write a manifest and a featureset of blobs; return the image ids (manifest row order).

    ``labels`` overrides the labels written to the manifest (None entries: unlabelled rows).
    """
    y, X, split = blob_features(spec)
    ids = [fake_image_id(dataset, k) for k in range(len(y))]
    labels = list(y) if labels is None else list(labels)
    rows = [{S.IMAGE_ID: i, S.PATH: f"{lab or 'unlabelled'}/{k:05d}.jpg", S.LABEL: lab,
             S.SPLIT: None if spec.test_fraction is None else str(split[k]), S.STATUS: S.STATUS_OK}
            for k, (i, lab) in enumerate(zip(ids, labels))]
    write_manifest(ws, dataset, rows, image_root or ws.root / "images" / dataset)
    write_featureset(ws, featureset, ids, X, spec.dtype, spec.shard_rows)
    return ids


def write_featureset(ws: Workspace, featureset: str, ids: Sequence[str], X: np.ndarray,
                     dtype: str = "float16", shard_rows: int = 1024, run_id: str = "synthetic") -> None:
    """Provenance first, then ``part-<run>-<seq>.parquet`` shards of features_schema(dim)."""
    folder = ws.featureset_dir(featureset)
    dim = int(X.shape[1])
    info = {"name": featureset, "backbone": "synthetic", "dim": dim, "dtype": dtype, "pooling": "avg",
            "weights": "none", "input_size": None}
    write_json_atomic(info, folder / PROVENANCE_FILE)
    schema = S.features_schema(dim, dtype).with_metadata({S.META_PROVENANCE: json.dumps(info)})
    existing = len(list(folder.glob("part-*.parquet")))
    for seq, start in enumerate(range(0, len(ids), shard_rows), start=existing):
        chunk = X[start : start + shard_rows].astype(dtype)
        values = pa.array(chunk.ravel(), S.STORAGE_DTYPES[dtype])
        table = pa.table({S.IMAGE_ID: pa.array(ids[start : start + shard_rows], pa.string()),
                          S.FEATURE: pa.FixedSizeListArray.from_arrays(values, dim)}, schema=schema)
        write_table_atomic(table, folder / shard_name(run_id, seq))
