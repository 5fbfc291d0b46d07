"""The 1000 ImageNet classes (names, WordNet ids) shipped with imgfeat, and top-k decoding."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from imgfeat.core.errors import ImgfeatError

CLASSES_FILE = "imagenet_classes.tsv"
NUM_CLASSES = 1000


@dataclass(frozen=True)
class ImageNetClasses:
    """Row i describes output i of an ImageNet-1k classifier."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]  # the first WordNet lemma: "tabby", "tiger cat", "espresso"
    lemmas: tuple[str, ...]  # all lemmas: "tabby, tabby cat"


@dataclass(frozen=True)
class TopK:
    """One image's best classes, most probable first."""

    labels: list[str]
    scores: list[float]
    wnids: list[str]


@lru_cache(maxsize=1)
def imagenet_classes() -> ImageNetClasses:
    """Read ``pipeline/resources/imagenet_classes.tsv`` (ships in the wheel; nothing downloaded)."""
    text = resources.files("imgfeat").joinpath("resources", CLASSES_FILE).read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    if len(rows) != NUM_CLASSES or any(len(r) != 3 for r in rows):
        raise ImgfeatError(f"{CLASSES_FILE} is damaged: expected {NUM_CLASSES} rows of wnid, name, lemmas")
    wnids, names, lemmas = zip(*rows)
    return ImageNetClasses(wnids, names, lemmas)


def decode_predictions(probs: np.ndarray, top: int = 5) -> list[TopK]:
    """Like ``keras.applications.imagenet_utils.decode_predictions``, from the shipped table.

    ``probs`` is (batch, 1000) probabilities; ties keep the lower class index first.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"expected (batch, {NUM_CLASSES}) scores, got shape {probs.shape}")
    classes = imagenet_classes()
    top = max(1, min(int(top), NUM_CLASSES))
    out = []
    for row in probs:
        idx = np.argsort(-row, kind="stable")[:top]
        out.append(
            TopK(
                labels=[classes.names[i] for i in idx],
                scores=[float(row[i]) for i in idx],
                wnids=[classes.wnids[i] for i in idx],
            )
        )
    return out


def format_topk(result: TopK) -> str:
    """``tabby (61.2%), tiger cat (20.1%), ...``: what a person reads."""
    return ", ".join(f"{label} ({score:.1%})" for label, score in zip(result.labels, result.scores))
