"""Labelled training data: the manifest joined with a featureset, split into train and evaluation rows."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.hashing import sha256_lines
from imgfeat.core.keys import KeySet, keys_of
from imgfeat.core.logs import warn_once
from imgfeat.core.results import JsonObject
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import committed_ids
from imgfeat.scan.manifest import read_manifest
from imgfeat.scan.rows import paths_ascending, readable

log = logging.getLogger(__name__)

# What the evaluation rows are: a split of the manifest, or a seeded stratified hold-out.
EVAL_HELD_OUT = "held_out"
MIN_TRAIN_PER_CLASS = 2
LEFT_OUT_JSON_MAX = 1000  # left-out files listed in a JSON summary (their table holds all)


@dataclass(frozen=True)
class LabelledRows:
    """Train and evaluation rows (ids and labels, sorted by id) plus what was left out and why."""

    train_ids: np.ndarray
    train_labels: np.ndarray
    test_ids: np.ndarray
    test_labels: np.ndarray
    eval_split: str | None
    left_out: dict[str, int] = field(default_factory=dict)
    left_out_files: pd.DataFrame | None = None  # duplicates and label conflicts, by path (LEFT_OUT_SCHEMA)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.train_labels.tolist()))

    def digest(self) -> str:
        """sha256 of every (role, id, label): the training data's identity for the head id."""
        return sha256_lines(
            f"{role}\t{i}\t{lab}"
            for role, ids, labels in (
                ("train", self.train_ids, self.train_labels),
                ("test", self.test_ids, self.test_labels),
            )
            for i, lab in zip(ids.tolist(), labels.tolist())
        )


MANIFEST_COLUMNS = [S.IMAGE_ID, S.PATH, S.LABEL, S.SPLIT, S.STATUS]


def read_labelled(
    ws: Workspace, dataset: str, featureset: str, test_fraction: float, random_state: int
) -> LabelledRows:
    """Reader + mapper: manifest rows with a label and a feature row, split for training."""
    manifest = read_manifest(ws, dataset, columns=MANIFEST_COLUMNS)
    return labelled_rows(manifest, committed_ids(ws, featureset), test_fraction, random_state, dataset, featureset)


def unique_images(manifest: pa.Table) -> tuple[pd.DataFrame, dict[str, int], pd.DataFrame]:
    """Readable images, one row per image_id (the first path wins), what was dropped, and the files.

    The third table names every file involved (``LEFT_OUT_SCHEMA``): each duplicate path left out
    and, for an image whose copies carry different labels, all of its paths.
    """
    df = manifest.select(MANIFEST_COLUMNS).to_pandas()
    ok = df[(df[S.STATUS] == S.STATUS_OK) & df[S.IMAGE_ID].notna()]
    ok = ok.sort_values(S.PATH, kind="stable")
    first = ok.drop_duplicates(S.IMAGE_ID, keep="first")
    conflicts = ok.groupby(S.IMAGE_ID)[S.LABEL].nunique(dropna=True)
    conflicting = set(conflicts[conflicts > 1].index)
    counts = {
        "not_readable": int(len(df) - len(ok)),
        "duplicates": int(len(ok) - len(first)),
        "conflicting_labels": len(conflicting),
    }
    files = left_out_files(ok, first, conflicting)
    if conflicting:
        shown = files[files[S.REASON] == S.REASON_CONFLICT]
        warn_once(
            log,
            "%d images appear under several labels; the first path's label is used: %s",
            len(conflicting),
            _listing(shown),
        )
    return first.reset_index(drop=True), counts, files


def unique_table(manifest: pa.Table) -> tuple[pa.Table, dict[str, int], pd.DataFrame]:
    """``unique_images`` in Arrow: the same rows, counts and files, without a Python object per row.

    The first table keeps ``MANIFEST_COLUMNS`` of each readable image's first path, in path order;
    only the rows of repeated ids (usually few) go through pandas, for the files table. Predict
    uses it at millions of rows, where ``unique_images``' DataFrame costs hundreds of bytes a row.
    """
    # Each step copies the columns only when it changes something: a manifest is usually all
    # readable, in path order and without repeats, and at a million rows each copy is ~100 MB.
    t = manifest.select(MANIFEST_COLUMNS)
    ok = readable(t)
    ok_rows = t if pc.all(ok).as_py() is not False else t.filter(ok)
    if not paths_ascending(ok_rows[S.PATH]):
        ok_rows = ok_rows.take(pc.sort_indices(ok_rows, sort_keys=[(S.PATH, "ascending")]))
    keys = keys_of(ok_rows[S.IMAGE_ID])
    uniq, first_at, counts_of = np.unique(keys, return_index=True, return_counts=True)
    first_at.sort()
    first = ok_rows if len(first_at) == ok_rows.num_rows else ok_rows.take(pa.array(first_at, pa.int64()))
    repeated = np.zeros(len(keys), dtype=bool)
    if (counts_of > 1).any():
        repeated = KeySet(uniq[counts_of > 1]).contains(keys)
    dup = ok_rows.filter(pa.array(repeated)).to_pandas() if repeated.any() else None
    files, conflicting = repeated_files(dup)
    counts = {
        "not_readable": int(t.num_rows - ok_rows.num_rows),
        "duplicates": int(ok_rows.num_rows - first.num_rows),
        "conflicting_labels": len(conflicting),
    }
    return first, counts, files


def repeated_files(dup: pd.DataFrame | None) -> tuple[pd.DataFrame, set[str]]:
    """The files table and the conflicting ids from the readable rows of repeated ids (in path
    order; None or empty: no repeats), with ``unique_images``' warning for conflicting labels."""
    if dup is None or dup.empty:
        return pd.DataFrame(columns=S.LEFT_OUT_SCHEMA.names), set()
    per_id = dup.groupby(S.IMAGE_ID)[S.LABEL].nunique(dropna=True)
    conflicting = set(per_id[per_id > 1].index)
    files = left_out_files(dup, dup.drop_duplicates(S.IMAGE_ID, keep="first"), conflicting)
    if conflicting:
        warn_once(
            log,
            "%d images appear under several labels; the first path's label is used: %s",
            len(conflicting),
            _listing(files[files[S.REASON] == S.REASON_CONFLICT]),
        )
    return files, conflicting


def left_out_files(ok: pd.DataFrame, first: pd.DataFrame, conflicting: set[str]) -> pd.DataFrame:
    """Pure mapper: the duplicate paths left out, and every path of an image with several labels."""
    kept = first.set_index(S.IMAGE_ID)[S.PATH]
    dup = ok[ok[S.IMAGE_ID].duplicated(keep=False)]
    out = pd.DataFrame(
        {
            S.IMAGE_ID: dup[S.IMAGE_ID].astype(str),
            S.PATH: dup[S.PATH].astype(str),
            S.LABEL: dup[S.LABEL].astype(object).where(dup[S.LABEL].notna(), None),
            S.REASON: [S.REASON_CONFLICT if i in conflicting else S.REASON_DUPLICATE for i in dup[S.IMAGE_ID]],
            S.KEPT_PATH: kept.loc[dup[S.IMAGE_ID]].astype(str).to_numpy(),
        }
    )
    # A plain duplicate's kept copy is not "left out"; an image with conflicting labels shows all paths.
    out = out[(out[S.REASON] == S.REASON_CONFLICT) | (out[S.PATH] != out[S.KEPT_PATH])]
    return out.reset_index(drop=True)


def _listing(files: pd.DataFrame, limit: int = 6) -> str:
    items = [f"{p} ({lab})" for p, lab in zip(files[S.PATH], files[S.LABEL])]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def left_out_table(files: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(files, schema=S.LEFT_OUT_SCHEMA, preserve_index=False)


def labelled_rows(
    manifest: pa.Table,
    feature_ids: set[str],
    test_fraction: float,
    random_state: int,
    dataset: str = "dataset",
    featureset: str | None = None,
) -> LabelledRows:
    """Pure mapper: dedupe, keep labelled rows that have features, split train/evaluation."""
    df, left_out, files = unique_images(manifest)
    labels = df[S.LABEL].astype("string")
    has_label = labels.notna() & (labels.str.len() > 0)
    if not has_label.any():
        raise ConfigError(
            f"dataset {dataset!r} has no labels ({len(df)} images): scan a folder laid out as "
            "ROOT/<label>/... (or ROOT/<split>/<label>/...), or pass --labels-csv to 'imgfeat scan'"
        )
    has_feature = df[S.IMAGE_ID].isin(feature_ids)
    left_out["unlabelled"] = int((~has_label).sum())
    missing = left_out["missing_features"] = int((has_label & ~has_feature).sum())
    rows = df[has_label & has_feature].sort_values(S.IMAGE_ID, kind="stable")
    try:
        if rows.empty:
            raise ConfigError("none has features")
        _check_classes(rows[S.LABEL], dataset, "")
        out = _split(rows, test_fraction, random_state, dataset, left_out, files)
    except ConfigError as exc:
        if not missing:
            raise
        # The dataset may be fine: what is wrong is that its features are not extracted (yet).
        why = _missing_features(dataset, featureset, missing, int(has_label.sum()), len(rows), exc)
        raise ConfigError(why) from None
    if missing:
        log.warning(
            "%d of %d labelled images of dataset %s have no features yet (run 'imgfeat extract "
            "--dataset %s' first); left out",
            missing,
            int(has_label.sum()),
            dataset,
            dataset,
        )
    return out


def _missing_features(
    dataset: str, featureset: str | None, missing: int, labelled: int, have: int, then: ConfigError
) -> str:
    where = f"featureset {featureset}" if featureset else "this featureset"
    text = (
        f"{missing} of the {labelled} labelled images of dataset {dataset!r} have no features in {where}: "
        f"extract them first ('imgfeat extract --dataset {dataset}' with the featureset's recipe, or list "
        f"{dataset!r} in the datasets of its [features] section)"
    )
    return text if not have else f"{text}; the {have} that have features are not enough: {then}"


def _split(
    rows: pd.DataFrame,
    test_fraction: float,
    random_state: int,
    dataset: str,
    left_out: dict[str, int],
    files: pd.DataFrame,
) -> LabelledRows:
    split = rows[S.SPLIT].fillna("")
    eval_split = next((s for s in (S.SPLIT_TEST, S.SPLIT_VAL) if (split == s).any()), None)
    if (split == S.SPLIT_TRAIN).any():
        train = rows[split == S.SPLIT_TRAIN]
        left_out["other_split"] = int((~split.isin([S.SPLIT_TRAIN, eval_split or S.SPLIT_TRAIN])).sum())
        test = rows[split == eval_split] if eval_split else None
    elif eval_split:
        raise ConfigError(f"dataset {dataset!r} has {eval_split!r} rows but no 'train' rows to fit on")
    else:
        train, test = rows, None
    if test is None and test_fraction > 0:
        train, test = _hold_out(train, test_fraction, random_state, dataset)
        eval_split = EVAL_HELD_OUT
    test = test if test is not None else rows.iloc[:0]
    _check_classes(train[S.LABEL], dataset, " training")
    unseen = ~test[S.LABEL].isin(set(train[S.LABEL]))
    left_out["unseen_test_labels"] = int(unseen.sum())
    test = test[~unseen]
    return LabelledRows(
        _objects(train[S.IMAGE_ID]),
        _objects(train[S.LABEL]),
        _objects(test[S.IMAGE_ID]),
        _objects(test[S.LABEL]),
        eval_split if len(test) else None,
        left_out,
        files,
    )


def _objects(column: pd.Series) -> np.ndarray:
    return column.astype(str).to_numpy(dtype=object)


def _hold_out(
    rows: pd.DataFrame, fraction: float, random_state: int, dataset: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_classes = rows[S.LABEL].nunique()
    n_test = max(n_classes, int(round(len(rows) * fraction)))
    if len(rows) - n_test < MIN_TRAIN_PER_CLASS * n_classes:
        raise ConfigError(
            f"dataset {dataset!r} is too small to hold out --test-fraction {fraction:g}: {len(rows)} "
            f"labelled images in {n_classes} classes; add images, or give it a train/test split"
        )
    from sklearn.model_selection import train_test_split  # only datasets without a split pay for it

    train, test = train_test_split(rows, test_size=n_test, stratify=rows[S.LABEL], random_state=random_state)
    return train.sort_values(S.IMAGE_ID), test.sort_values(S.IMAGE_ID)


def _check_classes(labels: pd.Series, dataset: str, where: str) -> None:
    """A classifier needs two classes and a few images of each: say which class falls short."""
    counts = Counter(labels.tolist())
    listing = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    if len(counts) < 2:
        ((only, n),) = counts.items()
        raise ConfigError(
            f"dataset {dataset!r} has one{where} class only ({only!r}, {n} images); a classifier "
            "needs at least 2 classes: add images of another class"
        )
    small = sorted(k for k, v in counts.items() if v < MIN_TRAIN_PER_CLASS)
    if small:
        raise ConfigError(
            f"class {small[0]!r} has {counts[small[0]]}{where} image(s) in dataset {dataset!r}; "
            f"every class needs at least {MIN_TRAIN_PER_CLASS} ({listing}): add images of "
            f"{', '.join(map(repr, small))} or remove {'it' if len(small) == 1 else 'them'} from the labels"
        )


def describe(rows: LabelledRows) -> JsonObject:
    """Counts for the summary."""
    return {
        "n_train": int(len(rows.train_ids)),
        "n_test": int(len(rows.test_ids)),
        "eval_split": rows.eval_split,
        "classes": list(rows.classes),
        "left_out": dict(rows.left_out),
    }
