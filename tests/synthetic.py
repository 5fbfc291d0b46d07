"""Synthetic labelled featuresets (class-dependent Gaussian blobs) written exactly as extract writes them: test-only code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgfeat.core import schemas as S
from imgfeat.core.hashing import content_id
from imgfeat.core.storage import write_json_atomic
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import feature_shards
from imgfeat.extract.recipe import Provenance, Recipe, WeightsId, WeightsSource
from imgfeat.extract.shards import FeaturesetDirs, FeaturesetWriter
from imgfeat.scan.manifest import write_manifest

SYNTHETIC = "synthetic"  # the backbone name of a synthetic featureset


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
    return content_id(f"{dataset}/{k}".encode())


def write_blob_dataset(
    ws: Workspace,
    dataset: str,
    featureset: str,
    spec: BlobSpec = BlobSpec(),
    image_root: Path | None = None,
    labels: Sequence[str | None] | None = None,
) -> list[str]:
    """Write a manifest and a featureset of blobs; return the image ids (manifest row order).

    ``labels`` overrides the labels written to the manifest (None entries: unlabelled rows).
    """
    y, X, split = blob_features(spec)
    ids = [fake_image_id(dataset, k) for k in range(len(y))]
    labels = list(y) if labels is None else list(labels)
    rows = [
        {
            S.IMAGE_ID: i,
            S.PATH: f"{lab or 'unlabelled'}/{k:05d}.jpg",
            S.LABEL: lab,
            S.SPLIT: None if spec.test_fraction is None else str(split[k]),
            S.STATUS: S.STATUS_OK,
        }
        for k, (i, lab) in enumerate(zip(ids, labels))
    ]
    write_manifest(ws, dataset, rows, image_root or ws.root / "images" / dataset)
    write_featureset(ws, featureset, ids, X, spec.dtype, spec.shard_rows)
    return ids


def synthetic_provenance(featureset: str, dim: int, dtype: str = "float16") -> Provenance:
    """The typed provenance extract would write, for a featureset of made-up vectors."""
    recipe = Recipe(
        SYNTHETIC, WeightsId(None, 0, "none"), 0, "avg", None, "bilinear", False, "rotate", "float32", dtype
    )
    return Provenance(recipe, WeightsSource("none", None, 0), dim, None, None, None, featureset)


def write_featureset(
    ws: Workspace,
    featureset: str,
    ids: Sequence[str],
    X: np.ndarray,
    dtype: str = "float16",
    shard_rows: int = 1024,
    run_id: str = "synthetic",
) -> None:
    """Provenance first, then ``part-<run>-<seq>.parquet`` shards, through extract's own FeaturesetWriter."""
    prov = synthetic_provenance(featureset, int(X.shape[1]), dtype)
    write_json_atomic(prov.to_json(), ws.featureset_provenance(featureset))
    writer = FeaturesetWriter(
        FeaturesetDirs.of(ws, featureset), run_id, prov, shard_rows, start_seq=len(feature_shards(ws, featureset))
    )
    writer.add_features(list(ids), X)
    writer.flush()


def nearest_other(rows: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first listed neighbour (row, similarity) in dedup's neighbour lists: best first,
    -1 where none, wherever the search left the slot of the row itself."""
    first = np.argmax(rows >= 0, axis=1)
    at = np.arange(len(rows))
    return rows[at, first], sims[at, first]
