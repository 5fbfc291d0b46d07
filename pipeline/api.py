"""The Python API: the stages as functions with typed results, ``Featureset`` readers, a scikit-learn transformer."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np
import pyarrow as pa
from sklearn.base import BaseEstimator, TransformerMixin

from imgfeat.core import schemas as S
from imgfeat.core.errors import ImgfeatError, unknown_value
from imgfeat.core.logs import ensure_notebook_logging, quiet_framework_start, quiet_native_logs
from imgfeat.core.results import JsonObject
from imgfeat.core.runs import new_run_id
from imgfeat.core.workspace import Workspace
from imgfeat.extract.extract import ExtractConfig, check_recipe_name, extract_files, record_recipe_name, run_extract
from imgfeat.extract.featureset import featureset_info, load_features, read_feature_table
from imgfeat.heads.predict import PredictConfig, PredictSummary, run_predict
from imgfeat.heads.report import ReportConfig, ReportSummary, run_report
from imgfeat.heads.train import TrainConfig, TrainSummary, run_train
from imgfeat.heads.versions import resolve_featureset
from imgfeat.scan.scan import ScanConfig, run_scan
from imgfeat.tools.catalog import Catalog, list_workspace

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# As the command does: TensorFlow's C++ lines (absl, oneDNN, cudart, cpu_feature_guard, "failed
# call to cuInit") are not for people calling a function. The variables TensorFlow reads when it is
# imported (a value the user set wins), and each call that may import it goes through _quiet,
# unless the user set TF_CPP_MIN_LOG_LEVEL: then TensorFlow's lines are theirs to see.
_USER_TF_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
quiet_native_logs()


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _quiet(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """An API call during which a first Keras/TensorFlow import logs its native lines at debug."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if _USER_TF_LEVEL is not None:
            return fn(*args, **kwargs)
        with quiet_framework_start():
            return fn(*args, **kwargs)

    return wrapper


WorkspaceLike = Workspace | str | os.PathLike[str] | None


def _ws(workspace: WorkspaceLike) -> Workspace:
    ensure_notebook_logging()
    ws = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
    if ws.mirror is not None:  # a workspace in a bucket: what it holds now (writes are pushed as committed)
        ws.mirror.pull()
    return ws


@dataclass(frozen=True)
class ScanResult:
    """A scanned dataset: its name, manifest path and the scan's summary."""

    dataset: str
    manifest: str
    summary: JsonObject  # the scan's --json object

    def to_json(self) -> JsonObject:
        return self.summary


@dataclass(frozen=True)
class ExtractResult:
    """A featureset after extract: its full name and the run's summary; ``open()`` reads it."""

    featureset: str
    summary: JsonObject  # the extract run's --json object
    workspace: Workspace

    def to_json(self) -> JsonObject:
        return self.summary

    def open(self) -> Featureset:
        return Featureset(self.featureset, self.workspace)


def scan(root: str | os.PathLike[str], dataset: str, *, workspace: WorkspaceLike = None, **options: Any) -> ScanResult:
    """``imgfeat scan``: a folder into the dataset's manifest; ``options`` are ScanConfig fields."""
    ws = _ws(workspace)
    out = run_scan(ws, ScanConfig(root=root, dataset=dataset, **options), new_run_id())
    return ScanResult(dataset, str(ws.manifest_path(dataset)), out.to_json())


@_quiet
def extract(
    dataset: str,
    backbone: str = "efficientnet_lite0",
    *,
    name: str | None = None,
    workspace: WorkspaceLike = None,
    **options: Any,
) -> ExtractResult:
    """``imgfeat extract``: features of a dataset's new images; ``name`` records a recipe name for it."""
    if name:
        check_recipe_name(name)  # before any work, as the command line does
    ws = _ws(workspace)
    out = run_extract(ws, ExtractConfig(dataset=dataset, backbone=backbone, **options), new_run_id())
    if name:
        record_recipe_name(ws, name, out.featureset)
    return ExtractResult(out.featureset, out.to_json(), ws)


@_quiet
def train(
    dataset: str,
    featureset: str,
    head: str = "logreg",
    *,
    name: str | None = None,
    workspace: WorkspaceLike = None,
    **options: Any,
) -> TrainSummary:
    """``imgfeat train``: a head on a featureset (full or recipe name); returns a ``TrainSummary``."""
    cfg = TrainConfig(dataset=dataset, featureset=featureset, head=head, name=name, **options)
    return run_train(_ws(workspace), cfg, new_run_id())


@_quiet
def predict(
    head: str,
    dataset: str | None = None,
    paths: tuple[str, ...] | list[str] = (),
    *,
    workspace: WorkspaceLike = None,
    **options: Any,
) -> PredictSummary:
    """``imgfeat predict``: a head (name, NAME@ID or id) on a dataset or on files/folders/globs."""
    cfg = PredictConfig(head_id=head, dataset=dataset, paths=tuple(str(p) for p in paths), **options)
    return run_predict(_ws(workspace), cfg, new_run_id())


@_quiet
def report(head: str, *, workspace: WorkspaceLike = None, **options: Any) -> ReportSummary:
    """``imgfeat report``: the head's self-contained HTML page; returns its path and counts (a ``ReportSummary``)."""
    return run_report(_ws(workspace), ReportConfig(head_id=head, **options), new_run_id())


def ls(*, workspace: WorkspaceLike = None) -> Catalog:
    """``imgfeat ls``: datasets, featuresets, heads (a ``Catalog``)."""
    return list_workspace(_ws(workspace))


class Featureset:
    """One featureset, by full name or recipe name (its latest): ids and feature matrices."""

    def __init__(self, name: str, workspace: WorkspaceLike = None) -> None:
        self.workspace = _ws(workspace)
        self.name = resolve_featureset(self.workspace, name)

    def __repr__(self) -> str:
        return f"Featureset({self.name!r}, workspace={str(self.workspace.root)!r})"

    @property
    def info(self) -> JsonObject:
        """Its provenance: backbone, weights, input size, pooling, dim, dtype, ..."""
        return featureset_info(self.workspace, self.name)

    def to_numpy(self, ids: list[str] | None = None, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """``(image_ids, X)``: every feature row (or the ``ids`` that have one), X as ``dtype``."""
        return load_features(self.workspace, self.name, ids, dtype)

    def to_arrow(self) -> pa.Table:
        """``image_id``, ``feature`` (fixed-size list) as stored, every committed shard (rows holding
        NaN or inf left out, with a warning)."""
        table = read_feature_table(self.workspace, self.name)
        if table is None:
            info = self.info
            dim, dtype = info.get("dim", 0), info.get("dtype", "float16")
            if not (isinstance(dim, int) and isinstance(dtype, str)):  # extract always writes both
                raise ImgfeatError(f"featureset {self.name}: its provenance holds no dim and dtype")
            return S.features_schema(dim, dtype).empty_table()
        return table

    def to_pandas(self) -> pd.DataFrame:
        """A DataFrame indexed by ``image_id`` with one float column per feature dimension."""
        import pandas as pd

        ids, X = self.to_numpy()
        return pd.DataFrame(X, index=pd.Index(ids, name=S.IMAGE_ID), columns=[f"f{k}" for k in range(X.shape[1])])


ON_ERROR = ("raise", "drop", "nan")


# scikit-learn has no type stubs here: its bases are Any to mypy
class FeatureTransformer(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """A scikit-learn transformer: image paths -> features, through a featureset's cache.

    Each image is keyed by its content: one already in the featureset costs a hash, a new one is
    extracted with the featureset's own recipe and stored for next time. An image that cannot be
    read is, by ``on_error``: ``"raise"`` (default) an ImgfeatError naming the files, so no NaN
    ever reaches an estimator; ``"drop"`` left out (its row is gone: for Ray batches and
    standalone use, not inside a Pipeline with labels); ``"nan"`` a row of NaN and a warning.
    Called on a Ray Data batch (``map_batches``) it adds a ``feature`` column next to the batch's
    ``path`` column (with ``"drop"``, the batch loses the bad rows in every column).
    """

    def __init__(
        self, featureset: str, workspace: str | None = None, path_column: str = "path", on_error: str = "raise"
    ) -> None:
        self.featureset = featureset
        self.workspace = workspace
        self.path_column = path_column
        self.on_error = on_error

    def fit(self, X: Any = None, y: Any = None) -> FeatureTransformer:
        """Nothing to learn: resolve the featureset once (a recipe name's latest) and return self."""
        self._check_on_error()
        self.featureset_ = Featureset(self.featureset, self.workspace).name
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Paths (a list, array, Series, or a DataFrame with ``path_column``) -> float32 matrix."""
        out, good = self._features(self._paths(X))
        return out if self.on_error != "drop" else out[good]

    @_quiet
    def _features(self, given: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(a row per path, NaN where there is no feature; which rows have one), after on_error's check."""
        self._check_on_error()
        ws = _ws(self.workspace)
        fs = getattr(self, "featureset_", None) or Featureset(self.featureset, ws).name
        paths = [str(Path(p).expanduser().absolute()) for p in given]
        results = extract_files(ws, fs, paths, new_run_id())
        ids, feats = load_features(ws, fs, [r.image_id for r in results if r.image_id and not r.error_code])
        row = {i: k for k, i in enumerate(ids.tolist())}
        out = np.full((len(paths), feats.shape[1]), np.nan, dtype=np.float32)
        for k, r in enumerate(results):
            if r.image_id in row:
                out[k] = feats[row[r.image_id]]
        bad = [r for r in results if r.image_id not in row]
        if bad:
            listing = ", ".join(f"{r.path} ({r.error_code or 'no feature'})" for r in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            if self.on_error == "raise":
                raise ImgfeatError(
                    f"{len(bad)} of {len(paths)} images have no features: {listing}{more} "
                    "(FeatureTransformer(on_error='drop' or 'nan') to go on without them)"
                )
            log.warning(
                "%d of %d images have no features (%s): %s%s",
                len(bad),
                len(paths),
                "left out" if self.on_error == "drop" else "NaN rows",
                listing,
                more,
            )
        return out, np.array([r.image_id in row for r in results], dtype=bool)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data ``map_batches``: a batch with a path column gains a ``feature`` column."""
        feats, good = self._features(self._paths(batch[self.path_column]))
        out = dict(batch)
        out[S.FEATURE] = feats
        if self.on_error == "drop":
            out = {k: np.asarray(v)[good] for k, v in out.items()}
        return out

    def _check_on_error(self) -> None:
        if self.on_error not in ON_ERROR:
            raise unknown_value("on_error", str(self.on_error), ON_ERROR)

    def _paths(self, X: Any) -> list[str]:
        if hasattr(X, "columns"):  # a DataFrame
            X = X[self.path_column]
        return [str(p) for p in (X.tolist() if hasattr(X, "tolist") else list(X))]

    def __sklearn_tags__(self) -> Any:  # sklearn.utils.Tags
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        tags.input_tags.two_d_array = False
        tags.requires_fit = False
        return tags
