"""Labelled training data: the manifest joined with a featureset, split into train and evaluation rows."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError
from imgfeat.core.hashing import digest_chunks
from imgfeat.core.keys import KeyIndex, KeySet, as_strings, keys_of, keys_to_arrow, unique_keys
from imgfeat.core.logs import warn_once
from imgfeat.core.results import JsonObject
from imgfeat.core.workspace import Workspace
from imgfeat.extract.featureset import committed_among
from imgfeat.scan.manifest import corrupt_manifest, manifest_file, read_manifest
from imgfeat.scan.rows import ManifestRows, paths_ascending, readable, unique_positions

log = logging.getLogger(__name__)

# What the evaluation rows are: a split of the manifest, or a seeded stratified hold-out.
EVAL_HELD_OUT = "held_out"
MIN_TRAIN_PER_CLASS = 2
LEFT_OUT_JSON_MAX = 1000  # left-out files listed in a JSON summary (their table holds all)


ROWS_PART = 1 << 18  # rows of the head's rows file made (and written) at a time


@dataclass(frozen=True)
class LabelledRows:
    """Train and evaluation rows plus what was left out and why.

    The ids are compact keys (``core/keys.py``), each role's sorted, and the labels int32 codes
    into ``names`` (the training classes, sorted): at ten million rows a Python string per id
    and per label would cost gigabytes, these arrays 20 bytes a row (a content id's key is 16).
    ``train_ids`` and friends give the Python strings for the small consumers (fine-tuning, tests).
    """

    train_keys: np.ndarray
    train_codes: np.ndarray
    test_keys: np.ndarray
    test_codes: np.ndarray
    names: tuple[str, ...]
    eval_split: str | None
    left_out: dict[str, int] = field(default_factory=dict)
    left_out_files: pd.DataFrame | None = None  # duplicates and label conflicts, by path (LEFT_OUT_SCHEMA)

    @classmethod
    def of(
        cls,
        train_ids: Sequence[str] | np.ndarray,
        train_labels: Sequence[str] | np.ndarray,
        test_ids: Sequence[str] | np.ndarray,
        test_labels: Sequence[str] | np.ndarray,
        eval_split: str | None,
        left_out: dict[str, int] | None = None,
        left_out_files: pd.DataFrame | None = None,
    ) -> LabelledRows:
        """The rows from ids and label strings, in the order given."""
        names = tuple(sorted({str(v) for v in [*list(train_labels), *list(test_labels)]}))
        code = {n: k for k, n in enumerate(names)}

        def codes(labels: Sequence[str] | np.ndarray) -> np.ndarray:
            return np.array([code[str(v)] for v in labels], dtype=np.int32)

        return cls(
            keys_of(train_ids),
            codes(train_labels),
            keys_of(test_ids),
            codes(test_labels),
            names,
            eval_split,
            dict(left_out or {}),
            left_out_files,
        )

    @property
    def classes(self) -> list[str]:
        return list(self.names)

    @property
    def train_ids(self) -> np.ndarray:
        return np.asarray(as_strings(self.train_keys), dtype=object)

    @property
    def test_ids(self) -> np.ndarray:
        return np.asarray(as_strings(self.test_keys), dtype=object)

    @property
    def train_labels(self) -> np.ndarray:
        return self.label_names[self.train_codes]

    @property
    def test_labels(self) -> np.ndarray:
        return self.label_names[self.test_codes]

    @property
    def label_names(self) -> np.ndarray:
        """``names`` as an object array: ``label_names[codes]`` are labels without a string each."""
        return np.asarray(self.names, dtype=object)

    @property
    def n_train(self) -> int:
        return len(self.train_keys)

    @property
    def n_test(self) -> int:
        return len(self.test_keys)

    def digest(self) -> str:
        """sha256 of every (role, id, label) line: the training data's identity for the head id.

        The lines are made by Arrow a chunk at a time: the same bytes as ``sha256_lines`` over
        ``f"{role}\t{id}\t{label}"``, without a Python string a row."""
        return digest_chunks(self._lines())

    def _lines(self) -> Iterator[bytes]:
        for part in self.parts(DIGEST_ROWS):
            role, ids, labels = (part.column(c).combine_chunks() for c in (S.ROLE, S.IMAGE_ID, S.LABEL))
            line = pc.binary_join_element_wise(role, ids, labels, "\t")
            yield _joined(pc.binary_join_element_wise(line, "", "\n"))

    def table(self) -> pa.Table:
        """Every row as ``(image_id, label, role)`` (``HEAD_ROWS_SCHEMA``): the head's rows file."""
        return pa.concat_tables([S.HEAD_ROWS_SCHEMA.empty_table(), *self.parts()])

    def parts(self, rows: int = ROWS_PART) -> Iterator[pa.Table]:
        """``table()`` ``rows`` at a time (train rows, then test rows), made as they are asked for:
        what the head's rows file is written from, without every row's strings at once."""
        names = pa.array(self.names, pa.string())
        for role, keys, codes in (
            ("train", self.train_keys, self.train_codes),
            ("test", self.test_keys, self.test_codes),
        ):
            for lo in range(0, len(keys), rows):
                ids = keys_to_arrow(keys[lo : lo + rows])
                yield pa.table(
                    {
                        S.IMAGE_ID: ids,
                        S.LABEL: names.take(pa.array(codes[lo : lo + rows], pa.int32())),
                        S.ROLE: pa.repeat(pa.scalar(role, pa.string()), len(ids)),
                    },
                    schema=S.HEAD_ROWS_SCHEMA,
                )


DIGEST_ROWS = 1 << 18  # rows made into digest lines at a time


def _joined(lines: pa.Array) -> bytes:
    """A string array's values back to back (its data buffer between the first and last offset)."""
    if not len(lines):
        return b""
    offsets = np.frombuffer(lines.buffers()[1], np.int32, count=len(lines) + 1, offset=4 * lines.offset)
    data: bytes = lines.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_pybytes()
    return data


MANIFEST_COLUMNS = [S.IMAGE_ID, S.PATH, S.LABEL, S.SPLIT, S.STATUS]


def read_labelled(
    ws: Workspace, dataset: str, featureset: str, test_fraction: float, random_state: int
) -> LabelledRows:
    """Reader + mapper: manifest rows with a label and a feature row, split for training.

    The manifest is read a row group at a time (``ManifestImages``) into keys and codes, and the
    featureset's ids mark a bitmap over those keys a shard at a time: tens of bytes an image,
    where a table of the manifest and a set of the feature ids cost hundreds."""
    images = ManifestImages(ws, dataset)
    try:
        found = coded_images(images.keys, images.chunks(CODE_ROWS), images.counts, images.files)
    finally:
        images.close()
    del images  # its positions (8 bytes an image) are not needed from here on
    return _labelled(
        found, lambda index: committed_among(ws, featureset, index), test_fraction, random_state, dataset, featureset
    )


class ManifestImages:
    """A dataset's unique readable images (``unique_images``' rows) as compact keys, sorted (the
    order a join looks them up in), and their manifest rows by index among them: read a row group
    at a time from the manifest file when it is in path order (as scan writes it), else from a
    table of the sorted rows (``unique_table``)."""

    def __init__(self, ws: Workspace, dataset: str) -> None:
        path = manifest_file(ws, dataset)
        self._file: ManifestRows | None = None
        self._table: pa.Table | None = None
        try:
            self._file = ManifestRows(path, MANIFEST_COLUMNS)
            found = unique_positions(self._file)
        except (OSError, pa.ArrowException) as exc:
            raise corrupt_manifest(path, dataset, exc) from None
        if found is not None:
            self.keys, self._positions = found.keys, found.positions
            self.files, conflicting = repeated_files(found.repeated)
            self.counts = {**found.counts, "conflicting_labels": len(conflicting)}
        else:
            self._file.close()
            self._file = None
            self._table, self.counts, self.files = unique_table(read_manifest(ws, dataset, columns=MANIFEST_COLUMNS))
            index = KeyIndex(self._table[S.IMAGE_ID])
            self.keys, self._positions = index.keys(), index.order  # positions: rows of the table

    def rows(self, at: np.ndarray) -> pa.Table:
        """MANIFEST_COLUMNS of the images at these indices (into ``keys``), in that order."""
        if self._file is not None:
            return self._file.take(self._positions[at])
        assert self._table is not None
        return self._table.take(pa.array(self._positions[at], pa.int64()))

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, pa.Table]]:
        """Every image's rows, ``rows`` at a time in manifest order (each row group read once), with
        their indices into ``keys``: each manifest row's index found in an int32 array by row
        (4 bytes a row, where sorting the positions took 8 an image and the sort's time)."""
        n_rows = (
            self._file.num_rows if self._file is not None else self._table.num_rows if self._table is not None else 0
        )
        of_row = np.full(n_rows, -1, np.int32 if len(self.keys) < 2**31 else np.int64)
        for lo in range(0, len(self._positions), INVERT_ROWS):
            part = self._positions[lo : lo + INVERT_ROWS]
            of_row[part] = np.arange(lo, lo + len(part), dtype=of_row.dtype)
        for lo in range(0, n_rows, rows):
            at = of_row[lo : lo + rows]
            at = at[at >= 0].astype(np.int64)
            if len(at):
                yield at, self.rows(at)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


CODE_ROWS = 1 << 16  # manifest rows read back for their labels and splits at a time
INVERT_ROWS = 1 << 20  # positions turned into a row -> image index at a time
# A row's split as a small code: the three names a split may have, anything else (none, "extra") 0.
SPLIT_CODES = {S.SPLIT_TRAIN: 1, S.SPLIT_TEST: 2, S.SPLIT_VAL: 3}


@dataclass(frozen=True)
class CodedImages:
    """A dataset's unique readable images: keys, label codes and split codes."""

    keys: np.ndarray
    labels: np.ndarray  # int32 into label_names (sorted), -1: no label (null or empty)
    label_names: list[str]
    splits: np.ndarray  # int8: SPLIT_CODES, 0 for any other
    counts: dict[str, int]  # not_readable, duplicates, conflicting_labels
    files: pd.DataFrame  # the files left out (LEFT_OUT_SCHEMA)


def coded_images(
    keys: np.ndarray, chunks: Iterable[tuple[np.ndarray, pa.Table]], counts: dict[str, int], files: pd.DataFrame
) -> CodedImages:
    """The images' labels and splits as codes, from ``chunks``: (indices into ``keys``, their rows)."""
    seen: dict[str, int] = {}
    labels = np.full(len(keys), -1, np.int32)
    splits = np.zeros(len(keys), np.int8)

    def label_code(v: str | None) -> int:  # a new label gets the next code; none or empty, -1
        return seen.setdefault(v, len(seen)) if v else -1

    for at, t in chunks:
        labels[at] = _codes(t[S.LABEL], label_code, np.int32)
        splits[at] = _codes(t[S.SPLIT], lambda v: SPLIT_CODES.get(v or "", 0), np.int8)
    names = sorted(seen)
    # codes in name order, so that a code's order is its label's (stratified splits sort by it)
    rank = {v: k for k, v in enumerate(names)}
    to_sorted = np.array([*(rank[v] for v in seen), -1], np.int32)  # by the insertion code; -1 stays -1
    return CodedImages(keys, to_sorted[labels], names, splits, dict(counts), files)


def _codes(values: pa.Array | pa.ChunkedArray, code_of: Callable[[str | None], int], dtype: type) -> np.ndarray:
    """Each value's code, ``code_of`` asked once per distinct value (and once for a null)."""
    enc = pc.dictionary_encode(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)
    lut: np.ndarray = np.array([*(code_of(v) for v in enc.dictionary.to_pylist()), code_of(None)], dtype)
    return lut[pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)]  # a null: -1, the last


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
    uniq, first_at, counts_of = unique_keys(keys)
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
    feature_ids: KeySet | Iterable[str],
    test_fraction: float,
    random_state: int,
    dataset: str = "dataset",
    featureset: str | None = None,
) -> LabelledRows:
    """Pure mapper: dedupe, keep labelled rows that have features, split train/evaluation."""
    first, counts, files = unique_table(manifest)
    found = coded_images(keys_of(first[S.IMAGE_ID]), [(np.arange(first.num_rows), first)], counts, files)
    have = feature_ids if isinstance(feature_ids, KeySet) else KeySet(list(feature_ids))
    return _labelled(found, lambda index: have.contains(index.keys()), test_fraction, random_state, dataset, featureset)


def _labelled(
    found: CodedImages,
    has_features: Callable[[KeyIndex], np.ndarray],
    test_fraction: float,
    random_state: int,
    dataset: str,
    featureset: str | None,
) -> LabelledRows:
    """Keep the labelled images that have features (``has_features``: a bool for each of the
    index's ids, by rank), in id order, and split them."""
    if not (found.labels >= 0).any():
        raise ConfigError(
            f"dataset {dataset!r} has no labels ({len(found.keys)} images): scan a folder laid out as "
            "ROOT/<label>/... (or ROOT/<split>/<label>/...), or pass --labels-csv to 'imgfeat scan'"
        )
    index = KeyIndex(found.keys)  # the images in id order (ids are unique here)
    labels, splits = (
        (found.labels, found.splits) if index.in_order else (found.labels[index.order], found.splits[index.order])
    )
    has_label = labels >= 0
    has_feature = has_features(index)
    left_out = dict(found.counts)
    left_out["unlabelled"] = int((~has_label).sum())
    missing = left_out["missing_features"] = int((has_label & ~has_feature).sum())
    keep = has_label & has_feature  # a mask: an index of ten million rows is 80 MB
    n_keep = int(keep.sum())
    if n_keep < len(index):
        keys, labels, splits = index.keys()[keep], labels[keep], splits[keep]
    else:  # every image: no copy of the keys
        keys = index.keys()
    del index, has_feature, keep
    try:
        if not n_keep:
            raise ConfigError("none has features")
        _check_classes(labels, found.label_names, dataset, "")
        out = _split(
            keys, labels, splits, found.label_names, test_fraction, random_state, dataset, left_out, found.files
        )
    except ConfigError as exc:
        if not missing:
            raise
        # The dataset may be fine: what is wrong is that its features are not extracted (yet).
        why = _missing_features(dataset, featureset, missing, int(has_label.sum()), n_keep, exc)
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
    keys: np.ndarray,
    labels: np.ndarray,
    splits: np.ndarray,
    names: list[str],
    test_fraction: float,
    random_state: int,
    dataset: str,
    left_out: dict[str, int],
    files: pd.DataFrame,
) -> LabelledRows:
    """Train and evaluation rows (indices into the id-sorted rows) by split, else a held-out part."""
    # Rows are chosen by masks, not index arrays: at ten million rows an int64 index is 80 MB.
    is_train = splits == SPLIT_CODES[S.SPLIT_TRAIN]
    eval_split = next((s for s in (S.SPLIT_TEST, S.SPLIT_VAL) if (splits == SPLIT_CODES[s]).any()), None)
    is_eval = splits == SPLIT_CODES[eval_split] if eval_split else np.zeros(len(splits), bool)
    train: np.ndarray
    test: np.ndarray | None
    if is_train.any():
        train = is_train
        left_out["other_split"] = int((~(is_train | is_eval)).sum())
        test = is_eval if eval_split else None
    elif eval_split:
        raise ConfigError(f"dataset {dataset!r} has {eval_split!r} rows but no 'train' rows to fit on")
    else:
        train, test = np.ones(len(keys), bool), None
    if test is None and test_fraction > 0:
        train_at, test_at = _hold_out(np.flatnonzero(train), labels, test_fraction, random_state, dataset)
        train, test = np.zeros(len(keys), bool), np.zeros(len(keys), bool)
        train[train_at], test[test_at] = True, True
        eval_split = EVAL_HELD_OUT
    test = test if test is not None else np.zeros(len(keys), bool)
    _check_classes(labels[train], names, dataset, " training")
    # the classes are the training labels; codes become indices into them
    used = np.flatnonzero(np.bincount(labels[train], minlength=len(names)))
    to_class = np.full(len(names), -1, np.int32)
    to_class[used] = np.arange(len(used), dtype=np.int32)
    unseen = test & (to_class[labels] < 0)
    left_out["unseen_test_labels"] = int(unseen.sum())
    if unseen.any():
        test &= ~unseen
    test_codes, train_codes = to_class[labels[test]], to_class[labels[train]]
    test_keys = keys[test]
    return LabelledRows(
        _compacted(keys, train),  # keys is consumed: the training rows' keys move to its front
        train_codes,
        test_keys,
        test_codes,
        tuple(names[k] for k in used),
        eval_split if test.any() else None,
        left_out,
        files,
    )


def _compacted(a: np.ndarray, keep: np.ndarray, step: int = 1 << 18) -> np.ndarray:
    """``a[keep]`` made in ``a``'s own memory (its first rows; ``a`` is overwritten), a part at a
    time: the training keys without a second copy of every key (160 MB at ten million)."""
    n = 0
    for lo in range(0, len(a), step):
        part = a[lo : lo + step][keep[lo : lo + step]]  # rows at or after n: nothing unread is overwritten
        a[n : n + len(part)] = part
        n += len(part)
    return a[:n]


def _hold_out(
    rows: np.ndarray, labels: np.ndarray, fraction: float, random_state: int, dataset: str
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded stratified hold-out of ``rows``: (train, test), each in id order."""
    y = labels[rows]
    n_classes = len(np.unique(y))
    n_test = max(n_classes, int(round(len(rows) * fraction)))
    if len(rows) - n_test < MIN_TRAIN_PER_CLASS * n_classes:
        raise ConfigError(
            f"dataset {dataset!r} is too small to hold out --test-fraction {fraction:g}: {len(rows)} "
            f"labelled images in {n_classes} classes; add images, or give it a train/test split"
        )
    from sklearn.model_selection import train_test_split  # only datasets without a split pay for it

    # Label codes are in label order, so the classes split as their names did: the same rows.
    train, test = train_test_split(rows, test_size=n_test, stratify=y, random_state=random_state)
    return np.sort(train), np.sort(test)


def _check_classes(labels: np.ndarray, names: list[str], dataset: str, where: str) -> None:
    """A classifier needs two classes and a few images of each: say which class falls short."""
    per_code = np.bincount(labels, minlength=len(names))
    counts = {names[k]: int(v) for k, v in enumerate(per_code) if v}
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
        "n_train": rows.n_train,
        "n_test": rows.n_test,
        "eval_split": rows.eval_split,
        "classes": list(rows.classes),
        "left_out": dict(rows.left_out),
    }
