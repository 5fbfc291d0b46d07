"""Training images streamed from the manifest: splits, and a keras PyDataset over the extract decoder."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import keras
import numpy as np
import pyarrow as pa
from sklearn.model_selection import train_test_split

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.workspace import Workspace
from imgfeat.extract.decode import DecodeConfig, DecodeError, decode_image
from imgfeat.heads.data import MANIFEST_COLUMNS, LabelledRows, labelled_rows, unique_images
from imgfeat.scan.manifest import dataset_root, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """One role's images: absolute paths, integer labels, and the ids (for the data hash)."""

    ids: np.ndarray
    paths: list[str]
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class FinetuneRows:
    """Train, validation and test images of a dataset, labelled with indices into ``classes``."""

    classes: list[str]
    train: Split
    val: Split
    test: Split
    labelled: LabelledRows
    eval_split: str | None


def read_rows(
    ws: Workspace, dataset: str, test_fraction: float, val_fraction: float, random_state: int
) -> FinetuneRows:
    """Reader: the manifest's readable, labelled images split train / val / test (no featureset needed)."""
    manifest = read_manifest(ws, dataset, columns=MANIFEST_COLUMNS)
    root = dataset_root(ws, dataset)
    return split_rows(manifest, str(root), test_fraction, val_fraction, random_state, dataset)


def split_rows(
    manifest: pa.Table,
    root: str,
    test_fraction: float,
    val_fraction: float,
    random_state: int,
    dataset: str = "dataset",
) -> FinetuneRows:
    """Pure mapper: the train stage's split (every readable image counts), then a stratified val split."""
    ok_ids = {
        i
        for i, s in zip(manifest.column(S.IMAGE_ID).to_pylist(), manifest.column(S.STATUS).to_pylist())
        if i is not None and s == S.STATUS_OK
    }
    rows = labelled_rows(manifest, ok_ids, test_fraction, random_state, dataset)
    df, _, _ = unique_images(manifest)
    path_of = dict(zip(df[S.IMAGE_ID], df[S.PATH]))
    classes = rows.classes
    index = {c: i for i, c in enumerate(classes)}
    tr_ids, va_ids, tr_lab, va_lab = _val_split(rows, val_fraction, random_state, dataset)

    def split(ids: np.ndarray, labels: np.ndarray) -> Split:
        return Split(ids, [f"{root}/{path_of[i]}" for i in ids], np.array([index[v] for v in labels], np.int32))

    return FinetuneRows(
        classes,
        split(tr_ids, tr_lab),
        split(va_ids, va_lab),
        split(rows.test_ids, rows.test_labels),
        rows,
        rows.eval_split,
    )


def _val_split(rows: LabelledRows, fraction: float, seed: int, dataset: str):
    n_classes = len(rows.classes)
    n_val = max(n_classes, int(round(len(rows.train_ids) * fraction)))
    if len(rows.train_ids) - n_val < n_classes:
        raise ConfigError(
            f"dataset {dataset!r} has {len(rows.train_ids)} training images in {n_classes} "
            f"classes: too few to hold out a validation split of {fraction:g} for early stopping"
        )
    return train_test_split(
        rows.train_ids, rows.train_labels, test_size=n_val, stratify=rows.train_labels, random_state=seed
    )


@dataclass
class SkipLog:
    """Files that failed to decode while training: skipped and counted, never a crash."""

    paths: set[str] = field(default_factory=set)

    def add(self, path: str, exc: DecodeError) -> None:
        if path not in self.paths:
            log.warning("skipping %s (%s)", path, exc.code)
        self.paths.add(path)


class ImageBatches(keras.utils.PyDataset):
    """Batches of (uint8-valued float32 RGB images, int labels), decoded from disk as they are asked for.

    A file that fails to decode is skipped (and counted in ``skipped``). For training (``fill``) its
    place goes to the next good file in the epoch's order, so batches stay full and the model never
    sees a zero image; for evaluation the batch is just one image shorter (possibly empty).
    """

    def __init__(
        self,
        split: Split,
        dcfg: DecodeConfig,
        batch_size: int,
        shuffle: bool,
        seed: int,
        skipped: SkipLog | None = None,
        fill: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.split, self.dcfg, self.batch_size, self.fill = split, dcfg, batch_size, fill
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.skipped = skipped if skipped is not None else SkipLog()
        self.order = self._order()

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def _order(self) -> np.ndarray:
        n = len(self.split)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle as epoch ``epoch`` would: a resumed run sees the same order as an uninterrupted one."""
        self.epoch = epoch
        self.order = self._order()

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        want = min(self.batch_size, len(self.split) - i * self.batch_size)
        images, labels = [], []
        for j in self._candidates(i * self.batch_size):
            path = self.split.paths[j]
            if path in self.skipped.paths:
                continue
            try:
                images.append(decode_image(path, self.dcfg))
            except DecodeError as exc:
                self.skipped.add(path, exc)
                continue
            labels.append(self.split.y[j])
            if len(images) == want:
                break
        if not images:
            if not self.fill:
                h, w = self.dcfg.size
                return np.zeros((0, h, w, 3), np.float32), np.zeros((0,), np.int32)
            raise ConfigError(f"none of the {len(self.split)} images in this split could be decoded")
        return np.stack(images).astype(np.float32), np.asarray(labels, np.int32)

    def _candidates(self, first: int):
        n = len(self.order)
        span = n if self.fill else min(self.batch_size, n - first)
        return (int(self.order[(first + k) % n]) for k in range(span))
