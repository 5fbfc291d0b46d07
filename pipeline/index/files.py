"""An index's files: where they live, its provenance (checked key by key), reading them back, the migration.

Layout: ``indexes/<name>/ids.parquet`` is the only file of the index's folder, so every Parquet
reader opens the folder as exactly its rows; the FAISS file and the provenance (the commit point)
live in ``indexes/_files/<name>/`` (``_files`` is never an index name). A folder of the first
layout (both beside ``ids.parquet``) is read where it is and moved by the next writer, or by
``Index.open`` when no writer holds it. A damaged provenance, FAISS file or ids table is one
error naming the file and ``index --rebuild``, which builds the index again from its featureset.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ImgfeatError, unknown_value
from imgfeat.core.hashing import content_hasher
from imgfeat.core.keys import filled
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import FileLock, recorded_file
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.index.kinds import KINDS, IndexParams, import_faiss

log = logging.getLogger(__name__)

IDS_FILE = "ids.parquet"  # the only file in indexes/<name>/: pd.read_parquet(indexes/<name>) reads it
PROVENANCE_FILE = "_index.json"  # in indexes/_files/<name>/, the commit point: the index file and its rows
INDEX_PREFIX, INDEX_SUFFIX = "_index-", ".faiss"  # indexes/_files/<name>/_index-<run>.faiss


@dataclass(frozen=True)
class IndexInfo:
    """An index's provenance (``_index.json``): what it was built from and how; what `imgfeat ls` shows."""

    name: str
    featureset: str
    featureset_fingerprint: str | None
    dim: int
    datasets: tuple[str, ...]
    params: IndexParams
    rows: int
    ids_digest: str
    index_file: str
    metric: str = "cosine"
    created_at: str = ""
    updated_at: str = ""
    run_id: str = ""
    index_bytes: int | None = None  # the index file's size (None in provenance written before it was kept)
    path: str = ""

    @property
    def kind(self) -> str:
        return self.params.kind

    def to_json(self) -> JsonObject:
        obj = asdict(self)
        obj.update(datasets=list(self.datasets), params=self.params.to_json(), kind=self.kind)
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: str = "") -> IndexInfo:
        """The provenance as written; a ValueError naming the first missing or mistyped key."""
        if not isinstance(obj, dict):
            raise ValueError(f"not a JSON object but {type(obj).__name__}")
        obj = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__ and k != "path"}
        _check_keys(obj, _INFO_KEYS, "")
        _check_keys(obj["params"], _PARAM_KEYS, "params.")
        if obj["params"]["kind"] not in KINDS[1:]:
            raise ValueError(f"params.kind is {obj['params']['kind']!r}, not one of {', '.join(KINDS[1:])}")
        for kind, name in (("featureset", obj["featureset"]), *(("dataset", d) for d in obj["datasets"])):
            check_name(kind, name)  # a ConfigError: they become paths
        if not _INDEX_FILE_RE.fullmatch(obj["index_file"]):
            raise ValueError(
                f"index_file {obj['index_file']!r} is not a file name of the form {INDEX_PREFIX}<run>{INDEX_SUFFIX}"
            )
        obj.update(datasets=tuple(obj["datasets"]), params=IndexParams.from_json(obj["params"]), path=path)
        return cls(**obj)


_INDEX_FILE_RE = re.compile(re.escape(INDEX_PREFIX) + r"[A-Za-z0-9._-]{1,200}" + re.escape(INDEX_SUFFIX))
# (type(s), required) of each provenance key: a damaged or hand-edited file fails here, by key,
# rather than as a KeyError or TypeError wherever the value is first used.
_INT, _OPT_INT, _STR = (int,), (int, type(None)), (str,)
_INFO_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": (_STR, True),
    "featureset": (_STR, True),
    "featureset_fingerprint": ((str, type(None)), False),
    "dim": (_INT, True),
    "datasets": ((list,), True),
    "params": ((dict,), True),
    "rows": (_INT, True),
    "ids_digest": (_STR, True),
    "index_file": (_STR, True),
    "metric": (_STR, False),
    "created_at": (_STR, False),
    "updated_at": (_STR, False),
    "run_id": (_STR, False),
    "index_bytes": (_OPT_INT, False),
}
_PARAM_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "kind": (_STR, True),
    "nlist": (_OPT_INT, False),
    "nprobe": (_OPT_INT, False),
    "hnsw_m": (_OPT_INT, False),
    "ef_search": (_OPT_INT, False),
    "ef_construction": (_OPT_INT, False),
    "trained_on": (_INT, False),
    "rows_at_training": (_INT, False),
    "train_iterations": (_OPT_INT, False),
    "seed": (_INT, False),
    "pq_m": (_OPT_INT, False),
    "pq_bits": (_OPT_INT, False),
}


_JSON_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object", type(None): "null"}


def _check_keys(obj: Any, keys: dict[str, tuple[tuple[type, ...], bool]], prefix: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{prefix.rstrip('.')} is not a JSON object")
    for key, (types, required) in keys.items():
        if key not in obj:
            if required:
                raise ValueError(f"key {prefix}{key!r} is missing")
            continue
        value = obj[key]
        negative = isinstance(value, int) and value < 0 and key != "seed"
        if not isinstance(value, types) or isinstance(value, bool) or negative:
            allowed = " or ".join(_JSON_TYPE_NAMES[t] for t in types)
            raise ValueError(f"{prefix}{key} is {value!r}, not {allowed}" + (" (0 or more)" if int in types else ""))
    if "datasets" in keys and not all(isinstance(d, str) for d in obj["datasets"]):
        raise ValueError(f"datasets is {obj['datasets']!r}, not a list of names")
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]!r}")


def ids_digest(ids: pa.Array | pa.ChunkedArray) -> str:
    """Fingerprint of the id order: the provenance's check that ids.parquet matches the index file.

    The BLAKE2b-128 of the ids joined by newlines, fed a slice at a time."""
    digest = IdsDigest()
    digest.update(ids)
    return digest.hexdigest()


class IdsDigest:
    """``ids_digest`` of ids fed in parts, in order, a slice at a time (never one Python list)."""

    def __init__(self) -> None:
        self._hash = content_hasher()
        self._any = False

    def update(self, ids: pa.Array | pa.ChunkedArray, step: int = 65_536) -> None:
        for start in range(0, len(ids), step):
            part = ids.slice(start, step).to_pylist()
            self._hash.update((("\n" if self._any else "") + "\n".join(part)).encode())
            self._any = True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def index_lock(ws: Workspace, name: str) -> Path:
    """One writer per index (outside its folders: a lock file there would be one more file to read)."""
    return ws.locks_dir / f"index-{check_name('index', name)}.lock"


def provenance_path(ws: Workspace, name: str) -> Path:
    """``indexes/_files/<name>/_index.json``; a folder of the first layout (not yet migrated) keeps
    its ``_index.json`` beside ``ids.parquet``, where it is read."""
    path = ws.index_files_dir(name) / PROVENANCE_FILE
    old = ws.index_dir(name) / PROVENANCE_FILE
    return old if not path.is_file() and old.is_file() else path


def rebuild_hint(name: str, featureset: str | None = None) -> str:
    """How to recover an index whose files are damaged: every row comes back from its featureset."""
    fs = featureset or "<the featureset it was built on>"
    return f"rebuild it from its featureset with 'imgfeat index --rebuild --featureset {fs} --name {name}'"


_FAISS_WHERE = re.compile(r"^Error in .*? at \S+:\d+: (Error: )?")


def damaged(name: str, path: Path, why: object, featureset: str | None = None) -> ImgfeatError:
    """One line naming the damaged file, why, and how to rebuild the index."""
    why = str(why).strip().splitlines()[-1] if str(why).strip() else type(why).__name__
    why = _FAISS_WHERE.sub("", why)  # FAISS' "Error in <C++ signature> at <file>:<line>: " prefix
    return ImgfeatError(f"index {name}: cannot read {path} ({why}); {rebuild_hint(name, featureset)}")


def read_info(ws: Workspace, name: str) -> IndexInfo:
    """An index's provenance; exit 2 naming the existing indexes when there is none, an
    ImgfeatError naming the file when it is damaged (not JSON, a key missing or mistyped)."""
    path = provenance_path(ws, name)
    if not path.is_file():
        names = index_names(ws)
        hint = "" if names else f"none under {ws.root / 'indexes'}; run 'imgfeat index --featureset FS' first"
        raise unknown_value("index", name, names, hint=hint)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise damaged(name, path, exc) from None
    try:
        info = IndexInfo.from_json(obj, str(ws.index_dir(name)))
    except (ValueError, TypeError, ConfigError) as exc:
        fs = obj.get("featureset") if isinstance(obj, dict) and isinstance(obj.get("featureset"), str) else None
        raise damaged(name, path, exc, fs) from None
    # The folder names the index (a copied index answers to its new name).
    return replace(info, name=name) if info.name != name else info


def index_names(ws: Workspace) -> list[str]:
    """Names of the indexes that have a provenance, damaged or not (either layout)."""
    root = ws.root / "indexes"
    names: set[str] = set()
    for folder, pick in ((root / "_files", lambda p: True), (root, lambda p: p.name[0] not in "_.")):
        if folder.is_dir():
            names.update(p.name for p in folder.iterdir() if pick(p) and (p / PROVENANCE_FILE).is_file())
    return sorted(n for n in names if _is_name(n))


def _is_name(name: str) -> bool:
    try:
        check_name("index", name)
    except ConfigError:
        return False
    return True


def list_indexes(ws: Workspace) -> list[IndexInfo]:
    """Every committed index of the workspace, by name; an ImgfeatError naming a damaged one."""
    infos, broken = read_indexes(ws)
    if broken:
        raise ImgfeatError(next(iter(broken.values())))
    return infos


def read_indexes(ws: Workspace) -> tuple[list[IndexInfo], dict[str, str]]:
    """``(readable indexes, {name: what is wrong} for damaged ones)``: what `imgfeat ls` lists."""
    infos, broken = [], {}
    for n in index_names(ws):
        try:
            infos.append(read_info(ws, n))
        except ImgfeatError as exc:
            broken[n] = str(exc)
    return infos, broken


def read_ids(ws: Workspace, info: IndexInfo) -> pa.Table:
    """The committed id order (``image_id, dataset, path``): the first ``info.rows`` rows of ids.parquet.

    A crash after ids.parquet grew but before the provenance was replaced leaves extra rows at
    the end; the provenance's row count and digest say which prefix belongs to the index.
    """
    return pa.Table.from_batches(list(CommittedIds.of(ws, info).batches()), S.INDEX_IDS_SCHEMA)


@dataclass(frozen=True)
class CommittedIds:
    """An index's committed id order (``read_ids``' rows), read from ids.parquet a row group at a
    time, never held as one table: a 10M-row ids table is about a gigabyte of strings, where an
    index that grows by a few images needs only its ids as compact keys and its rows copied once
    into the new ids file. Each read checks the rows against the provenance's count and digest."""

    info: IndexInfo | None  # None: no index yet (no rows)
    path: Path | None = None  # ids.parquet
    record: Path | None = None  # the provenance that names it

    @classmethod
    def of(cls, ws: Workspace, info: IndexInfo) -> CommittedIds:
        record = provenance_path(ws, info.name)
        try:
            path = recorded_file(ws.index_dir(info.name), IDS_FILE, record)
        except ImgfeatError as exc:
            raise ImgfeatError(f"index {info.name}: {exc}; {rebuild_hint(info.name, info.featureset)}") from None
        return cls(info, path, record)

    @property
    def num_rows(self) -> int:
        return 0 if self.info is None else self.info.rows

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The committed rows, a row group at a time, as ``S.INDEX_IDS_SCHEMA`` (ids as text); an
        ImgfeatError (naming the files, and how to rebuild) once they turn out not to be what the
        provenance recorded: a consumer must not commit what it made of them before the end."""
        info, path = self.info, self.path
        if info is None or path is None:
            return
        digest, left = IdsDigest(), info.rows
        try:
            with pq.ParquetFile(path) as pf:
                for group in range(pf.num_row_groups):
                    if left <= 0:
                        break
                    t = pf.read_row_group(group).slice(0, left)
                    t = t.select(S.INDEX_IDS_SCHEMA.names).cast(S.INDEX_IDS_SCHEMA)  # ids as text, or an error
                    if t[S.IMAGE_ID].null_count:
                        raise ValueError("an image_id is null")
                    left -= t.num_rows
                    digest.update(t[S.IMAGE_ID])
                    yield from t.to_batches()
        except (OSError, KeyError, ValueError, pa.ArrowException) as exc:  # truncated, not Parquet, columns missing
            raise damaged(info.name, path, exc, info.featureset) from None
        if left or digest.hexdigest() != info.ids_digest:
            raise ImgfeatError(
                f"index {info.name}: {path} does not match {self.record}; {rebuild_hint(info.name, info.featureset)}"
            )

    def keys(self) -> np.ndarray:
        """The committed ids as compact keys (``core/keys.py``), in their order."""
        return filled((b.column(0) for b in self.batches()), self.num_rows)


def index_file_path(ws: Workspace, info: IndexInfo) -> Path:
    """The FAISS file the provenance names: a regular file in the index's side folder (or, for the
    first layout, beside ids.parquet); never a path the provenance makes up, nor a link or FIFO."""
    record = provenance_path(ws, info.name)
    folder = ws.index_files_dir(info.name)
    old = ws.index_dir(info.name)
    if not (folder / info.index_file).exists() and (old / info.index_file).exists():
        folder = old  # not migrated yet, or being migrated: the provenance may still be there
    try:
        return recorded_file(folder, info.index_file, record)
    except ImgfeatError as exc:
        raise ImgfeatError(f"index {info.name}: {exc}; {rebuild_hint(info.name, info.featureset)}") from None


def checked_index_file(ws: Workspace, info: IndexInfo) -> Path:
    """The index file, if it is there, a regular file and of the size the provenance recorded (a cheap
    check: a rerun with nothing new does not read the file, but still notices a truncated one)."""
    path = index_file_path(ws, info)
    size = path.stat().st_size
    if info.index_bytes is not None and size != info.index_bytes:
        why = f"{size} bytes, the provenance says {info.index_bytes}: truncated or replaced"
        raise damaged(info.name, path, why, info.featureset)
    return path


def write_faiss(index: Any, path: Path) -> None:
    """FAISS' ``write_index`` into a file of ours: its bytes pass through Python's writes, so a full
    or read-only disk is an OSError (``atomic_path`` makes it one line naming the file and why),
    not FAISS' RuntimeError with a C++ location. The index is not copied: FAISS hands over chunks."""
    faiss = import_faiss()

    with open(path, "wb") as fh:
        faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))


def read_faiss(ws: Workspace, info: IndexInfo):
    """The committed FAISS index (FAISS' own format: reading it runs no code of ours or pickles)."""
    faiss = import_faiss()

    path = checked_index_file(ws, info)
    try:
        index = faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as exc:  # FAISS' own check of a file it cannot parse
        raise damaged(info.name, path, exc, info.featureset) from None
    if index.ntotal != info.rows or index.d != info.dim:
        raise damaged(
            info.name,
            path,
            f"it holds {index.ntotal} rows of {index.d} dimensions, the provenance says {info.rows} of {info.dim}",
            info.featureset,
        )
    return index


def migrate_layout(ws: Workspace, name: str) -> int:
    """Move the first layout's side files (``_index.json``, ``_index-*.faiss``) from ``indexes/<name>/``
    to ``indexes/_files/<name>/`` (call with the index's lock held); returns how many moved.

    Index files go first: a reader holding the old provenance finds them in either folder.
    """
    refuse_links(ws, name)
    folder, files = ws.index_dir(name), ws.index_files_dir(name)
    if not folder.is_dir():
        return 0
    moved = 0
    for p in sorted(folder.glob(f"{INDEX_PREFIX}*{INDEX_SUFFIX}")):
        files.mkdir(parents=True, exist_ok=True)
        p.replace(files / p.name)  # a link moves as a link: recorded_file refuses it later
        moved += 1
    old = folder / PROVENANCE_FILE
    if old.is_file() or old.is_symlink():
        files.mkdir(parents=True, exist_ok=True)
        if (files / PROVENANCE_FILE).is_file():  # both there (an old copy put back): the new one is in force
            old.unlink()
        else:
            old.replace(files / PROVENANCE_FILE)
        moved += 1
    if moved:
        log.info("moved %d side file(s) of index %s to %s", moved, name, files)
    return moved


def migrate_if_free(ws: Workspace, name: str) -> None:
    """On open: move a first-layout index's side files when no writer holds it (a reader never waits,
    and a read-only workspace is read where it is)."""
    folder = ws.index_dir(name)
    if not (folder / PROVENANCE_FILE).exists() and not any(folder.glob(f"{INDEX_PREFIX}*{INDEX_SUFFIX}")):
        return
    try:
        with FileLock(index_lock(ws, name), f"index {name}"):
            migrate_layout(ws, name)
    except (ImgfeatError, OSError) as exc:
        log.debug("index %s: layout not migrated now (%s)", name, exc)


def refuse_links(ws: Workspace, name: str) -> None:
    """A writer never follows a link out of the workspace: the index's folders must be folders."""
    files = ws.index_files_dir(name)
    for path in (ws.root / "indexes", ws.index_dir(name), files.parent, files):
        if path.is_symlink():
            raise ImgfeatError(
                f"index {name}: {path} is a symbolic link (to {path.readlink()}); an index is "
                "written only into folders of the workspace: remove the link and run again"
            )
