"""Warm start from a trained head: a logreg head on the same recipe's frozen features becomes the Dense head."""

from __future__ import annotations

from typing import Any

import numpy as np

from imgfeat.core.errors import ConfigError
from imgfeat.core.results import JsonObject
from imgfeat.core.workspace import Workspace

# Provenance keys that must match between the head's featureset and the fine-tune's backbone.
RECIPE_KEYS = ("backbone", "weights", "input_size", "pooling", "layer", "interpolation", "exif")


def warm_recipe(backbone: str, weights_identity: str, input_size: int, interpolation: str,
                exif: str) -> JsonObject:
    """The featureset provenance a head must have been trained on to warm-start this fine-tune."""
    return {"backbone": backbone, "weights": weights_identity, "input_size": input_size, "pooling": "avg",
            "layer": None, "interpolation": interpolation, "exif": exif}


def head_init(ws: Workspace, head_id: str, recipe: dict[str, Any], classes: list[str]) -> list[np.ndarray]:
    """[kernel (dim, classes), bias] of a Dense softmax head equal to the logreg head ``head_id``."""
    from imgfeat.extract.featureset import featureset_info
    from imgfeat.heads import load_head

    head = load_head(ws, head_id)
    info = featureset_info(ws, head.featureset)
    wrong = {k: (info.get(k), v) for k, v in recipe.items() if info.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k} {a!r} (fine-tune: {b!r})" for k, (a, b) in sorted(wrong.items()))
        raise ConfigError(f"head {head_id} was trained on featureset {head.featureset}, whose recipe differs: "
                          f"{detail}; train a logreg head on features extracted with the same recipe")
    if head.meta.get("model_kind") != "logreg":
        raise ConfigError(f"head {head_id} is a {head.meta.get('model_kind')} head; only a logreg head "
                          "can warm-start a fine-tune")
    if list(head.meta["classes"]) != list(classes):
        raise ConfigError(f"head {head_id} knows classes {head.meta['classes']}, the dataset has {classes}")
    return fold_logreg(head.estimator.named_steps["scale"], head.estimator.named_steps["clf"])


def fold_logreg(scaler: Any, clf: Any) -> list[np.ndarray]:
    """Pure mapper: StandardScaler + LogisticRegression as one Dense softmax layer (same probabilities)."""
    coef, intercept = np.asarray(clf.coef_, np.float64), np.asarray(clf.intercept_, np.float64)
    if coef.shape[0] == 1:  # binary: p(class 1) = sigmoid(z) = softmax([0, z])[1]
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    scale = np.asarray(scaler.scale_, np.float64)
    mean = np.asarray(scaler.mean_, np.float64)
    kernel = (coef / scale).T
    bias = intercept - (coef / scale) @ mean
    return [kernel.astype(np.float32), bias.astype(np.float32)]
