"""The train stage: labelled features -> a cross-validated head artifact and its test metrics."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score, train_test_split
from threadpoolctl import threadpool_limits

from imgfeat.core.errors import ConfigError, ImgfeatError, unknown_value
from imgfeat.extract.featureset import featureset_info, load_features
from imgfeat.heads import artifacts as A
from imgfeat.core import names as N
from imgfeat.heads.data import LEFT_OUT_JSON_MAX, LabelledRows, canonical_json, describe, left_out_table, read_labelled
from imgfeat.heads.estimators import HEAD_KINDS, SVM_KERNELS, KerasMLPClassifier, sklearn_head
from imgfeat.heads.zeroshot import DEFAULT_PROMPT, ZERO_SHOT, check_prompt, zero_shot_head
from imgfeat.heads.plots import training_curves_png
from imgfeat.heads.versions import default_head_name, resolve_featureset
from imgfeat.core.storage import WAIT_HINT, FileLock
from imgfeat.core.workspace import Workspace, check_name

LEFT_OUT_FILE = "left_out.parquet"  # in the head's folder: duplicates and label conflicts, by path

log = logging.getLogger(__name__)

CLASS_WEIGHTS = ("balanced",)
RBF_WARN_ROWS = 20_000
PARALLEL_CV_VALUES = 4_000_000  # feature values in the CV data above which CV fits run in parallel
# Which TrainConfig fields change each kind of head (so an unrelated flag keeps the head id).
_COMMON = ("class_weight", "random_state", "test_fraction", "cv", "cv_max_rows")
_KIND_PARAMS = {
    "logreg": ("max_iter",),
    "svm": ("kernel", "max_iter"),
    "mlp": ("epochs", "hidden", "dropout", "batch_size", "learning_rate", "patience"),
}
_KIND_PARAMS["auto"] = tuple(dict.fromkeys(p for ps in _KIND_PARAMS.values() for p in ps))
_KIND_PARAMS[ZERO_SHOT] = ("prompt",)  # after "auto": an auto head's id must not change


@dataclass(frozen=True)
class TrainConfig:
    """What to train: a head kind on one dataset's labels and one featureset (a name or a full name)."""

    dataset: str
    featureset: str
    head: str = "logreg"
    name: str | None = None  # the head's stable name; default <dataset>-<head>
    kernel: str = "linear"  # svm only; "rbf" suits small sets
    cv: int = 5
    class_weight: str | None = None
    random_state: int = 0
    test_fraction: float = 0.2  # only when the manifest has no split
    cv_max_rows: int = 10_000  # choose C on a stratified subsample this big, then fit on all rows
    max_iter: int = 1000
    epochs: int = 50
    hidden: int = 256
    dropout: float = 0.5
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 5
    n_jobs: int | None = None  # parallel CV fits for logreg/svm; None: by data size and cores
    wait: float | None = None  # seconds to wait for another trainer of the same head (not a param)
    prompt: str = DEFAULT_PROMPT  # zero-shot only: each class's text, "{label}" standing for its name

    def __post_init__(self) -> None:
        check_name("dataset", self.dataset)
        N.check_ref(N.FEATURESETS, self.featureset)
        if self.name is not None:
            check_name("head", self.name)
        if self.head not in (*HEAD_KINDS, ZERO_SHOT):
            raise unknown_value("head", self.head, (*HEAD_KINDS, ZERO_SHOT))
        if self.head == ZERO_SHOT:
            check_prompt(self.prompt)
        if self.kernel not in SVM_KERNELS:
            raise unknown_value("kernel", self.kernel, SVM_KERNELS)
        if self.class_weight not in (None, *CLASS_WEIGHTS):
            raise unknown_value("class weight", str(self.class_weight), CLASS_WEIGHTS)
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be from 0 to below 1, got {self.test_fraction!r}")
        for name in ("cv", "cv_max_rows", "max_iter", "epochs", "hidden", "batch_size", "patience"):
            if int(getattr(self, name)) < (2 if name == "cv" else 1):
                raise ConfigError(f"{name} must be at least {2 if name == 'cv' else 1}, got {getattr(self, name)!r}")
        if self.n_jobs is not None and int(self.n_jobs) < 1:
            raise ConfigError(f"n_jobs must be at least 1, got {self.n_jobs!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be from 0 to below 1, got {self.dropout!r}")
        if not 0 <= int(self.random_state) < 2**32:  # numpy's seed range; sklearn fails late otherwise
            raise ConfigError(f"random_state must be from 0 to 2**32 - 1, got {self.random_state!r}")

    @property
    def head_name(self) -> str:
        return self.name or default_head_name(self.dataset, self.head)

    def params(self) -> dict[str, Any]:
        """The parameters that shape this kind of head (recorded and hashed into the head id)."""
        values = asdict(self)
        return {k: values[k] for k in (*_COMMON, *_KIND_PARAMS[self.head])}


def params_for(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The recorded parameters that shape one kind of head (an auto head records every kind's)."""
    return {k: v for k, v in params.items() if k in (*_COMMON, *_KIND_PARAMS.get(kind, ()))}


@dataclass
class FitResult:
    """A fitted head and how cross-validation chose it."""

    kind: str
    estimator: Any
    cv: dict[str, dict[str, Any]]
    chosen: dict[str, Any]


def make_head_id(cfg: TrainConfig, rows: LabelledRows) -> str:
    """``<dataset>-<head>-<hash8>`` of featureset, head kind, params and the training data."""
    key = canonical_json({"featureset": cfg.featureset, "head": cfg.head, "params": cfg.params(),
                          "rows": rows.digest()})
    return f"{cfg.dataset}-{cfg.head}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def run_train(ws: Workspace, cfg: TrainConfig, run_id: str) -> "TrainSummary":
    """Train (or reuse) the head and make it the latest of its name."""
    t0 = time.perf_counter()
    cfg = replace(cfg, featureset=resolve_featureset(ws, cfg.featureset))
    info = featureset_info(ws, cfg.featureset)
    rows = read_labelled(ws, cfg.dataset, cfg.featureset, cfg.test_fraction, cfg.random_state)
    head_id = make_head_id(cfg, rows)
    reused = A.head_exists(ws, head_id)
    if reused:
        log.info("head %s already trained on these features and labels; reusing it", head_id)
    else:
        with FileLock(ws.locks_dir / f"head-{head_id}.lock", f"head {head_id}", cfg.wait, hint=WAIT_HINT):
            if not A.head_exists(ws, head_id):  # another process may have finished it while we waited
                _train_and_write(ws, cfg, rows, head_id, info, run_id)
    N.record(ws, N.HEADS, cfg.head_name, head_id)
    return _summary(ws, A.read_head_meta(ws, head_id), cfg.head_name, rows, reused, time.perf_counter() - t0)


def _train_and_write(ws: Workspace, cfg: TrainConfig, rows: LabelledRows, head_id: str,
                     info: dict[str, Any], run_id: str) -> None:
    t0 = time.perf_counter()
    # One pass over the shards for both sets: decoding float16 Parquet is most of the load time.
    X_all = _features(ws, cfg.featureset, np.concatenate([rows.train_ids, rows.test_ids]))
    X_train, X_test = X_all[: len(rows.train_ids)], X_all[len(rows.train_ids) :]
    t_load = time.perf_counter()
    log.info("training %s head on %d x %d features (%d classes), evaluating on %d",
             cfg.head, *X_train.shape, len(rows.classes), len(X_test))
    # One BLAS thread: these products are thin (n x dim times dim x classes), and on 2 cores two
    # OpenBLAS threads made a 80,000 x 1,280 logreg fit 2-4x slower (8-23 s against 4-6 s).
    with threadpool_limits(limits=1, user_api="blas"):
        fitted = (fit_zero_shot(ws, cfg, rows.classes, X_train, rows.train_labels) if cfg.head == ZERO_SHOT
                  else fit_head(cfg, X_train, rows.train_labels))
    t_fit = time.perf_counter()
    metrics = evaluate(fitted.estimator, X_test, rows.test_labels, rows.classes)
    metrics["cv"] = fitted.cv
    extra = {}
    if isinstance(fitted.estimator, KerasMLPClassifier):
        extra[A.CURVES_FILE] = training_curves_png(fitted.estimator.history_)
    extra[LEFT_OUT_FILE] = _parquet_bytes(left_out_table(rows.left_out_files))
    timings = {"load_features": t_load - t0, "cv_and_fit": t_fit - t_load,
               "evaluate": time.perf_counter() - t_fit}
    meta = _head_meta(cfg, rows, head_id, info, fitted, metrics, run_id, int(X_train.shape[1]))
    meta["timings"] = {k: round(v, 3) for k, v in timings.items()}
    A.write_head(ws, head_id, fitted.estimator, meta, metrics, _rows_table(rows), extra)


def _head_meta(cfg: TrainConfig, rows: LabelledRows, head_id: str, info: dict[str, Any], fitted: FitResult,
               metrics: dict[str, Any], run_id: str, dim: int) -> dict[str, Any]:
    """head.json, less what write_head adds (model file, sha256, versions, created_at)."""
    return {
        "head_id": head_id, "name": cfg.head_name, "dataset": cfg.dataset, "featureset": cfg.featureset, "head": cfg.head,
        "model_kind": fitted.kind, "backbone": info.get("backbone"), "dim": dim,
        "classes": rows.classes, "params": cfg.params(), "chosen": fitted.chosen, "cv": fitted.cv,
        "metrics": metrics, "training_hash": rows.digest(), "run_id": run_id, **describe(rows),
        "mlp_params": _mlp_params(fitted.estimator),
        "history": getattr(fitted.estimator, "history_", None),
    }


def _features(ws: Workspace, featureset: str, ids: np.ndarray) -> np.ndarray:
    got, X = load_features(ws, featureset, ids.tolist())
    if len(got) != len(ids):  # ids came from committed_ids, so this means a shard vanished under us
        raise ImgfeatError(f"featureset {featureset!r} lost {len(ids) - len(got)} feature rows while training")
    return X


def _rows_table(rows: LabelledRows) -> pa.Table:
    ids = np.concatenate([rows.train_ids, rows.test_ids]).tolist()
    labels = np.concatenate([rows.train_labels, rows.test_labels]).tolist()
    roles = ["train"] * len(rows.train_ids) + ["test"] * len(rows.test_ids)
    return pa.table({"image_id": ids, "label": labels, A.ROLE: roles}, schema=A.ROWS_SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _mlp_params(est: Any) -> dict[str, Any] | None:
    return est.get_params() if isinstance(est, KerasMLPClassifier) else None


# --- fitting: pure functions of arrays ---


def fit_head(cfg: TrainConfig, X: np.ndarray, y: np.ndarray) -> FitResult:
    """Cross-validate the wanted kind(s) on the same folds; refit the best on all rows."""
    if cfg.head == "svm" and cfg.kernel == "rbf" and len(y) > RBF_WARN_ROWS:
        log.warning("an rbf SVM grows quadratically with rows; %d rows may take very long "
                    "(--kernel linear or --head logreg scale)", len(y))
    X_cv, y_cv = _cv_sample(X, y, cfg.cv_max_rows, cfg.random_state)
    folds = StratifiedKFold(_n_folds(cfg.cv, y_cv), shuffle=True, random_state=cfg.random_state)
    kinds = ("logreg", "svm", "mlp") if cfg.head == "auto" else (cfg.head,)
    cv, best = {}, {}
    for kind in kinds:
        cv[kind], best[kind] = _cross_validate(cfg, kind, X_cv, y_cv, folds)
        log.info("%s: cv accuracy %.4f +- %.4f", kind, cv[kind]["mean"], cv[kind]["std"])
    winner = max(kinds, key=lambda k: cv[k]["mean"])
    estimator = _make(cfg, winner, y_cv, folds.n_splits).set_params(**best[winner]).fit(X, y)
    chosen = {k.rsplit("__", 1)[-1]: v for k, v in best[winner].items()}
    return FitResult(winner, estimator, cv, chosen)


def fit_zero_shot(ws: Workspace, cfg: TrainConfig, classes: list[str], X: np.ndarray, y: np.ndarray) -> FitResult:
    """No fitting: the prompts' embeddings are the head. Its accuracy on the training rows stands in
    for the cross-validation score the other heads report (nothing was learned from them)."""
    est = zero_shot_head(ws, cfg.featureset, classes, cfg.prompt)
    acc = float(np.mean(est.predict(X) == np.asarray(y, dtype=object))) if len(y) else 0.0
    cv = {ZERO_SHOT: {"mean": acc, "std": 0.0, "folds": [], "rows": int(len(y)),
                      "note": "no fitting: accuracy on the training rows"}}
    return FitResult(ZERO_SHOT, est, cv, {"prompt": cfg.prompt})


def _cross_validate(cfg: TrainConfig, kind: str, X: np.ndarray, y: np.ndarray, folds: StratifiedKFold):
    est = _make(cfg, kind, y, folds.n_splits)
    if kind == "mlp":
        scores = cross_val_score(est, X, y, cv=folds, scoring="accuracy")
        return _scores(scores, {}, len(y)), {}
    _, grid = sklearn_head(kind, cfg.kernel, cfg.class_weight, cfg.random_state, cfg.max_iter, 2)
    search = GridSearchCV(est, grid, cv=folds, scoring="accuracy", refit=False,
                          n_jobs=_cv_jobs(cfg.n_jobs, X)).fit(X, y)
    res, i = search.cv_results_, search.best_index_
    scores = np.array([res[f"split{k}_test_score"][i] for k in range(folds.n_splits)])
    grid_means = {str(p): round(float(m), 4) for p, m in zip(res["params"], res["mean_test_score"])}
    (name, values), = grid.items()
    if len(values) > 1 and search.best_params_[name] in (min(values), max(values)):
        log.warning("%s: the best C (%g) is at the edge of the searched grid %s; a value beyond it "
                    "might score better", kind, search.best_params_[name], values)
    return _scores(scores, {"grid": grid_means}, len(y)), search.best_params_


def _cv_jobs(wanted: int | None, X: np.ndarray) -> int:
    """Parallel CV fits only where they pay for starting worker processes (about a second).

    joblib limits each worker's BLAS to one thread, which is also what makes these thin
    matrix products fast on a busy machine: two BLAS threads fighting for two cores can be
    4x slower than one.
    """
    if wanted is not None:
        return wanted
    return min(os.cpu_count() or 1, 4) if X.size >= PARALLEL_CV_VALUES else 1


def _scores(scores: np.ndarray, extra: dict[str, Any], n: int) -> dict[str, Any]:
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)),
            "folds": [round(float(s), 4) for s in scores], "rows": n, **extra}


def _make(cfg: TrainConfig, kind: str, y: np.ndarray, n_folds: int):
    if kind == "mlp":
        return KerasMLPClassifier(hidden=cfg.hidden, dropout=cfg.dropout, epochs=cfg.epochs,
                                  batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                                  patience=cfg.patience, class_weight=cfg.class_weight,
                                  random_state=cfg.random_state)
    est, _ = sklearn_head(kind, cfg.kernel, cfg.class_weight, cfg.random_state, cfg.max_iter,
                          _calibration_folds(kind, y, n_folds))
    return est


def _calibration_folds(kind: str, y: np.ndarray, n_folds: int) -> int:
    """SVM calibration splits each CV training fold again: every class needs 2 images per split."""
    if kind != "svm":
        return 2
    smallest = int(min(np.unique(y, return_counts=True)[1]))
    per_fold = smallest * (n_folds - 1) // n_folds
    if per_fold < 2:
        raise ConfigError(
            f"the svm head needs at least {math.ceil(2 * n_folds / (n_folds - 1))} training images per class "
            f"for calibrated probabilities under {n_folds}-fold CV; the smallest class has {smallest}: "
            "use --head logreg, or add images"
        )
    return min(3, per_fold)


def _n_folds(wanted: int, y: np.ndarray) -> int:
    smallest = int(min(np.unique(y, return_counts=True)[1]))
    if smallest < wanted:
        log.warning("smallest class has %d training images: using %d-fold CV instead of %d",
                    smallest, smallest, wanted)
    return max(2, min(wanted, smallest))


def _cv_sample(X: np.ndarray, y: np.ndarray, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hyper-parameters from a stratified subsample keep CV affordable on 100k+ rows."""
    if len(y) <= max_rows:
        return X, y
    _, counts = np.unique(y, return_counts=True)
    if max_rows < 2 * len(counts) or counts.min() * max_rows / len(y) < 2:
        return X, y  # a subsample would lose a small class; CV on everything instead
    idx, _ = train_test_split(np.arange(len(y)), train_size=max_rows, stratify=y, random_state=seed)
    idx.sort()
    log.info("choosing hyper-parameters on a stratified subsample of %d of %d rows", max_rows, len(y))
    return X[idx], y[idx]


def evaluate(estimator: Any, X: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Test metrics: accuracy, macro F1, per-class precision/recall/F1/support, confusion matrix."""
    if len(y) == 0:
        return {"test_accuracy": None, "macro_f1": None, "per_class": {}, "confusion": None,
                "n_test": 0, "note": "no evaluation rows (no test/val split and --test-fraction 0)"}
    pred = estimator.predict(X)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                 for i, c in enumerate(classes)}
    return {
        "test_accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion": {"labels": classes, "matrix": confusion_matrix(y, pred, labels=classes).tolist()},
        "n_test": int(len(y)),
    }


@dataclass(frozen=True)
class TrainSummary:
    """What train did: the head (id, name, kind), its metrics, the rows it saw and left out."""

    head_id: str
    name: str
    reused: bool
    head: str
    model_kind: str
    dataset: str
    featureset: str
    classes: list[str]
    metrics: dict[str, Any]
    chosen: dict[str, Any] | None
    n_train: int
    n_test: int
    eval_split: str | None
    left_out: dict[str, int] | None
    left_out_files: list[dict[str, Any]] = field(default_factory=list)
    head_dir: str = ""
    seconds: float = 0.0
    timings: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _summary(ws: Workspace, meta: dict[str, Any], name: str, rows: LabelledRows, reused: bool,
             seconds: float) -> TrainSummary:
    m = meta["metrics"]
    files = rows.left_out_files
    return TrainSummary(
        head_id=meta["head_id"], name=name, reused=reused, head=meta["head"], model_kind=meta["model_kind"],
        dataset=meta["dataset"], featureset=meta["featureset"], classes=meta["classes"],
        metrics={k: m.get(k) for k in ("test_accuracy", "macro_f1", "per_class", "cv")},
        chosen=meta.get("chosen"), n_train=meta["n_train"], n_test=meta["n_test"],
        eval_split=meta.get("eval_split"), left_out=meta.get("left_out"),
        left_out_files=[] if files is None else files.head(LEFT_OUT_JSON_MAX).to_dict("records"),
        head_dir=str(ws.head_dir(meta["head_id"])), seconds=round(seconds, 3),
        timings=None if reused else meta.get("timings"),
    )
