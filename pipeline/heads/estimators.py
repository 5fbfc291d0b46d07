"""The head estimators: scikit-learn pipelines and a Keras dense net that obeys scikit-learn's contract."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelEncoder, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted, validate_data

from imgfeat.core.progress import progress

# Regularisation grids searched by cross-validation (features are standardised first).
LOGREG_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
SVM_C_GRID = (1e-3, 1e-2, 1e-1, 1.0)
RBF_C_GRID = (0.1, 1.0, 10.0)

# Smallest validation split the dense net's early stopping watches (rows).
_MIN_VAL_ROWS = 4


class KerasMLPClassifier(ClassifierMixin, BaseEstimator):
    """Dense(hidden, relu) -> Dropout -> Dense(softmax) on standardised features, in Keras 3.

    Like any scikit-learn classifier: ``__init__`` only stores arguments, ``fit`` returns self,
    learned attributes end in ``_``, it can be cloned, grid-searched and pickled (the Keras model
    travels as ``.keras`` bytes). Standardisation is a Normalization layer inside the model, so
    the saved ``.keras`` file is the whole head.
    """

    def __init__(
        self,
        hidden: int = 256,
        dropout: float = 0.5,
        epochs: int = 50,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        validation_fraction: float = 0.1,
        patience: int = 5,
        class_weight: str | None = None,
        random_state: int | None = None,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> KerasMLPClassifier:
        import keras

        X, y = validate_data(self, X, y, dtype=np.float32)
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        codes = encoder.transform(y)
        if self.random_state is not None:
            # Keras draws initial weights, dropout masks and shuffles from the global seed.
            keras.utils.set_random_seed(int(self.random_state))
        X_fit, X_val, y_fit, y_val = self._validation_split(X, codes)
        self.model_ = self._build(X_fit, len(self.classes_))
        callbacks = []
        if X_val is not None:
            callbacks.append(keras.callbacks.EarlyStopping(patience=self.patience, restore_best_weights=True))
        history = self.model_.fit(
            X_fit,
            y_fit,
            validation_data=None if X_val is None else (X_val, y_val),
            epochs=self.epochs,
            batch_size=self.batch_size,
            class_weight=self._class_weights(codes),
            callbacks=callbacks,
            verbose=0,
        )
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        self.n_epochs_ = len(self.history_.get("loss", []))
        return self

    def fit_stream(
        self,
        batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
        classes: list[str],
        mean: np.ndarray,
        var: np.ndarray,
        X_val: np.ndarray,
        y_val: np.ndarray,
        class_weight: dict[str, float] | None = None,
    ) -> KerasMLPClassifier:
        """``fit`` for rows that do not fit in memory: ``batches()`` yields (X, labels) for one pass
        over the training rows (called once per epoch); standardisation from the streamed ``mean`` and
        ``var``; early stopping on (``X_val``, ``y_val``), rows kept out of the batches. An epoch is one
        Keras ``fit`` over a generator of mini-batches (each stream batch shuffled, class weights as
        sample weights), so the net sees every row once an epoch, without a ``fit`` call per batch."""
        import keras

        self.classes_ = np.asarray(sorted(classes), dtype=object)
        code = {c: k for k, c in enumerate(self.classes_)}
        self.n_features_in_ = len(mean)
        if self.random_state is not None:
            keras.utils.set_random_seed(int(self.random_state))
        self.model_ = self._build_from(mean, var, len(self.classes_))
        weights = None if class_weight is None else {code[c]: w for c, w in class_weight.items()}
        val = (X_val.astype(np.float32), np.asarray([code[c] for c in y_val])) if len(y_val) else None
        history: dict[str, list[float]] = {}
        best, best_weights, since = np.inf, None, 0
        with progress(total=self.epochs, desc="train mlp (streamed)", unit="epoch") as bar:
            rng = np.random.default_rng(self.random_state)
            for _ in range(self.epochs):
                with warnings.catch_warnings():  # a generator of unknown length "runs out of data": the epoch's end
                    warnings.filterwarnings("ignore", message="Your input ran out of data")
                    out = self.model_.fit(
                        self._steps(batches, code, weights, rng), epochs=1, shuffle=False, verbose=0
                    ).history
                _append(history, loss=out["loss"][-1], accuracy=out["accuracy"][-1])
                bar.update(1)
                if val is None:
                    continue
                v = self.model_.evaluate(*val, batch_size=8192, verbose=0, return_dict=True)
                _append(history, val_loss=v["loss"], val_accuracy=v["accuracy"])
                if v["loss"] < best:
                    best, best_weights, since = v["loss"], self.model_.get_weights(), 0
                elif (since := since + 1) >= self.patience:
                    break
        if best_weights is not None:
            self.model_.set_weights(best_weights)  # as EarlyStopping(restore_best_weights=True)
        self.history_ = history
        self.n_epochs_ = len(history.get("loss", []))
        return self

    def _steps(
        self,
        batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
        code: dict[Any, int],
        weights: dict[int, float] | None,
        rng: np.random.Generator,
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """One pass of ``batches()`` as Keras steps: ``batch_size`` rows each, in a random order within each batch."""
        w = None if weights is None else np.asarray([weights.get(k, 1.0) for k in range(len(code))], np.float32)
        for X, y in batches():
            codes = np.asarray([code[c] for c in y])
            order = rng.permutation(len(codes))
            for lo in range(0, len(order), self.batch_size):
                pick = order[lo : lo + self.batch_size]
                step = (np.asarray(X[pick], np.float32), codes[pick])
                yield step if w is None else (*step, w[codes[pick]])

    def _validation_split(self, X: np.ndarray, codes: np.ndarray):
        n_val = int(round(len(X) * self.validation_fraction))
        counts = np.bincount(codes)
        if n_val < max(_MIN_VAL_ROWS, len(counts)) or counts.min() < 2:
            return X, None, codes, None  # too small to hold anything out: train on all, no early stop
        X_fit, X_val, y_fit, y_val = train_test_split(
            X, codes, test_size=n_val, stratify=codes, random_state=self.random_state
        )
        return X_fit, X_val, y_fit, y_val

    def _class_weights(self, codes: np.ndarray) -> dict[int, float] | None:
        if self.class_weight is None:
            return None
        present = np.unique(codes)
        weights = compute_class_weight(self.class_weight, classes=present, y=codes)
        return {int(c): float(w) for c, w in zip(present, weights)}

    def _build(self, X: np.ndarray, n_classes: int):
        return self._build_from(X.mean(axis=0), X.var(axis=0), n_classes)

    def _build_from(self, mean: np.ndarray, var: np.ndarray, n_classes: int):
        import keras

        norm = keras.layers.Normalization(axis=-1, mean=mean, variance=np.maximum(var, 1e-12))
        model = keras.Sequential(
            [
                keras.Input(shape=(len(mean),)),
                norm,
                keras.layers.Dense(self.hidden, activation="relu"),
                keras.layers.Dropout(self.dropout),
                keras.layers.Dense(n_classes, activation="softmax"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            # XLA compiles every new model: seconds per fit for a net that trains in milliseconds.
            jit_compile=False,
        )
        return model

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        if len(X) == 0:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        # Calling the model directly (not .predict) avoids Keras' per-call dataset overhead.
        out = [np.asarray(self.model_(X[i : i + 8192], training=False)) for i in range(0, len(X), 8192)]
        return np.concatenate(out)

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    # --- its own save path (the head artifact) and pickling through it ---

    def save(self, path: Path) -> None:
        """Write the fitted Keras model to ``path`` (a ``.keras`` file)."""
        check_is_fitted(self, "model_")
        self.model_.save(str(path))

    @classmethod
    def load(cls, path: Path, classes: list[str], params: dict[str, Any] | None = None) -> KerasMLPClassifier:
        """Rebuild a fitted classifier from a ``.keras`` file (``safe_mode``: no code runs)."""
        import keras

        est = cls(**(params or {}))
        est.model_ = keras.saving.load_model(str(path), safe_mode=True, compile=False)
        est.classes_ = np.asarray(classes, dtype=object)
        est.n_features_in_ = int(est.model_.input_shape[-1])
        return est

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:
            state["_model_bytes"] = _model_to_bytes(model)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_model_bytes", None)
        self.__dict__.update(state)
        if blob is not None:
            self.model_ = _model_from_bytes(blob)


def _append(history: dict[str, list[float]], **values: float) -> None:
    for k, v in values.items():
        history.setdefault(k, []).append(float(v))


def _model_to_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        return Path(path).read_bytes()


def _model_from_bytes(blob: bytes):
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        Path(path).write_bytes(blob)
        return keras.saving.load_model(path, safe_mode=True, compile=False)


def sklearn_head(
    kind: str, kernel: str, class_weight: str | None, random_state: int, max_iter: int, calibration_cv: int
) -> tuple[Pipeline, dict[str, list[float]]]:
    """An unfitted scaler + classifier pipeline and the C grid cross-validation chooses from."""
    if kind == "logreg":
        clf = LogisticRegression(class_weight=class_weight, random_state=random_state, max_iter=max_iter)
        return _scaled(clf), {"clf__C": list(LOGREG_C_GRID)}
    grid: tuple[float, ...]
    if kernel == "linear":
        base = LinearSVC(class_weight=class_weight, random_state=random_state, max_iter=max_iter)
        grid = SVM_C_GRID
    else:
        base = SVC(kernel="rbf", class_weight=class_weight, random_state=random_state)
        grid = RBF_C_GRID
    # SVMs give margins, not probabilities: sigmoid calibration on cross-validated margins,
    # one final SVM (ensemble=False) so predicting costs one model.
    clf = CalibratedClassifierCV(base, method="sigmoid", cv=calibration_cv, ensemble=False)
    return _scaled(clf), {"clf__estimator__C": list(grid)}


def _scaled(clf) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])
