"""Heads fitted from a stream of feature batches, for labelled features larger than the memory budget.

Hyper-parameters come from a stratified subsample that fits the budget (``fit.choose_kind``, the
in-memory path's own cross-validation); the full fit then reads the features a batch at a time
(``featureset.iter_features``): mean and variance in one pass, then logistic regression or a linear
SVM by ``SGDClassifier.partial_fit`` (log-loss or hinge; C maps to ``alpha = 1 / (C n)``, the same
objective scaled), or the dense net by ``KerasMLPClassifier.fit_stream``. The test rows are
scored a batch at a time too. The artifact is the in-memory path's: a scaler + classifier
pipeline (the SVM's margins calibrated on the subsample) or a ``.keras`` net.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from imgfeat.core.keys import KeyIndex, KeySet, as_strings, keys_of
from imgfeat.core.progress import progress
from imgfeat.core.storage import scratch_file, scratch_writes
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import featureset_info, iter_features, load_features
from imgfeat.heads.data import LabelledRows
from imgfeat.heads.estimators import KerasMLPClassifier
from imgfeat.heads.fit import STREAMED, FitResult, choose_kind, chosen_params, scores_of
from imgfeat.heads.train import TrainConfig

log = logging.getLogger(__name__)

FLOAT_BYTES = 4  # features are float32 in memory, whatever their storage dtype
SUBSAMPLE_SHARE = 8  # the CV subsample may take 1/8 of the budget: CV copies it per fold and per job
BATCH_SHARE = 16  # a streamed batch 1/16 (the reader holds a row group beside it)
MAX_BATCH_ROWS = 65_536
LINEAR_EPOCHS = 15  # passes of SGD over the training rows, at most
MIN_EPOCHS = 3  # passes before the fit may stop early ...
STOP_TOL = 1e-3  # ... when the mean loss on the in-memory subsample has not fallen by this much below its best
NO_CHANGE_EPOCHS = 2  # for this many passes in a row
SGD_ETA = 0.01  # SGD's step on standardised features; the average from the second epoch on smooths it
SHUFFLE_BATCHES = 4  # batches mixed at a time (within BATCH_SHARE: 4 of 16 shares)


class LabelledStream:
    """The training rows of a featureset as (X, y) batches, read again for every pass.

    The rows are ids as compact keys (sorted and distinct) and their labels as codes into
    ``classes``: a few tens of bytes a row, where a dict of id -> label cost a few hundred."""

    def __init__(
        self,
        ws: Workspace,
        featureset: str,
        keys: np.ndarray,
        codes: np.ndarray,
        classes: np.ndarray,
        batch_rows: int,
        shuffle: np.random.Generator | None = None,  # shards in a random order, rows mixed SHUFFLE_BATCHES at a time
        # rows held for mixing in this dtype (the featureset's: float16 halves them)
        dtype: np.dtype | type = np.float32,
    ) -> None:
        self.ws, self.featureset, self.batch_rows, self.shuffle = ws, featureset, batch_rows, shuffle
        self.dtype = np.dtype(dtype)
        self._index, self._codes = KeyIndex(keys), codes
        self.classes = np.asarray(classes, dtype=object)
        self.class_counts = np.bincount(codes, minlength=len(self.classes))

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        held: list[tuple[np.ndarray, np.ndarray]] = []
        for keys, X in iter_features(
            self.ws,
            self.featureset,
            ids=self._index,
            batch_rows=self.batch_rows,
            dtype=self.dtype,
            shuffle=self.shuffle,
            as_keys=True,
        ):
            held.append((X, self.classes[self._codes[self._index.positions(keys)]]))
            if self.shuffle is None or len(held) == SHUFFLE_BATCHES:
                yield from self._mixed(held)
                held = []
        yield from self._mixed(held)

    def _mixed(self, held: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The held batches' rows in a random order, ``batch_rows`` at a time (as they are unshuffled),
        as float32."""
        if not held:
            return
        X, y = np.concatenate([h[0] for h in held]), np.concatenate([h[1] for h in held])
        held.clear()  # copied into X: the batches go before the rows are handed out
        order = self.shuffle.permutation(len(y)) if self.shuffle is not None else np.arange(len(y))
        for start in range(0, len(y), self.batch_rows):
            at = order[start : start + self.batch_rows]
            yield np.asarray(X[at], np.float32), y[at]


class ScratchStream:
    """A ``LabelledStream`` decoded from its featureset once, on the first pass, and read back from an
    unnamed scratch file of its rows on every later one.

    Parquet decodes float16 lists slowly (about 70 ms a 1,000 x 1,280 row group): reading the
    featureset again for every SGD epoch cost more than the fit itself. The first pass (the moments
    pass) writes each batch as it comes, in ``dtype`` (the featureset's own: float16 stays exact);
    a later pass visits the rows in blocks of ``batch_rows`` in a random order, mixed
    SHUFFLE_BATCHES blocks at a time, as the shard pass mixes row groups. Memory: those blocks and
    the labels of every row (one small integer each).
    """

    def __init__(self, source: LabelledStream, folder: Path, dtype: np.dtype | type = np.float32) -> None:
        self.source, self.batch_rows = source, source.batch_rows
        self.classes, self.class_counts, self.shuffle = source.classes, source.class_counts, source.shuffle
        self.dtype = np.dtype(dtype)
        self._folder = folder
        self._file: Any = None
        self._codes: list[np.ndarray] = []
        self._rows, self._dim, self._done = 0, 0, False

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._done:
            yield from self._again()
            return
        self.close()  # a first pass cut short is redone from the start
        self._file = scratch_file(self._folder)  # unnamed: gone when closed, even after a crash
        self._codes, self._rows = [], 0
        for X, y in self.source():
            with scratch_writes(self._folder):  # a full or read-only disk: one line, not a traceback
                self._file.write(np.ascontiguousarray(X, self.dtype).tobytes())
            self._codes.append(np.searchsorted(self.classes, y).astype(self._code_type))
            self._rows, self._dim = self._rows + len(y), X.shape[1]
            yield X, y
        with scratch_writes(self._folder):
            self._file.flush()
        self._codes = [np.concatenate(self._codes)] if self._codes else []  # one array for every later pass
        self._done = True

    @property
    def _code_type(self) -> type:
        """The smallest integer that holds a class number: a byte a row for up to 127 classes."""
        return np.int8 if len(self.classes) < 2**7 else np.int16 if len(self.classes) < 2**15 else np.int32

    def _again(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        codes = self._codes[0] if self._codes else np.zeros(0, np.int32)
        step = self.batch_rows
        starts = np.arange(0, self._rows, step)
        if self.shuffle is not None:
            starts = starts[self.shuffle.permutation(len(starts))]
        for k in range(0, len(starts), SHUFFLE_BATCHES):
            rows = np.concatenate([np.arange(s, min(self._rows, s + step)) for s in starts[k : k + SHUFFLE_BATCHES]])
            if self.shuffle is not None:
                rows = self.shuffle.permutation(rows)
            for lo in range(0, len(rows), step):  # read a batch at a time: memory holds one batch
                part = rows[lo : lo + step]
                yield self._read(part), self.classes[codes[part]]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the scratch file as float32 (a mapping opened per call: read pages stay out of RSS)."""
        mm = np.memmap(self._file, self.dtype, "r", shape=(self._rows, self._dim))
        out = np.asarray(mm[rows], np.float32)
        del mm
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._done = None, False


def batch_rows_for(budget: int, dim: int) -> int:
    return int(min(MAX_BATCH_ROWS, max(64, budget // (BATCH_SHARE * FLOAT_BYTES * max(dim, 1)))))


def fit_streamed(
    ws: Workspace, cfg: TrainConfig, rows: LabelledRows, dim: int, budget: int
) -> tuple[FitResult, dict[str, Any], dict[str, float], dict[str, Any]]:
    """Choose on a subsample, fit on every training row streamed, score the test rows streamed."""
    t0 = time.perf_counter()
    ids_cv, X_cv, y_cv = _subsample(ws, cfg, rows, dim, budget)
    winner, cv, best, _n_folds = choose_kind(cfg, X_cv, y_cv)
    t_cv = time.perf_counter()
    keys, codes = rows.train_keys, rows.train_codes
    if winner == "mlp":  # its early stopping watches a part of the subsample the stream leaves out
        X_cv, X_val, y_cv, y_val, _, ids_val = _validation_part(X_cv, y_cv, ids_cv, cfg)
        kept = ~KeySet(ids_val).contains(keys)
        keys, codes = keys[kept], codes[kept]
    stored = np.float16 if featureset_info(ws, cfg.featureset).get("dtype") == "float16" else np.float32
    source = LabelledStream(
        ws,
        cfg.featureset,
        keys,
        codes,
        rows.label_names,
        batch_rows_for(budget, dim),
        np.random.default_rng(cfg.random_state),
        stored,
    )
    stream = ScratchStream(source, ws.root, stored)
    n = rows.n_train
    log.info(
        "training %s head from a stream of %d x %d features (%d rows a batch), C chosen on %d rows",
        winner,
        n,
        dim,
        stream.batch_rows,
        len(y_cv),
    )
    mean, var = moments(stream, dim)
    if winner == "mlp":
        est = _mlp(cfg).fit_stream(stream, rows.classes, mean, var, X_val, y_val, _class_weights(cfg, stream))
        epochs = est.n_epochs_
    else:
        if winner == "svm" and cfg.kernel == "rbf":
            log.warning(
                "an rbf SVM cannot train from a stream (its kernel matrix grows with rows squared): "
                "training a linear SVM with the C chosen for it; raise --memory-budget for the rbf one"
            )
        C = float(next(iter(best.values())))
        est = fit_linear(winner, C, stream, rows.classes, n, mean, var, cfg, LINEAR_EPOCHS, (X_cv, y_cv))
        epochs = est.named_steps["clf"].n_epochs_
        if winner == "svm":  # margins -> probabilities, as the in-memory SVM's sigmoid calibration
            est = CalibratedClassifierCV(FrozenEstimator(est), method="sigmoid").fit(X_cv, y_cv)
    stream.close()
    t_fit = time.perf_counter()
    y_test, pred = _predict_streamed(ws, cfg.featureset, est, rows, stream.batch_rows)
    metrics = scores_of(y_test, pred, rows.classes, labels=list(range(len(rows.classes))))
    timings = {"cv": t_cv - t0, "stream_fit": t_fit - t_cv, "evaluate": time.perf_counter() - t_fit}
    trained_by = {"path": STREAMED, "epochs": int(epochs), "batch_rows": stream.batch_rows, "cv_rows": int(len(y_cv))}
    return FitResult(winner, est, cv, chosen_params(best)), metrics, timings, trained_by


def _validation_part(X: np.ndarray, y: np.ndarray, ids: np.ndarray, cfg: TrainConfig):
    """A stratified tenth of the subsample (as ``KerasMLPClassifier``'s own validation split)."""
    n_val = max(len(set(y.tolist())), int(round(len(y) * 0.1)))
    return train_test_split(X, y, ids, test_size=n_val, stratify=y, random_state=cfg.random_state)


def _subsample(
    ws: Workspace, cfg: TrainConfig, rows: LabelledRows, dim: int, budget: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stratified subsample of the training rows that fits the budget (at most ``cv_max_rows``)."""
    y = rows.train_codes  # in label order: a stratified split of them is the split of the labels
    cap = max(2 * len(rows.classes), min(cfg.cv_max_rows, budget // (SUBSAMPLE_SHARE * FLOAT_BYTES * max(dim, 1))))
    idx = stratified_rows(y, int(cap), cfg.random_state) if cap < len(y) else np.arange(len(y))
    keys = rows.train_keys[idx]
    ids, X = load_features(ws, cfg.featureset, as_strings(keys))
    return ids, X, rows.label_names[y[idx][KeyIndex(keys).positions(keys_of(ids))]]


def stratified_rows(codes: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a seeded stratified sample of ``size`` rows: each class in proportion
    (largest remainders first), at least two of each class that has two.

    ``train_test_split(stratify=)`` holds several int64 arrays as long as ``codes`` (an inverse,
    an argsort, permutations): at ten million rows about 250 MB, here 8 bytes a row of the largest
    class at most."""
    counts = np.bincount(codes)
    share = counts * (size / len(codes))
    take = np.floor(share).astype(np.int64)
    short = size - int(take.sum())
    if short > 0:
        take[np.argsort(take - share, kind="stable")[:short]] += 1
    take = np.minimum(counts, np.maximum(take, np.minimum(counts, 2)))
    rng = np.random.default_rng(seed)
    parts = [
        np.flatnonzero(codes == c)[rng.choice(n, k, replace=False)] for c, (n, k) in enumerate(zip(counts, take)) if k
    ]
    out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    out.sort()
    return out


def moments(stream: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance in one streamed pass (batches merged exactly, in float64)."""
    n, mean, m2 = 0, np.zeros(dim), np.zeros(dim)
    for X, _ in stream():
        k = len(X)
        if not k:
            continue
        bm = X.mean(axis=0, dtype=np.float64)
        bm2 = ((X - bm) ** 2).sum(axis=0, dtype=np.float64)
        delta = bm - mean
        mean = mean + delta * k / (n + k)
        m2 = m2 + bm2 + delta**2 * n * k / (n + k)
        n += k
    return mean, m2 / max(n, 1)


def scaler_of(mean: np.ndarray, var: np.ndarray, n: int) -> StandardScaler:
    """A fitted StandardScaler from streamed moments (what ``fit`` would have learned on all rows)."""
    scaler = StandardScaler()
    scaler.mean_, scaler.var_ = mean, var
    scaler.scale_ = np.where(var > 0, np.sqrt(var), 1.0)  # sklearn's rule for a constant feature
    scaler.n_features_in_, scaler.n_samples_seen_ = len(mean), n
    return scaler


def fit_linear(
    kind: str,
    C: float,
    stream: LabelledStream | ScratchStream,
    classes: list[str],
    n: int,
    mean: np.ndarray,
    var: np.ndarray,
    cfg: TrainConfig,
    epochs: int,
    monitor: tuple[np.ndarray, np.ndarray] | None = None,
) -> Pipeline:
    """Logistic regression (log-loss) or a linear SVM (hinge) by averaged SGD over at most ``epochs`` passes.

    LogisticRegression minimises ``C * sum(loss) + |w|^2 / 2``; SGDClassifier ``mean(loss) + alpha *
    |w|^2 / 2``: the same minimum at ``alpha = 1 / (C n)``. With ``monitor`` (rows in memory), the
    fit stops once their mean loss has not fallen STOP_TOL below its best for NO_CHANGE_EPOCHS passes
    (after MIN_EPOCHS): the averaged weights have settled. ``clf.n_epochs_`` says how many ran.
    """
    scaler = scaler_of(mean, var, n)
    # A constant step averaged from the second epoch: "optimal" steps start at 1 / alpha, huge for a
    # small alpha, and an average over them never recovers (36% against logreg's 84% on blobs).
    clf = SGDClassifier(
        loss="log_loss" if kind == "logreg" else "hinge",
        alpha=1.0 / (C * n),
        learning_rate="constant",
        eta0=SGD_ETA,
        average=max(1, n),
        random_state=cfg.random_state,
        class_weight=_class_weights(cfg, stream),
        n_jobs=cfg.n_jobs or os.cpu_count(),  # one-vs-rest classes in threads (the same fit whatever the count)
    )
    labels = np.asarray(classes, dtype=object)
    watch = None if monitor is None or not len(monitor[1]) else (scaler.transform(monitor[0]), monitor[1])
    best, since = np.inf, 0
    t0 = time.perf_counter()
    with progress(total=epochs * n, desc=f"train {kind} (streamed, {epochs} epochs)", unit="row") as bar:
        for epoch in range(1, epochs + 1):
            for X, y in stream():  # shuffled: a shard holds images in scan order, often class by class
                clf.partial_fit(scaler.transform(X), y, classes=labels)
                bar.update(len(y))
            clf.n_epochs_ = epoch
            loss = np.inf if watch is None else _loss(clf, *watch)
            since = 0 if loss < best - STOP_TOL else since + 1
            best = min(best, loss)
            done = watch is not None and epoch >= MIN_EPOCHS and since >= NO_CHANGE_EPOCHS
            # a line per epoch: a scheduler's log (no terminal, no bar) sees the work move and its pace
            log.info(
                "%s (streamed): epoch %d of %d done in %.0f s so far%s%s",
                kind,
                epoch,
                epoch if done else epochs,
                time.perf_counter() - t0,
                "" if watch is None else f", loss {loss:.4f}",
                f"; settled, no more passes (at most {epochs})" if done else "",
            )
            if done:
                break
    return Pipeline([("scale", scaler), ("clf", clf)])


def _loss(clf: SGDClassifier, X: np.ndarray, y: np.ndarray) -> float:
    """The classifier's own mean loss on standardised rows: log-loss, or the hinge of each class one-vs-rest."""
    if clf.loss == "log_loss":
        P = clf.predict_proba(X)
        col = np.searchsorted(clf.classes_, y)
        return float(-np.mean(np.log(np.clip(P[np.arange(len(y)), col], 1e-12, None))))
    D = clf.decision_function(X)
    D = D[:, None] if D.ndim == 1 else D
    sign = np.where(y[:, None] == clf.classes_[None, : D.shape[1]], 1.0, -1.0)
    if D.shape[1] == 1:  # two classes: one margin, positive for the second
        sign = np.where(y[:, None] == clf.classes_[1], 1.0, -1.0)
    return float(np.mean(np.maximum(0.0, 1.0 - sign * D)))


def _class_weights(cfg: TrainConfig, stream: LabelledStream | ScratchStream) -> dict[str, float] | None:
    """``balanced`` as scikit-learn computes it (partial_fit takes only explicit weights)."""
    if cfg.class_weight is None:
        return None
    present = [(c, int(k)) for c, k in zip(stream.classes.tolist(), stream.class_counts.tolist()) if k]
    total = sum(k for _, k in present)
    return {c: float(total / (len(present) * k)) for c, k in present}


def _mlp(cfg: TrainConfig) -> KerasMLPClassifier:
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


def _predict_streamed(
    ws: Workspace, featureset: str, est: Any, rows: LabelledRows, batch_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) classes of the test rows as codes into ``rows.classes`` (int32), scored a
    batch at a time: 8 bytes a row, where labels as Python objects were 16 and their sort more."""
    index, names = KeyIndex(rows.test_keys), rows.label_names
    y, pred = [], []
    for keys, X in iter_features(ws, featureset, ids=index, batch_rows=batch_rows, as_keys=True):
        y.append(rows.test_codes[index.positions(keys)])
        pred.append(np.searchsorted(names, np.asarray(est.predict(X), dtype=object)).astype(np.int32))
    if not y:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(y), np.concatenate(pred)
