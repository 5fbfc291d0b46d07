"""The fine-tune loop: warm-start epochs, then unfrozen-top epochs, one checkpoint per epoch, resumable."""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from imgfeat.backbones import BackboneSpec, build_model
from imgfeat.backbones.weights import resolve_weights
from imgfeat.core.hashing import canonical_json, file_sha256
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import remove_tree, write_bytes_atomic, write_json_atomic
from imgfeat.core.workspace import Workspace
from imgfeat.extract.recipe import WeightsId
from imgfeat.finetune import config as T
from imgfeat.finetune.blocks import apply_unfreeze, unfreeze_start
from imgfeat.finetune.data import FinetuneRows, ImageBatches, SkipLog
from imgfeat.finetune.model import build_finetune_model
from imgfeat.finetune.warm import WarmRecipe, head_init
from imgfeat.heads.artifacts import library_versions
from imgfeat.heads.data import describe
from imgfeat.heads.fit import evaluate
from imgfeat.heads.plots import training_curves_png

log = logging.getLogger(__name__)


class Session:
    """One fine-tune in progress: the model, its data, and the checkpoint state it resumes from."""

    def __init__(
        self,
        ws: Workspace,
        cfg: T.FinetuneConfig,
        spec: BackboneSpec,
        size: int,
        rows: FinetuneRows,
        out: Path,
        fid: str,
    ):
        self.cfg, self.spec, self.rows, self.out, self.fid = cfg, spec, rows, out, fid
        self.ckpt = out / "checkpoint"
        for scratch in [*out.glob(".scratch-*"), *self.ckpt.glob(".scratch-*")]:
            remove_tree(scratch, ws.root)  # left by a run killed while saving
        _set_precision(cfg.precision)
        self.backbone = build_model(spec, weights=cfg.weights, input_size=size, pooling="avg", seed=cfg.random_state)
        self.start = unfreeze_start(self.backbone, spec, cfg.unfreeze_blocks, cfg.unfreeze_from)
        self.model = build_finetune_model(
            spec, self.backbone, len(rows.classes), cfg.augment, cfg.dropout, cfg.random_state
        )
        if cfg.warm_start_head:
            self.model.get_layer("head").set_weights(self.warm_head(ws, size, cfg.warm_start_head))
        dcfg = T.decode_config(cfg, size)
        self.skipped = SkipLog()
        self.train = ImageBatches(
            rows.train, dcfg, cfg.batch_size, True, cfg.random_state, self.skipped, workers=cfg.workers
        )
        self.val = ImageBatches(rows.val, dcfg, cfg.batch_size, False, 0, self.skipped, fill=False)
        self.test = ImageBatches(rows.test, dcfg, cfg.batch_size, False, 0, self.skipped, fill=False)
        self.state: dict[str, Any] = {
            **self.identity(),
            "epoch": 0,
            "history": {},
            "best_val_loss": None,
            "bad_epochs": 0,
            "seconds_per_epoch": [],
            "warm_metrics": None,
            "skipped": [],
        }
        self.phase: str | None = None
        self.trained_layers: list[str] = []

    def warm_head(self, ws: Workspace, size: int, head_id: str) -> list[np.ndarray]:
        ref = resolve_weights(self.spec, self.cfg.weights, size)
        recipe = WarmRecipe(
            self.spec.name,
            WeightsId.of(ref, self.cfg.random_state).identity(),
            size,
            self.cfg.interpolation,
            self.cfg.exif,
        )
        return head_init(ws, head_id, recipe, self.rows.classes)

    # --- phases ---
    def enter_phase(self, epoch: int) -> None:
        phase = "warmup" if epoch < self.cfg.warmup_epochs else "finetune"
        if phase == self.phase:
            return
        if phase == "warmup":
            self.backbone.trainable = False
            lr = self.cfg.warmup_learning_rate
        else:
            self.trained_layers = apply_unfreeze(self.backbone, self.start)
            lr = self.cfg.learning_rate
            log.info(
                "fine-tuning %d backbone layers from %s on (BatchNormalization stays frozen)",
                len(self.trained_layers),
                self.backbone.layers[self.start].name,
            )
        self.model.compile(
            optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        self.phase = phase

    # --- checkpoints ---
    def identity(self) -> JsonObject:
        """What a checkpoint must name to continue this run: its fine-tune id and parameters (as JSON)."""
        return {"finetune_id": self.fid, "params": json.loads(canonical_json(self.cfg.params()))}

    def resume(self) -> int:
        """The epoch to start from: the checkpoint's if it belongs to this run and loads, else 0.

        A damaged or foreign checkpoint is lost progress, not an error: one warning, a fresh start.
        """
        if not (self.ckpt.exists() or self.ckpt.is_symlink()):
            return 0
        state_file = self.ckpt / T.CKPT_STATE
        if not (state_file.exists() or state_file.is_symlink()):
            return self.discard_checkpoint(None)  # killed before its first state: nothing to resume
        try:
            state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else None
        except (OSError, ValueError) as exc:
            return self.discard_checkpoint(f"cannot read {state_file}: {exc}")
        why = T.checkpoint_problem(state, self.identity(), self.cfg.total_epochs)
        if why or not isinstance(state, dict):  # (checkpoint_problem names a state that is no dict)
            return self.discard_checkpoint(f"{state_file}: {why}")
        before = self.model.get_weights()
        try:
            _load_exactly(self.model, self.ckpt / T.CKPT_WEIGHTS)
        except Exception as exc:  # truncated, not HDF5, another model's layers: h5py and Keras raise many types
            self.model.set_weights(before)  # a load that failed half way leaves no mixed weights
            return self.discard_checkpoint(
                f"cannot load {self.ckpt / T.CKPT_WEIGHTS} into this model: {type(exc).__name__}: {str(exc)[:200]}"
            )
        self.state = state
        self.check_best()
        self.skipped.paths.update(self.state["skipped"])
        log.info("resuming from the checkpoint after epoch %d of %d", self.state["epoch"], self.cfg.total_epochs)
        return int(self.state["epoch"])

    def discard_checkpoint(self, why: str | None) -> int:
        """Remove the checkpoint folder (never following a link) and start from epoch 0."""
        if why:
            log.warning("ignoring the fine-tune checkpoint (%s): starting from epoch 0", why)
        if self.ckpt.is_symlink() or not self.ckpt.is_dir():
            self.ckpt.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.ckpt)
        return 0

    def check_best(self) -> None:
        """The best weights so far must be the ones the state recorded; otherwise tracking starts over."""
        best, sha = self.ckpt / T.CKPT_BEST, self.state.get("best_sha256")
        if self.state["best_val_loss"] is None and not best.exists():
            return
        if best.is_file() and sha == file_sha256(best):
            return
        log.warning(
            "ignoring %s (missing, damaged or not the checkpoint's): the best epoch is tracked again from here", best
        )
        if best.is_dir() and not best.is_symlink():
            shutil.rmtree(best)
        else:
            best.unlink(missing_ok=True)
        self.state.update(best_val_loss=None, bad_epochs=0, best_epoch=None, best_sha256=None, stopped=False)

    def checkpoint(self, epoch: int) -> None:
        """Weights first, then the state that points at them: a crash between the two repeats one epoch."""
        T.save_keras_atomic(self.model.save_weights, self.ckpt / T.CKPT_WEIGHTS)
        self.state["epoch"] = epoch + 1
        self.state["skipped"] = sorted(self.skipped.paths)
        write_json_atomic(self.state, self.ckpt / T.CKPT_STATE)

    # --- one epoch ---
    def run_epoch(self, epoch: int, callbacks: list) -> dict[str, float]:
        self.enter_phase(epoch)
        self.train.set_epoch(epoch)
        t0 = time.perf_counter()
        hist = self.model.fit(
            self.train, validation_data=self.val, initial_epoch=epoch, epochs=epoch + 1, verbose=0, callbacks=callbacks
        ).history
        self.state["seconds_per_epoch"].append(round(time.perf_counter() - t0, 2))
        logs = {k: float(v[-1]) for k, v in hist.items()}
        for k, v in logs.items():
            self.state["history"].setdefault(k, []).append(v)
        log.info(
            "epoch %d/%d (%s): %s",
            epoch + 1,
            self.cfg.total_epochs,
            self.phase,
            ", ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items())),
        )
        return logs

    def track_best(self, epoch: int, logs: dict[str, float]) -> bool:
        """Keep the best fine-tune weights by validation loss; True when patience has run out."""
        if self.phase != "finetune":
            return False
        best = self.state["best_val_loss"]
        if best is None or logs["val_loss"] < best:
            sha = T.save_keras_atomic(self.model.save_weights, self.ckpt / T.CKPT_BEST)
            self.state.update(best_val_loss=logs["val_loss"], bad_epochs=0, best_epoch=epoch + 1, best_sha256=sha)
            return False
        self.state["bad_epochs"] += 1
        return self.state["bad_epochs"] >= self.cfg.patience

    def predict_labels(self, data: ImageBatches) -> tuple[np.ndarray, np.ndarray]:
        """Streamed evaluation: true and predicted class indices of the images that decoded."""
        ys, preds = [], []
        for i in range(len(data)):
            x, y = data[i]
            if len(y):
                preds.append(np.argmax(self.model.predict_on_batch(x), axis=1))
                ys.append(y)
        if not ys:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        return np.concatenate(ys), np.concatenate(preds)

    def test_metrics(self) -> JsonObject:
        y, pred = self.predict_labels(self.test)
        names = np.array(self.rows.classes, dtype=object)
        return evaluate(_Predicted(names[pred]), None, names[y], self.rows.classes)


class _Predicted:
    """heads.fit.evaluate takes an estimator; here the predictions come from a streamed pass."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def predict(self, _X: Any) -> np.ndarray:
        return self.labels


def _load_exactly(model: keras.Model, path: Path) -> None:
    """Load weights that must fit every layer: Keras only warns (once per layer, on stderr) about layers
    the file lacks and leaves them as initialised, so such a warning is a mismatch here. The optimizer's
    variables are not in a fresh model yet, so Keras skipping those is expected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(str(path))
    other = [str(w.message) for w in caught if "for optimizer" not in str(w.message)]
    if other:
        raise ValueError(f"{len(other)} layers do not match (first: {other[0][:120]})")


def _set_precision(precision: str) -> None:
    if precision == "auto":
        gpu = any("gpu" in d.lower() for d in keras.distribution.list_devices())
        precision = "mixed_float16" if gpu else "float32"
    keras.config.set_dtype_policy(precision)


def train_and_write(
    ws: Workspace,
    cfg: T.FinetuneConfig,
    spec: BackboneSpec,
    size: int,
    base: str,
    rows: FinetuneRows,
    fid: str,
    out: Path,
    run_id: str,
) -> None:
    """Train epoch by epoch from the last checkpoint, then commit the artifacts, finetune.json last."""
    policy = keras.config.dtype_policy()
    try:
        s = Session(ws, cfg, spec, size, rows, out, fid)
        first = s.resume()
        train_epochs(s, first)
        s.enter_phase(cfg.total_epochs - 1)  # a fully resumed run still needs the unfrozen layer list
        if (s.ckpt / T.CKPT_BEST).is_file():
            _load_exactly(s.model, s.ckpt / T.CKPT_BEST)  # its sha256 was checked on resume
        write_artifacts(s, cfg, base, fid, out, run_id, first)
    finally:
        keras.config.set_dtype_policy(policy)


def train_epochs(s: Session, first: int) -> None:
    cfg = s.cfg
    callbacks = [keras.callbacks.TensorBoard(cfg.tensorboard)] if cfg.tensorboard else []
    if cfg.warmup_epochs == 0 and first == 0:
        s.state["warm_metrics"] = s.test_metrics()  # the starting head (e.g. --warm-start), before any training
    for epoch in range(first, cfg.total_epochs):
        if s.state.get("stopped"):
            break
        logs = s.run_epoch(epoch, callbacks)
        if epoch == cfg.warmup_epochs - 1:
            s.state["warm_metrics"] = s.test_metrics()  # the frozen-backbone head, for comparison
        s.state["stopped"] = s.track_best(epoch, logs)
        s.checkpoint(epoch)
        if s.state["stopped"]:
            log.info("validation loss has not improved for %d epochs: stopping early", cfg.patience)


def write_artifacts(s: Session, cfg: T.FinetuneConfig, base: str, fid: str, out: Path, run_id: str, first: int) -> None:
    metrics = s.test_metrics()
    warm = s.state.get("warm_metrics") or {}
    metrics["warm_start_test_accuracy"] = warm.get("test_accuracy")
    weights_sha = T.save_keras_atomic(s.backbone.save_weights, out / T.WEIGHTS_FILE)
    model_sha = T.save_keras_atomic(s.model.save, out / T.MODEL_FILE)
    write_bytes_atomic(training_curves_png(s.state["history"]), out / T.CURVES_FILE)
    meta = {
        "finetune_id": fid,
        "name": cfg.name or fid,
        "dataset": cfg.dataset,
        "backbone": cfg.backbone,
        "base_weights": base,
        "input_size": s.backbone.input_shape[1],
        "pooling": "avg",
        "unfreeze_from_layer": s.backbone.layers[s.start].name,
        "unfrozen_layers": s.trained_layers,
        "classes": s.rows.classes,
        "params": cfg.params(),
        "data_hash": T.data_hash(s.rows),
        "epochs_run": len(s.state["history"].get("loss", [])),
        "best_epoch": s.state.get("best_epoch"),
        "resumed_from_epoch": first,
        "history": s.state["history"],
        "metrics": metrics,
        "seconds_per_epoch": s.state["seconds_per_epoch"],
        "skipped": s.state["skipped"],
        "weights_file": T.WEIGHTS_FILE,
        "weights_sha256": weights_sha,
        "model_file": T.MODEL_FILE,
        "model_sha256": model_sha,
        "n_train": len(s.rows.train),
        "n_val": len(s.rows.val),
        "n_test": len(s.rows.test),
        "eval_split": s.rows.eval_split,
        "left_out": describe(s.rows.labelled)["left_out"],
        "run_id": run_id,
        "versions": library_versions(),
    }
    meta["skipped"] = sorted(s.skipped.paths)
    write_json_atomic(meta, out / T.META_FILE)
