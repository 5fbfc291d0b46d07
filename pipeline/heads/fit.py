"""Fitting a head: C chosen by cross-validated log-loss, refit on every row, test metrics, the artifact.

scikit-learn, Keras and matplotlib load here, so only a run that trains a head pays for them:
``run_train`` imports this module when no head with the same id exists.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score, train_test_split
from threadpoolctl import threadpool_limits

from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.keys import KeyIndex, concat_keys
from imgfeat.core.results import JsonObject
from imgfeat.core.sizes import human, memory_budget
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import featureset_dim, iter_features
from imgfeat.heads import artifacts as A
from imgfeat.heads.data import LabelledRows, describe, left_out_table
from imgfeat.heads.estimators import KerasMLPClassifier, sklearn_head
from imgfeat.heads.plots import training_curves_png
from imgfeat.heads.train import LEFT_OUT_FILE, TrainConfig
from imgfeat.heads.zeroshot import ZERO_SHOT, zero_shot_head

log = logging.getLogger(__name__)

RBF_WARN_ROWS = 20_000
IN_MEMORY_COPIES = 4  # peak memory of an in-memory fit, in copies of the labelled float32 matrix
IN_MEMORY, STREAMED = "in_memory", "streamed"  # head.json trained_by.path: how the head was fitted
PARALLEL_CV_VALUES = 4_000_000  # feature values in the CV data above which CV fits run in parallel
# When the best C sits at an edge of the default grid, the grid grows by one value past that
# edge (a factor GRID_STEP), at most MAX_GRID_EXTENSIONS times: C is a scale, so the search
# walks in decades, and the bound keeps a set whose log-loss falls forever (separable classes
# and a logreg) from searching forever.
GRID_STEP = 10.0
MAX_GRID_EXTENSIONS = 3
CV_SCORING = {"accuracy": "accuracy", "log_loss": "neg_log_loss"}
LOG_LOSS_TIE, LOG_LOSS_TIE_ABS = 0.01, 1e-4  # log-losses this close (relative, absolute) are a tie


@dataclass
class FitResult:
    """A fitted head and how cross-validation chose it."""

    kind: str
    estimator: Any
    cv: dict[str, dict[str, Any]]
    chosen: dict[str, Any]


def train_and_write(
    ws: Workspace, cfg: TrainConfig, rows: LabelledRows, head_id: str, info: dict[str, Any], run_id: str
) -> None:
    """Load the rows' features, fit and evaluate the head, commit it as ``heads/<head_id>/``."""
    dim, budget = int(info.get("dim") or 0), memory_budget(cfg.memory_budget)
    matrix = (rows.n_train + rows.n_test) * dim * np.dtype(np.float32).itemsize
    # In memory, the matrix is not alone: the scaled copy, the cross-validation folds and the
    # solver's work arrays came to 3-3.5x it (1M x 576 and 100k x 1,280 rows on the scale bench).
    need = IN_MEMORY_COPIES * matrix
    # One BLAS thread: these products are thin (n x dim times dim x classes), and on 2 cores two
    # OpenBLAS threads made a 80,000 x 1,280 logreg fit 2-4x slower (8-23 s against 4-6 s).
    with threadpool_limits(limits=1, user_api="blas"):
        if cfg.head != ZERO_SHOT and need > budget:
            from imgfeat.heads.stream import fit_streamed  # stream.py builds on this module: a cycle left to break

            fitted, metrics, timings, trained_by = fit_streamed(ws, cfg, rows, dim, budget)
            trained_by["why"] = (
                f"training in memory would take about {human(need)} ({IN_MEMORY_COPIES}x the labelled "
                f"features, {human(matrix)}): that would exceed the memory budget ({human(budget)})"
            )
        else:
            fitted, metrics, timings, dim = _fit_in_memory(ws, cfg, rows)
            trained_by = {
                "path": IN_MEMORY,
                "why": f"training in memory takes about {human(need)} ({IN_MEMORY_COPIES}x the labelled "
                f"features, {human(matrix)}): it fits the memory budget ({human(budget)})",
            }
    metrics["cv"] = fitted.cv
    extra = {}
    if isinstance(fitted.estimator, KerasMLPClassifier):
        extra[A.CURVES_FILE] = training_curves_png(fitted.estimator.history_)
    extra[LEFT_OUT_FILE] = _parquet_bytes(left_out_table(rows.left_out_files))
    meta = _head_meta(cfg, rows, head_id, info, fitted, metrics, run_id, dim)
    meta["timings"] = {k: round(v, 3) for k, v in timings.items()}
    meta["trained_by"] = trained_by
    A.write_head(ws, head_id, fitted.estimator, meta, metrics, rows.parts(), extra)


def _fit_in_memory(
    ws: Workspace, cfg: TrainConfig, rows: LabelledRows
) -> tuple[FitResult, JsonObject, dict[str, float], int]:
    """The whole labelled matrix in memory: CV, a fit on every row, test metrics, the timings, the dim."""
    t0 = time.perf_counter()
    # One pass over the shards for both sets: decoding float16 Parquet is most of the load time.
    X_all = _features(ws, cfg.featureset, concat_keys([rows.train_keys, rows.test_keys]))
    X_train, X_test = X_all[: rows.n_train], X_all[rows.n_train :]
    t_load = time.perf_counter()
    log.info(
        "training %s head on %d x %d features (%d classes), evaluating on %d",
        cfg.head,
        *X_train.shape,
        len(rows.classes),
        len(X_test),
    )
    fitted = (
        fit_zero_shot(ws, cfg, rows.classes, X_train, rows.train_labels)
        if cfg.head == ZERO_SHOT
        else fit_head(cfg, X_train, rows.train_labels)
    )
    t_fit = time.perf_counter()
    metrics = evaluate(fitted.estimator, X_test, rows.test_labels, rows.classes)
    timings = {"load_features": t_load - t0, "cv_and_fit": t_fit - t_load, "evaluate": time.perf_counter() - t_fit}
    return fitted, metrics, timings, int(X_train.shape[1])


def _head_meta(
    cfg: TrainConfig,
    rows: LabelledRows,
    head_id: str,
    info: dict[str, Any],
    fitted: FitResult,
    metrics: dict[str, Any],
    run_id: str,
    dim: int,
) -> JsonObject:
    """head.json, less what write_head adds (model file, sha256, versions, created_at)."""
    return {
        "head_id": head_id,
        "name": cfg.head_name,
        "dataset": cfg.dataset,
        "featureset": cfg.featureset,
        "head": cfg.head,
        "model_kind": fitted.kind,
        "backbone": info.get("backbone"),
        "dim": dim,
        "classes": list(rows.classes),
        "params": cfg.params(),
        "chosen": fitted.chosen,
        "cv": {kind: scores for kind, scores in fitted.cv.items()},  # (as JSON values)
        "metrics": metrics,
        "training_hash": rows.digest(),
        "run_id": run_id,
        **describe(rows),
        "mlp_params": _mlp_params(fitted.estimator),
        "history": getattr(fitted.estimator, "history_", None),
    }


def _features(ws: Workspace, featureset: str, keys: np.ndarray) -> np.ndarray:
    """The feature rows of ``keys`` (distinct ids), in their order: each batch is put in its place
    as it streams in, so memory holds the matrix once (not its batches and then a copy)."""
    index = KeyIndex(keys)
    X = np.empty((len(keys), featureset_dim(ws, featureset)), np.float32)
    filled = 0
    for got, B in iter_features(ws, featureset, ids=index, as_keys=True):
        X[index.positions(got)] = B
        filled += len(got)
    if filled != len(keys):  # the keys had feature rows when the rows were read: a shard vanished under us
        raise ImgfeatError(f"featureset {featureset!r} lost {len(keys) - filled} feature rows while training")
    return X


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data: bytes = sink.getvalue().to_pybytes()
    return data


def _mlp_params(est: Any) -> dict[str, Any] | None:
    return est.get_params() if isinstance(est, KerasMLPClassifier) else None


def fit_zero_shot(ws: Workspace, cfg: TrainConfig, classes: list[str], X: np.ndarray, y: np.ndarray) -> FitResult:
    """No fitting: the prompts' embeddings are the head. Its accuracy on the training rows stands in
    for the cross-validation score the other heads report (nothing was learned from them)."""
    est = zero_shot_head(ws, cfg.featureset, classes, cfg.prompt)
    acc = float(np.mean(est.predict(X) == np.asarray(y, dtype=object))) if len(y) else 0.0
    cv = {
        ZERO_SHOT: {
            "mean": acc,
            "std": 0.0,
            "folds": [],
            "rows": int(len(y)),
            "note": "no fitting: accuracy on the training rows",
        }
    }
    return FitResult(ZERO_SHOT, est, cv, {"prompt": cfg.prompt})


def fit_head(cfg: TrainConfig, X: np.ndarray, y: np.ndarray) -> FitResult:
    """Cross-validate the wanted kind(s) on the same folds; refit the best on all rows."""
    if cfg.head == "svm" and cfg.kernel == "rbf" and len(y) > RBF_WARN_ROWS:
        log.warning(
            "an rbf SVM grows quadratically with rows; %d rows may take very long "
            "(--kernel linear or --head logreg scale)",
            len(y),
        )
    X_cv, y_cv = _cv_sample(X, y, cfg.cv_max_rows, cfg.random_state)
    winner, cv, best, n_folds = choose_kind(cfg, X_cv, y_cv)
    estimator = _make(cfg, winner, y_cv, n_folds).set_params(**best).fit(X, y)
    return FitResult(winner, estimator, cv, chosen_params(best))


def choose_kind(
    cfg: TrainConfig, X_cv: np.ndarray, y_cv: np.ndarray
) -> tuple[str, dict[str, dict[str, Any]], dict[str, Any], int]:
    """Cross-validate the wanted kind(s) on the same folds: (winner, every kind's CV scores, the winner's
    parameters as its estimator names them, the number of folds)."""
    folds = StratifiedKFold(_n_folds(cfg.cv, y_cv), shuffle=True, random_state=cfg.random_state)
    kinds = ("logreg", "svm", "mlp") if cfg.head == "auto" else (cfg.head,)
    cv, best = {}, {}
    for kind in kinds:
        cv[kind], best[kind] = _cross_validate(cfg, kind, X_cv, y_cv, folds)
        log.info("%s: cv accuracy %.4f +- %.4f", kind, cv[kind]["mean"], cv[kind]["std"])
    winner = max(kinds, key=lambda k: cv[k]["mean"])
    return winner, cv, best[winner], folds.n_splits


def chosen_params(best: dict[str, Any]) -> JsonObject:
    """``{"clf__C": 0.1}`` -> ``{"C": 0.1}`` (head.json's ``chosen``)."""
    return {k.rsplit("__", 1)[-1]: v for k, v in best.items()}


def _cross_validate(
    cfg: TrainConfig, kind: str, X: np.ndarray, y: np.ndarray, folds: StratifiedKFold
) -> tuple[dict[str, Any], dict[str, Any]]:
    est = _make(cfg, kind, y, folds.n_splits)
    if kind == "mlp":
        scores = cross_val_score(est, X, y, cv=folds, scoring="accuracy")
        return _scores(scores, {}, len(y)), {}
    _, default = sklearn_head(kind, cfg.kernel, cfg.class_weight, cfg.random_state, cfg.max_iter, 2)
    ((name, values),) = default.items()
    values = sorted(cfg.c_grid or values)
    tried: dict[float, dict[str, Any]] = {}
    for extension in range(MAX_GRID_EXTENSIONS + 1):
        _search(est, name, [c for c in values if c not in tried], X, y, folds, cfg.n_jobs, tried)
        best = choose_c(tried)
        grown = None if cfg.c_grid or extension == MAX_GRID_EXTENSIONS else extend_grid(values, best)
        if grown is None:
            break
        log.info(
            "%s: the best C (%g) is at the edge of the grid; extending it to %g",
            kind,
            best,
            min(grown) if min(grown) < min(values) else max(grown),
        )
        values = grown
    if len(values) > 1 and best in (values[0], values[-1]):
        log.warning(
            "%s: the best C (%g) is at the edge of the searched grid %s; a value beyond it might score better",
            kind,
            best,
            values,
        )
    grid = {
        f"{c:g}": {"accuracy": round(r["accuracy"], 4), "log_loss": round(r["log_loss"], 4)}
        for c, r in sorted(tried.items())
    }
    extra = {"grid": grid, "chosen_by": "log_loss", "log_loss": round(tried[best]["log_loss"], 4)}
    return _scores(np.array(tried[best]["folds"]), extra, len(y)), {name: best}


def _search(
    est: Any,
    name: str,
    values: list[float],
    X: np.ndarray,
    y: np.ndarray,
    folds: StratifiedKFold,
    n_jobs: int | None,
    into: dict[float, dict[str, Any]],
) -> None:
    """Cross-validate each C on the same folds; record its mean accuracy, mean log-loss, fold accuracies."""
    search = GridSearchCV(
        est, {name: values}, cv=folds, scoring=CV_SCORING, refit=False, n_jobs=_cv_jobs(n_jobs, X)
    ).fit(X, y)
    res = search.cv_results_
    for i, params in enumerate(res["params"]):
        into[float(params[name])] = {
            "accuracy": float(res["mean_test_accuracy"][i]),
            "log_loss": -float(res["mean_test_log_loss"][i]),
            "folds": [float(res[f"split{k}_test_accuracy"][i]) for k in range(folds.n_splits)],
        }


def choose_c(tried: dict[float, dict[str, Any]]) -> float:
    """The C with the lowest cross-validated log-loss; near-ties go to the smaller (more regularised) C.

    Log-loss, not accuracy: on well separated classes accuracy is flat over C, and picking the
    smallest C of that tie gave heads whose probabilities were squeezed towards uniform (a mean
    of 0.61 on photos they classified right). Log-loss is a proper scoring rule: it rewards
    probabilities that are right and sure and punishes confident mistakes. On separable classes
    it creeps down forever as C grows, by amounts no fold could tell apart; a log-loss within
    LOG_LOSS_TIE of the lowest counts as a tie, so C stops growing where the gain stops mattering.
    """
    lowest = min(r["log_loss"] for r in tried.values())
    bound = lowest + max(LOG_LOSS_TIE * lowest, LOG_LOSS_TIE_ABS)
    return min(c for c, r in tried.items() if r["log_loss"] <= bound)


def extend_grid(values: list[float], best: float) -> list[float] | None:
    """The grid with one more value past the edge ``best`` sits on; None when it sits inside."""
    if len(values) < 2 or best not in (values[0], values[-1]):
        return None
    return [values[0] / GRID_STEP, *values] if best == values[0] else [*values, values[-1] * GRID_STEP]


def _cv_jobs(wanted: int | None, X: np.ndarray) -> int:
    """Parallel CV fits only where they pay for starting worker processes (about a second).

    joblib limits each worker's BLAS to one thread, which is also what makes these thin
    matrix products fast on a busy machine: two BLAS threads fighting for two cores can be
    4x slower than one.
    """
    if wanted is not None:
        return wanted
    return min(os.cpu_count() or 1, 4) if X.size >= PARALLEL_CV_VALUES else 1


def _scores(scores: np.ndarray, extra: dict[str, Any], n: int) -> JsonObject:
    return {
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "folds": [round(float(s), 4) for s in scores],
        "rows": n,
        **extra,
    }


def _make(cfg: TrainConfig, kind: str, y: np.ndarray, n_folds: int) -> Any:  # an unfitted estimator
    if kind == "mlp":
        return KerasMLPClassifier(
            hidden=cfg.hidden,
            dropout=cfg.dropout,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            patience=cfg.patience,
            class_weight=cfg.class_weight,
            random_state=cfg.random_state,
        )
    est, _ = sklearn_head(
        kind, cfg.kernel, cfg.class_weight, cfg.random_state, cfg.max_iter, _calibration_folds(kind, y, n_folds)
    )
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
        log.warning("smallest class has %d training images: using %d-fold CV instead of %d", smallest, smallest, wanted)
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


def evaluate(estimator: Any, X: np.ndarray | None, y: np.ndarray, classes: list[str]) -> JsonObject:
    """Test metrics: accuracy, macro F1, per-class precision/recall/F1/support, confusion matrix.
    ``X`` is None for an estimator that holds its predictions already (a streamed evaluation)."""
    return scores_of(y, estimator.predict(X) if len(y) else y, classes)


def scores_of(y: np.ndarray, pred: np.ndarray, classes: list[str], labels: list[Any] | None = None) -> JsonObject:
    """``evaluate``'s metrics from the true and predicted labels (a streamed evaluation gathers these);
    ``labels``: what ``y`` and ``pred`` hold for each of ``classes`` when not the names (e.g. codes)."""
    labels = list(classes) if labels is None else labels
    if len(y) == 0:
        return {
            "test_accuracy": None,
            "macro_f1": None,
            "per_class": {},
            "confusion": None,
            "n_test": 0,
            "note": "no evaluation rows (no test/val split and --test-fraction 0)",
        }
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class: JsonObject = {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    }
    return {
        "test_accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion": {"labels": list(classes), "matrix": confusion_matrix(y, pred, labels=labels).tolist()},
        "n_test": int(len(y)),
    }
