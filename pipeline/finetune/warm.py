"""Warm start from a trained head: a logreg head on the same recipe's frozen features becomes the Dense head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgfeat.core.errors import ConfigError
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import read_provenance
from imgfeat.extract.recipe import Recipe
from imgfeat.heads import load_head


@dataclass(frozen=True)
class WarmRecipe:
    """What of a featureset's recipe a head must share with a fine-tune to warm-start it: the
    fine-tune's backbone gives avg-pooled, untapped features of images decoded the same way."""

    backbone: str
    weights: str  # the weights' identity (WeightsId.identity())
    input_size: int
    interpolation: str
    exif: str
    pooling: str = "avg"
    layer: str | None = None

    @classmethod
    def of(cls, recipe: Recipe) -> WarmRecipe:
        return cls(
            recipe.backbone,
            recipe.weights.identity(),
            recipe.input_size,
            recipe.interpolation,
            recipe.exif,
            recipe.pooling,
            recipe.layer,
        )

    def differences(self, trained: WarmRecipe) -> dict[str, tuple[Any, Any]]:
        """field -> (the head's value, this fine-tune's) for every field that differs."""
        return {
            f.name: (getattr(trained, f.name), getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(trained, f.name) != getattr(self, f.name)
        }


def head_init(ws: Workspace, head_id: str, recipe: WarmRecipe, classes: list[str]) -> list[np.ndarray]:
    """[kernel (dim, classes), bias] of a Dense softmax head equal to the logreg head ``head_id``."""
    head = load_head(ws, head_id)
    wrong = recipe.differences(WarmRecipe.of(read_provenance(ws, head.featureset).recipe))
    if wrong:
        detail = ", ".join(f"{k} {a!r} (fine-tune: {b!r})" for k, (a, b) in sorted(wrong.items()))
        raise ConfigError(
            f"head {head_id} was trained on featureset {head.featureset}, whose recipe differs: "
            f"{detail}; train a logreg head on features extracted with the same recipe"
        )
    if head.meta.get("model_kind") != "logreg":
        raise ConfigError(
            f"head {head_id} is a {head.meta.get('model_kind')} head; only a logreg head can warm-start a fine-tune"
        )
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
