"""Every table's column names and explicit pyarrow schema, in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import pyarrow as pa

# --- column names (use these constants, never string literals elsewhere) ---
IMAGE_ID = "image_id"
PATH = "path"
LABEL = "label"
SPLIT = "split"
BYTES = "bytes"
MTIME_NS = "mtime_ns"
ETAG = "etag"  # an object's ETag in its store (null for a local file): with size and mtime, the change signal
WIDTH = "width"
HEIGHT = "height"
FORMAT = "format"
MODE = "mode"
STATUS = "status"
ERROR = "error"

FEATURE = "feature"

ROLE = "role"  # a head's rows table: which rows it trained on and which it was scored on

STAGE = "stage"
ERROR_CODE = "error_code"
ERROR_MESSAGE = "error_message"
RUN_ID = "run_id"

PRED_LABEL = "pred_label"
PRED_SCORE = "pred_score"
TOPK_LABELS = "topk_labels"
TOPK_SCORES = "topk_scores"
HEAD_ID = "head_id"
FEATURESET = "featureset"
DATASET = "dataset"  # predictions: the dataset a row belongs to, or FILES_DATASET for ad-hoc files
FILES_DATASET = "files"

REASON = "reason"
KEPT_PATH = "kept_path"
REASON_DUPLICATE = "duplicate"  # same bytes as kept_path, which is used instead
REASON_CONFLICT = "conflicting_labels"  # copies of one image under different labels

DATASET = "dataset"
GROUP_ID = "group_id"
NEAREST_ID = "nearest_id"
NEAREST_PATH = "nearest_path"
NEAREST_SPLIT = "nearest_split"
SIMILARITY = "similarity"
LABEL_CONFLICT = "label_conflict"

# --- manifest status codes ---
STATUS_OK = "ok"
STATUS_EMPTY = "empty"
STATUS_NOT_AN_IMAGE = "not_an_image"
STATUS_TRUNCATED = "truncated"
STATUS_TOO_LARGE = "too_large"
STATUS_UNREADABLE = "unreadable"
STATUS_NOT_SCANNED = "not_scanned"  # e.g. a symlink out of the root, kept only on request
STATUS_CODES = (
    STATUS_OK,
    STATUS_EMPTY,
    STATUS_NOT_AN_IMAGE,
    STATUS_TRUNCATED,
    STATUS_TOO_LARGE,
    STATUS_UNREADABLE,
    STATUS_NOT_SCANNED,
)

# --- per-image error codes of the decode stage (extract): the manifest's, plus modes it cannot read ---
ERROR_UNSUPPORTED_MODE = "unsupported_mode"
DECODE_ERROR_CODES = (
    STATUS_EMPTY,
    STATUS_NOT_AN_IMAGE,
    STATUS_TRUNCATED,
    STATUS_TOO_LARGE,
    ERROR_UNSUPPORTED_MODE,
    STATUS_UNREADABLE,
)

# --- the errors table's stage column: where an image failed ---
STAGE_SCAN = "scan"
STAGE_DECODE = "decode"
STAGE_MODEL = "model"  # the model ran but its output cannot be stored (final, like decode)

# --- per-image error codes of the model stage ---
ERROR_NON_FINITE = "non_finite_feature"  # a NaN or inf in the image's feature: refused at extract

# --- split names ---
SPLIT_TRAIN = "train"
SPLIT_TEST = "test"
SPLIT_VAL = "val"

# Key-value metadata keys stored in Parquet footers.
META_MANIFEST = b"imgfeat.manifest"  # JSON: dataset root + scan options
META_PROVENANCE = b"imgfeat.provenance"  # JSON: the featureset's provenance

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string()),  # null only when the file could not be read
        pa.field(PATH, pa.string(), nullable=False),  # POSIX, relative to the dataset root
        pa.field(LABEL, pa.string()),
        pa.field(SPLIT, pa.string()),
        pa.field(BYTES, pa.int64()),
        pa.field(MTIME_NS, pa.int64()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(FORMAT, pa.string()),
        pa.field(MODE, pa.string()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string()),
        pa.field(ETAG, pa.string()),  # object stores only; manifests written before it lack the column
    ]
)
# The manifest's columns before ETAG: such a manifest reads as MANIFEST_SCHEMA with null ETags.
MANIFEST_SCHEMA_V1 = pa.schema([f for f in MANIFEST_SCHEMA if f.name != ETAG])

ERRORS_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string()),
        pa.field(PATH, pa.string()),
        pa.field(STAGE, pa.string(), nullable=False),
        pa.field(ERROR_CODE, pa.string(), nullable=False),
        pa.field(ERROR_MESSAGE, pa.string()),
        pa.field(RUN_ID, pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class ErrorRow:
    """One row of the errors table (``ERRORS_SCHEMA``, field for column): an image that gave no feature, and why.

    ``image_id`` is None when the file could not be read at all; ``stage`` says whether the outcome is
    final for the content id (decode, model) or about a path at a moment (read, scan).
    """

    image_id: str | None
    path: str | None
    stage: str
    error_code: str
    error_message: str | None
    run_id: str

    def to_json(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ErrorRow:
        return cls(**{f.name: obj[f.name] for f in fields(cls)})


def errors_table(rows: Sequence[ErrorRow]) -> pa.Table:
    """Error rows -> the errors table: the one place they become Arrow."""
    return pa.Table.from_pylist([asdict(r) for r in rows], schema=ERRORS_SCHEMA)


PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(PATH, pa.string()),
        pa.field(LABEL, pa.string()),
        pa.field(SPLIT, pa.string()),
        pa.field(PRED_LABEL, pa.string(), nullable=False),
        pa.field(PRED_SCORE, pa.float32(), nullable=False),
        pa.field(TOPK_LABELS, pa.list_(pa.string())),
        pa.field(TOPK_SCORES, pa.list_(pa.float32())),
        pa.field(HEAD_ID, pa.string(), nullable=False),
        pa.field(FEATURESET, pa.string(), nullable=False),
        pa.field(RUN_ID, pa.string(), nullable=False),
        pa.field(DATASET, pa.string()),  # absent in tables written before it existed: read as null
    ]
)

# Files a dataset's duplicates or label conflicts left out of training / prediction.
LEFT_OUT_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(LABEL, pa.string()),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(KEPT_PATH, pa.string(), nullable=False),
    ]
)

# A head's rows table (heads/<head_id>/rows.parquet): the exact ids and labels it saw, by role.
ROLE_TRAIN = SPLIT_TRAIN
ROLE_TEST = SPLIT_TEST
HEAD_ROWS_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(LABEL, pa.string(), nullable=False),
        pa.field(ROLE, pa.string(), nullable=False),  # ROLE_TRAIN or ROLE_TEST
    ]
)

# An index's row order: row k of the FAISS index is image_id k (path: one manifest path of it).
INDEX_IDS_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(DATASET, pa.string()),
        pa.field(PATH, pa.string()),
    ]
)

# Near-duplicate groups: one row per manifest path in a group of two or more paths, with its label and split.
DEDUP_GROUPS_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(GROUP_ID, pa.string(), nullable=False),
        pa.field(NEAREST_ID, pa.string(), nullable=False),
        pa.field(SIMILARITY, pa.float32(), nullable=False),
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(LABEL, pa.string()),
        pa.field(SPLIT, pa.string()),
        pa.field(LABEL_CONFLICT, pa.bool_(), nullable=False),  # the group holds two or more labels
    ]
)

# Split leaks: a held-out image whose nearest training image is above the threshold.
DEDUP_LEAKS_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(NEAREST_ID, pa.string(), nullable=False),
        pa.field(NEAREST_PATH, pa.string(), nullable=False),
        pa.field(NEAREST_SPLIT, pa.string(), nullable=False),
        pa.field(SIMILARITY, pa.float32(), nullable=False),
    ]
)

STORAGE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def features_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """The features table: ``image_id`` plus a fixed-size vector of ``dim`` floats."""
    return pa.schema(
        [
            pa.field(IMAGE_ID, pa.string(), nullable=False),
            pa.field(FEATURE, pa.list_(STORAGE_DTYPES[dtype], dim), nullable=False),
        ]
    )
