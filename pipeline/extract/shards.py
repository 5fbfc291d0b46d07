"""Feature and error shards of a featureset: table building (pure) and committed writes."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from imgfeat.core import schemas as S
from imgfeat.core.storage import atomic_path, shard_name, write_table_atomic

log = logging.getLogger(__name__)


def features_table(ids: Sequence[str], X: np.ndarray, dtype: str, provenance: dict[str, Any]) -> pa.Table:
    """(n,) ids and an (n, dim) matrix -> the features table, provenance in its footer."""
    dim = int(X.shape[1])
    values = pa.array(np.ascontiguousarray(X, dtype=np.dtype(dtype)).reshape(-1))
    feature = pa.FixedSizeListArray.from_arrays(values, dim)
    schema = S.features_schema(dim, dtype).with_metadata({S.META_PROVENANCE: json.dumps(provenance, sort_keys=True)})
    return pa.Table.from_arrays([pa.array(list(ids), pa.string()), feature], schema=schema)


def errors_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=S.ERRORS_SCHEMA)


def error_row(image_id: str | None, path: str | None, stage: str, code: str, message: str | None,
              run_id: str) -> dict[str, Any]:
    return {S.IMAGE_ID: image_id, S.PATH: path, S.STAGE: stage, S.ERROR_CODE: code,
            S.ERROR_MESSAGE: message, S.RUN_ID: run_id}


@dataclass
class ShardWriter:
    """Buffers rows and commits ``part-<run>-<seq>`` shards of ``shard_size`` rows.

    A feature shard is committed NPY sidecar first, then Parquet, so a committed Parquet
    always has its sidecar; readers list only ``part-*.parquet``, never a ``.tmp``.
    """

    folder: Path
    run_id: str
    provenance: dict[str, Any]
    shard_size: int
    npy: bool = False
    _ids: list[str] = field(default_factory=list)
    _rows: list[np.ndarray] = field(default_factory=list)
    _errors: list[dict[str, Any]] = field(default_factory=list)
    _seq: int = 0
    _err_seq: int = 0
    written: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> str:
        return self.provenance["dtype"]

    def add_features(self, ids: Sequence[str], X: np.ndarray) -> None:
        self._ids.extend(ids)
        self._rows.extend(np.asarray(X, dtype=np.float32))
        while len(self._ids) >= self.shard_size:
            self._commit_features(self.shard_size)

    def add_errors(self, rows: Sequence[dict[str, Any]]) -> None:
        self._errors.extend(rows)
        if len(self._errors) >= self.shard_size:
            self._commit_errors()

    def flush(self) -> None:
        """Commit whatever is buffered (end of run)."""
        if self._ids:
            self._commit_features(len(self._ids))
        self._commit_errors()

    def _commit_features(self, n: int) -> None:
        ids, X = self._ids[:n], np.stack(self._rows[:n])
        del self._ids[:n], self._rows[:n]
        name = shard_name(self.run_id, self._seq)
        self._seq += 1
        sidecar = self.folder / name.replace(".parquet", ".npy")
        if self.npy:
            with atomic_path(sidecar) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, X.astype(np.dtype(self.dtype)))
        try:
            write_table_atomic(features_table(ids, X, self.dtype, self.provenance), self.folder / name)
        except BaseException:
            sidecar.unlink(missing_ok=True)  # a sidecar without its Parquet would be an orphan
            raise
        self.written.append(name)
        log.debug("committed %s (%d rows)", name, n)
        # Error rows seen so far go out with each feature shard, so a crash loses little of either.
        self._commit_errors()

    def _commit_errors(self) -> None:
        if not self._errors:
            return
        name = shard_name(self.run_id, self._err_seq)
        self._err_seq += 1
        write_table_atomic(errors_table(self._errors), self.folder / "errors" / name)
        self._errors = []
        self.written.append("errors/" + name)
