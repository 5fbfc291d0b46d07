"""The finetune stage: warm-start a head, unfreeze the backbone's top, train with checkpoints, write artifacts."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from imgfeat.backbones import get_backbone
from imgfeat.backbones.weights import resolve_weights
from imgfeat.core.errors import ConfigError
from imgfeat.core.hashing import canonical_digest
from imgfeat.core.results import (
    JsonObject,
    JsonResult,
    json_int,
    json_list,
    json_numbers,
    json_object,
    json_str,
)
from imgfeat.core.storage import WAIT_HINT, FileLock
from imgfeat.core.workspace import Workspace
from imgfeat.finetune.blocks import family_pattern
from imgfeat.finetune.config import (
    AUGMENT_NAMES,
    CKPT_BEST,
    CKPT_STATE,
    CKPT_WEIGHTS,
    CURVES_FILE,
    META_FILE,
    MODEL_FILE,
    PRECISIONS,
    WEIGHTS_FILE,
    FinetuneConfig,
    checkpoint_problem,
    data_hash,
    decode_config,
    finetune_dir,
    save_keras_atomic,
)
from imgfeat.heads.versions import resolve_head

log = logging.getLogger(__name__)

__all__ = [
    "AUGMENT_NAMES",
    "CKPT_BEST",
    "CKPT_STATE",
    "CKPT_WEIGHTS",
    "CURVES_FILE",
    "META_FILE",
    "MODEL_FILE",
    "PRECISIONS",
    "WEIGHTS_FILE",
    "FinetuneConfig",
    "checkpoint_problem",
    "data_hash",
    "decode_config",
    "finetune_dir",
    "save_keras_atomic",
    "FinetuneSummary",
    "make_finetune_id",
    "read_meta",
    "run_finetune",
    "summary",
]


@dataclass(frozen=True)
class FinetuneSummary(JsonResult):
    """What `imgfeat finetune --json` prints: name, metrics (test_accuracy), weights, and counts."""

    name: str
    finetune_id: str
    reused: bool
    backbone: str
    metrics: dict[str, Any]
    weights: str
    weights_sha256: str
    model: str
    dir: str
    epochs_run: int
    resumed_from_epoch: int
    skipped_images: int
    n_train: int
    n_val: int
    n_test: int
    seconds: float
    seconds_per_epoch: list[float] = field(default_factory=list)


def make_finetune_id(cfg: FinetuneConfig, base_identity: str, data_hash: str) -> str:
    key = {"params": cfg.params(), "base": base_identity, "data": data_hash}
    return f"{cfg.name or cfg.dataset}-{cfg.backbone}-{canonical_digest(key, 8)}"


def run_finetune(ws: Workspace, cfg: FinetuneConfig, run_id: str) -> FinetuneSummary:
    """Fine-tune (or reuse, or resume) and return the summary."""
    from imgfeat.finetune.data import read_rows  # Keras and scikit-learn: only when a fine-tune runs

    t0 = time.perf_counter()
    if cfg.warm_start_head is not None:  # the version, not the name, is part of the fine-tune's identity
        cfg = replace(cfg, warm_start_head=resolve_head(ws, cfg.warm_start_head))
    spec = get_backbone(cfg.backbone)
    if getattr(spec, "preset_dir", None):
        raise ConfigError(
            f"finetune takes keras.applications backbones; {spec.name} is a keras-hub preset "
            f"(extract its features and train a head on them instead)"
        )
    if cfg.unfreeze_from is None:
        family_pattern(spec)  # a family without named blocks fails here, before any work
    size = spec.check_input_size(cfg.input_size)
    base = resolve_weights(spec, cfg.weights, size).identity
    rows = read_rows(ws, cfg.dataset, cfg.test_fraction, cfg.val_fraction, cfg.random_state)
    fid = make_finetune_id(cfg, base, data_hash(rows))
    out = finetune_dir(ws, fid)
    if (out / META_FILE).is_file():
        log.info("fine-tune %s already done with this configuration on this data; reusing it", fid)
        return summary(ws, fid, reused=True, seconds=time.perf_counter() - t0)
    with FileLock(ws.locks_dir / f"finetune-{fid}.lock", f"fine-tune {fid}", cfg.wait, hint=WAIT_HINT):
        if not (out / META_FILE).is_file():
            from imgfeat.finetune.loop import train_and_write  # Keras: only when a fine-tune trains

            train_and_write(ws, cfg, spec, size, base, rows, fid, out, run_id)
    return summary(ws, fid, reused=False, seconds=time.perf_counter() - t0)


def read_meta(ws: Workspace, finetune_id: str) -> JsonObject:
    meta: JsonObject = json.loads((finetune_dir(ws, finetune_id) / META_FILE).read_text())  # loop.py writes an object
    return meta


def summary(ws: Workspace, fid: str, reused: bool, seconds: float) -> FinetuneSummary:
    meta = read_meta(ws, fid)
    out = finetune_dir(ws, fid)
    return FinetuneSummary(
        name=json_str(meta, "name"),
        finetune_id=fid,
        reused=reused,
        backbone=json_str(meta, "backbone"),
        metrics=json_object(meta, "metrics"),
        weights=str(out / WEIGHTS_FILE),
        weights_sha256=json_str(meta, "weights_sha256"),
        model=str(out / MODEL_FILE),
        dir=str(out),
        epochs_run=json_int(meta, "epochs_run"),
        resumed_from_epoch=json_int(meta, "resumed_from_epoch"),
        skipped_images=len(json_list(meta, "skipped")),
        n_train=json_int(meta, "n_train"),
        n_val=json_int(meta, "n_val"),
        n_test=json_int(meta, "n_test"),
        seconds=round(seconds, 3),
        seconds_per_epoch=[] if reused else json_numbers(meta, "seconds_per_epoch"),
    )
