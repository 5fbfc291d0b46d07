"""`imgfeat classify`: ImageNet top-k labels for image files from any backbone with an ImageNet top."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.backbones import build_model, get_backbone, list_backbones, lite
from imgfeat.backbones.weights import expected_file
from imgfeat.core.errors import ConfigError
from imgfeat.core.options import opt
from imgfeat.core.results import JsonObject
from imgfeat.extract.batches import pad_rows
from imgfeat.extract.decode import DecodeConfig, DecodeError, decode_batch
from imgfeat.extract.forward import Forward
from imgfeat.tools.imagenet import NUM_CLASSES, decode_predictions

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class ClassifyConfig:
    """Which images, which backbone and weights, and how many classes to report per image."""

    paths: tuple[str, ...]
    backbone: str = opt(DEFAULT_BACKBONE, help="a backbone with an ImageNet top")
    weights: str = opt(
        "imagenet", help="'imagenet', a .weights.h5 file with the classification top, or 'none' (random)"
    )
    top: int = opt(5, help="classes to show per image")
    batch_size: int = opt(16, help="images per forward pass")
    interpolation: str = "bilinear"
    exif: str = "rotate"

    def __post_init__(self) -> None:
        if not self.paths:
            raise ConfigError("no images given: pass one or more image files")
        if not 1 <= int(self.top) <= NUM_CLASSES:
            raise ConfigError(f"--top must be from 1 to {NUM_CLASSES}, got {self.top}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"--batch-size must be a positive integer, got {self.batch_size}")


@dataclass(frozen=True)
class ImageResult:
    """One image's answer: the top classes, or why it could not be read (a row, not a failure)."""

    path: str
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    wnids: list[str] = field(default_factory=list)
    error_code: str | None = None
    error_message: str | None = None

    def to_dict(self) -> JsonObject:
        out = asdict(self)
        return out if self.error_code else {k: out[k] for k in ("path", "labels", "scores", "wnids")}


def format_result(result: dict[str, Any]) -> str:
    """``chelsea.png: tabby (61.2%), tiger cat (20.1%), ...``, or why the image was skipped."""
    path = result["path"]
    if result.get("error_code"):
        why = result["error_message"].removeprefix(f"{path}: ")  # the decoder names the file too
        return f"{path}: cannot classify ({result['error_code']}): {why}"
    pairs = zip(result["labels"], result["scores"])
    return f"{path}: " + ", ".join(f"{label} ({score:.1%})" for label, score in pairs)


# ------------------------------------------------------------------------ backbone checks


def classifier_backbones() -> list[str]:
    """Backbones whose ImageNet top can be built here, now: offline, its weights must be local."""
    return [spec.name for spec in list_backbones() if spec.imagenet_top and _top_weights_local(spec)]


def _top_weights_local(spec: Any) -> bool:
    """A cheap check (no conversion, no hashing) that the with-top ImageNet weights are on disk."""
    if spec.imagenet_weights:  # shipped in a pip package: is that package installed?
        return spec.name not in lite.VARIANTS or lite.weights_installed(spec.name)
    try:
        return expected_file(spec, include_top=True)[0].is_file()
    except ConfigError:  # Keras has no with-top file for it
        return False


def _unavailable(name: str, why: str) -> ConfigError:
    usable = classifier_backbones()
    listed = ", ".join(usable) if usable else "none on this machine"
    return ConfigError(f"backbone {name!r} cannot classify: {why}. Backbones that can: {listed}")


def build_classifier(backbone: str, weights: str) -> tuple[Any, keras.Model]:
    """The backbone's spec and its model with the 1000-class softmax top."""
    spec = get_backbone(backbone)
    if not spec.imagenet_top:
        raise _unavailable(backbone, "it has no ImageNet classification top")
    if weights in (None, "none"):
        log.warning("classifying with random weights (--weights none): the labels mean nothing")
    try:
        model = build_model(spec, weights, include_top=True)
    except ConfigError as exc:
        if weights != "imagenet":
            raise
        raise _unavailable(backbone, str(exc).rstrip(".")) from None
    if model.output.shape[-1] != NUM_CLASSES:
        raise _unavailable(backbone, f"its top has {model.output.shape[-1]} outputs, not {NUM_CLASSES}")
    return spec, model


def input_hw(spec: Any) -> tuple[int, int]:
    size = spec.input_size
    scalar = bool(np.isscalar(size))  # (np.isscalar would narrow size to numpy's scalar types)
    return (int(size), int(size)) if scalar else (int(size[0]), int(size[1]))


# ------------------------------------------------------------------- reader, mapper, writer


def predict_probs(forward: Forward, images: np.ndarray) -> np.ndarray:
    """The pure mapper: (n, H, W, 3) uint8 RGB in, (n, 1000) ImageNet probabilities out.

    Through extract's model function (imgfeat.extract.forward): the batch is zero-padded to its one
    shape and preprocessed inside the compiled call, so a classifier sees what extract's model sees.
    """
    n = len(images)
    return forward(pad_rows(images, forward.batch_shape[0]))[:n].astype(np.float64)


def _results(
    paths: list[str], probs: np.ndarray | None, errors: list[DecodeError | None], top: int
) -> list[ImageResult]:
    ok = [i for i, e in enumerate(errors) if e is None]
    decoded = dict(zip(ok, decode_predictions(probs, top))) if ok and probs is not None else {}  # (ok: probs)
    out: list[ImageResult] = []
    for i, path in enumerate(paths):
        err = errors[i]
        if err is not None:
            out.append(ImageResult(path, error_code=err.code, error_message=err.message))
        else:
            t = decoded[i]
            out.append(ImageResult(path, t.labels, [round(s, 6) for s in t.scores], t.wnids))
    return out


def classify_images(cfg: ClassifyConfig) -> list[ImageResult]:
    """Decode each file, run the classifier in batches, and return one result per path, in order."""
    spec, model = build_classifier(cfg.backbone, cfg.weights)
    h, w = input_hw(spec)
    dcfg = DecodeConfig(size=(h, w), interpolation=cfg.interpolation, exif=cfg.exif)
    results: list[ImageResult] = []
    paths = [str(p) for p in cfg.paths]
    rows = min(cfg.batch_size, len(paths))  # one image is one model row, not a padded batch
    forward = Forward(model, spec.family, (rows, h, w, 3))
    for start in range(0, len(paths), rows):
        chunk = paths[start : start + rows]
        images, errors = decode_batch([Path(p) for p in chunk], dcfg)  # zeros where a file failed
        good = np.array([e is None for e in errors])
        probs = predict_probs(forward, images)[good] if good.any() else None
        results.extend(_results(chunk, probs, errors, cfg.top))
    return results


def run_classify(cfg: ClassifyConfig) -> JsonObject:
    """Classify and summarise: the dict the job prints with --json."""
    t0 = time.perf_counter()
    results = classify_images(cfg)
    seconds = time.perf_counter() - t0
    n_err = sum(r.error_code is not None for r in results)
    if n_err:
        log.warning("%d of %d images could not be read (see their lines)", n_err, len(results))
    return {
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "top": cfg.top,
        "images": len(results),
        "classified": len(results) - n_err,
        "errors": n_err,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(results) / seconds, 2) if seconds > 0 else None,
        "results": [r.to_dict() for r in results],
    }
