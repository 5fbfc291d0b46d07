"""Zero-shot heads: class prompts embedded by a CLIP/SigLIP featureset's text tower, no fitting.

A zero-shot head classifies an image by the cosine of its embedding to each label's prompt
("a photo of a {label}" by default) embedded with the preset's tokenizer and text tower. It is
saved as an ``.npz`` of plain float arrays (loaded with ``allow_pickle=False``: no code runs),
predicts ``predict_proba`` as a softmax over scaled cosines, and is evaluated and reported like
any head. Nothing is fitted, so its accuracy on the training rows is an honest estimate too; it
stands where the other heads put their cross-validation score.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from imgfeat.core.errors import ConfigError
from imgfeat.index.text import embed_texts

ZERO_SHOT = "zero-shot"
DEFAULT_PROMPT = "a photo of a {label}"
LOGIT_SCALE = 100.0  # CLIP's learned temperature at the end of training: softmax(100 * cosine)
MODEL_FILE = "model.npz"


class ZeroShotClassifier:
    """Nearest prompt by cosine: ``classes_`` and their unit text embeddings ``prompts_``. A plain class
    with the classifier methods predict and report use (no scikit-learn base: train's config imports
    this module, and a run with nothing to train loads no scikit-learn)."""

    def __init__(self, logit_scale: float = LOGIT_SCALE) -> None:
        self.logit_scale = logit_scale

    def set_prompts(self, classes: list[str], embeddings: np.ndarray) -> ZeroShotClassifier:
        E = np.asarray(embeddings, dtype=np.float32)
        self.classes_ = np.asarray(classes, dtype=object)
        self.prompts_ = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
        self.n_features_in_ = int(E.shape[1])
        return self

    def fit(self, X: Any = None, y: Any = None) -> ZeroShotClassifier:
        return self  # nothing to learn: the prompts are the head

    def cosines(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X @ self.prompts_.T

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.cosines(X) * float(self.logit_scale)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.cosines(X), axis=1)]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, prompts=self.prompts_, logit_scale=np.float32(self.logit_scale))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, classes: list[str]) -> ZeroShotClassifier:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            est = cls(float(data["logit_scale"]))
            prompts = np.asarray(data["prompts"], dtype=np.float32)
        if prompts.shape[0] != len(classes):
            raise ValueError(f"{prompts.shape[0]} prompts for {len(classes)} classes")
        est.classes_ = np.asarray(classes, dtype=object)
        est.prompts_ = prompts
        est.n_features_in_ = int(prompts.shape[1])
        return est


def check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str) or "{label}" not in prompt:
        raise ConfigError(
            f"prompt {prompt!r} must hold '{{label}}' where each class name goes (default {DEFAULT_PROMPT!r})"
        )


def prompts_for(classes: list[str], prompt: str) -> list[str]:
    """One prompt per class; underscores in a folder-name label read as spaces."""
    return [prompt.replace("{label}", str(c).replace("_", " ")) for c in classes]


def zero_shot_head(ws: Any, featureset: str, classes: list[str], prompt: str) -> ZeroShotClassifier:
    """The head for these classes: their prompts through the featureset's preset text tower."""
    check_prompt(prompt)
    return ZeroShotClassifier().set_prompts(classes, embed_texts(ws, featureset, prompts_for(classes, prompt)))
