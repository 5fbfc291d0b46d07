"""Feature and error shards of a featureset: table building (pure), committed writes, the writer thread."""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from imgfeat.core import schemas as S
from imgfeat.core.commits import ShardWriter
from imgfeat.core.schemas import ErrorRow, errors_table
from imgfeat.core.storage import SHARD_PREFIX, atomic_path
from imgfeat.core.workspace import Workspace
from imgfeat.extract.recipe import Provenance

log = logging.getLogger(__name__)

WRITE_QUEUE_BATCHES = 4  # bounded: a slow disk slows the model down instead of filling memory


def features_table(ids: Sequence[str], X: np.ndarray, dtype: str, footer: str) -> pa.Table:
    """(n,) ids and an (n, dim) matrix -> the features table, the provenance JSON in its footer."""
    dim = int(X.shape[1])
    values = pa.array(np.ascontiguousarray(X, dtype=np.dtype(dtype)).reshape(-1))
    feature = pa.FixedSizeListArray.from_arrays(values, dim)
    schema = S.features_schema(dim, dtype).with_metadata({S.META_PROVENANCE: footer})
    return pa.Table.from_arrays([pa.array(list(ids), pa.string()), feature], schema=schema)


def refuse_non_finite(
    ids: Sequence[str], X: np.ndarray, run_id: str, paths: Sequence[str | None] | None = None
) -> tuple[list[str], np.ndarray, list[ErrorRow]]:
    """Split a batch's features into finite rows and error rows (``non_finite_feature``): a NaN or
    inf feature is the model's failure on that image, never a row readers would have to guess about."""
    X = np.asarray(X)
    ok = np.isfinite(X.sum(axis=1, dtype=np.float64)) if X.ndim == 2 and len(X) else np.ones(len(ids), dtype=bool)
    if ok.all():
        return list(ids), X, []
    bad = np.flatnonzero(~ok).tolist()  # (Python ints, to index the sequences)
    errors = [
        ErrorRow(
            ids[k],
            paths[k] if paths else None,
            S.STAGE_MODEL,
            S.ERROR_NON_FINITE,
            "the model's feature holds NaN or inf for this image (damaged weights, or an overflow at this precision)",
            run_id,
        )
        for k in bad
    ]
    return [ids[k] for k in np.flatnonzero(ok).tolist()], X[ok], errors


ERRORS_TAG = "errors"  # how FeaturesetWriter.written names an error shard
CALL_MARK = "c"  # part-<run>-c<call>-...: the extract call's number within the run, per featureset


@dataclass(frozen=True)
class FeaturesetDirs:
    """Where a featureset's tables live: features (only), error rows, NPY sidecars."""

    features: Path
    errors: Path
    npy: Path

    @classmethod
    def of(cls, ws: Workspace, featureset: str) -> FeaturesetDirs:
        return cls(
            ws.featureset_dir(featureset), ws.featureset_errors_dir(featureset), ws.featureset_npy_dir(featureset)
        )

    def all(self) -> tuple[Path, Path, Path]:
        return (self.features, self.errors, self.npy)


def next_shard_tag(dirs: FeaturesetDirs, run_id: str) -> str:
    """``<run>-c<k>`` with ``k`` one past every call of ``run_id`` already on disk in the featureset.

    One run may extract into a featureset more than once (``imgfeat run`` over two datasets, or
    ``imgfeat predict FILE`` twice); numbering shards from 0 again would replace the earlier
    call's committed shards. Call it while holding the featureset's lock.
    """
    pattern = re.compile(re.escape(f"{SHARD_PREFIX}{run_id}-{CALL_MARK}") + r"(\d+)-")
    calls = [
        int(m.group(1))
        for d in dirs.all()
        if d.is_dir()
        for p in d.rglob(SHARD_PREFIX + "*")
        if (m := pattern.match(p.name))
    ]
    return f"{run_id}-{CALL_MARK}{max(calls, default=-1) + 1:03d}"


class FeaturesetWriter:
    """A featureset's three tables written together: feature rows buffered into shards of
    ``shard_size`` rows (the provenance in each footer, an NPY sidecar with ``npy``), and error rows,
    each table through the one ``ShardWriter`` (``core/commits.py``: unique names, never a committed
    shard replaced, a commit record per shard).

    ``tag`` names this extract call's shards (``next_shard_tag``); ``start_seq`` numbers the first
    shard and ``idempotent`` lets a unit of work that names its shards by position find them
    committed already (Ray's retried batches).
    """

    def __init__(
        self,
        dirs: FeaturesetDirs,
        tag: str,
        provenance: Provenance,
        shard_size: int,
        npy: bool = False,
        start_seq: int = 0,
        idempotent: bool = False,
    ) -> None:
        self.dirs, self.folder, self.tag, self.provenance = dirs, dirs.features, tag, provenance
        self.shard_size, self.npy = shard_size, npy
        self._footer = provenance.footer()
        self._ids: list[str] = []
        self._rows: list[np.ndarray] = []
        self._errors: list[ErrorRow] = []
        self.features = ShardWriter(dirs.features, tag, start_seq=start_seq, idempotent=idempotent)
        self.errors = ShardWriter(dirs.errors, tag, start_seq=start_seq, idempotent=idempotent)

    @property
    def run_id(self) -> str:
        """The run id in this writer's tag (``<run>-c<k>[-ray]``), for the error rows it makes itself."""
        return re.sub(rf"-{CALL_MARK}\d+(-.*)?$", "", self.tag)

    @property
    def dtype(self) -> str:
        return self.provenance.recipe.dtype

    @property
    def written(self) -> list[str]:
        """Names of the shards committed so far, error shards as ``errors/<name>``."""
        return self.feature_shards + [f"{ERRORS_TAG}/{p.name}" for p in self.errors.shards]

    @property
    def feature_shards(self) -> list[str]:
        return [p.name for p in self.features.shards]

    def add_features(self, ids: Sequence[str], X: np.ndarray) -> None:
        """Buffer feature rows; a non-finite row becomes an error row here too (executors split them
        first, for their counts), so no shard is ever committed with one."""
        ids, X, refused = refuse_non_finite(ids, X, self.run_id)
        if refused:
            self.add_errors(refused)
        self._ids.extend(ids)
        self._rows.extend(np.asarray(X, dtype=np.float32))
        while len(self._ids) >= self.shard_size:
            self._commit_features(self.shard_size)

    def add_errors(self, rows: Sequence[ErrorRow]) -> None:
        self._errors.extend(rows)
        if len(self._errors) >= self.shard_size:
            self._commit_errors()

    def flush(self) -> None:
        """Commit whatever is buffered (end of a shard's work, end of run)."""
        if self._ids:
            self._commit_features(len(self._ids))
        self._commit_errors()

    def _commit_features(self, n: int) -> None:
        ids, X = self._ids[:n], np.stack(self._rows[:n])
        del self._ids[:n], self._rows[:n]
        # Shard, then sidecar, then the commit record: a crash in between leaves a shard without
        # sidecar or record (set right by the next writer), never a sidecar without its shard.
        self.features.commit(
            features_table(ids, X, self.dtype, self._footer),
            after=(lambda shard: self._commit_sidecar(shard.name, X)) if self.npy else None,
        )
        # Error rows seen so far go out with each feature shard, so a crash loses little of either.
        self._commit_errors()

    def _commit_sidecar(self, name: str, X: np.ndarray) -> None:
        with atomic_path(self.dirs.npy / sidecar_name(name)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, X.astype(np.dtype(self.dtype)))

    def _commit_errors(self) -> None:
        if self._errors:
            rows, self._errors = self._errors, []
            self.errors.commit(errors_table(rows))


def sidecar_name(shard: str) -> str:
    return shard[: -len(".parquet")] + ".npy"


class ShardSink:
    """Runs a FeaturesetWriter off the model's thread; errors surface in the caller on put/close."""

    def __init__(self, writer: FeaturesetWriter) -> None:
        self.writer = writer
        self._q: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="imgfeat-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            if self._exc is not None:
                continue  # drain after a failure so the producer never blocks for ever
            try:
                ids, X, errors = job
                if errors:
                    self.writer.add_errors(errors)
                if ids:
                    self.writer.add_features(ids, X)
            except BaseException as exc:  # re-raised on the model thread
                self._exc = exc

    def put(self, ids: list[str], X: np.ndarray | None, errors: list[ErrorRow]) -> None:
        self._raise()
        self._q.put((ids, X, errors))

    def add_error(self, row: ErrorRow) -> None:
        self.put([], None, [row])

    def close(self, commit: bool = True) -> None:
        """Stop the thread; with ``commit`` flush the last partial shard (not after a failure)."""
        self._q.put(None)
        self._thread.join()
        self._raise()
        if commit:
            self.writer.flush()

    def abort(self) -> None:
        try:
            self.close(commit=False)
        except BaseException:  # the original error is the one to report
            pass

    def _raise(self) -> None:
        if self._exc is not None:
            raise self._exc
