"""The index stage: a featureset's rows in a FAISS index; its id order in indexes/<name>/, its files beside it.

Layout: ``indexes/<name>/ids.parquet`` is the only file of the index's folder, so every Parquet
reader opens the folder as exactly its rows; the FAISS file and the provenance (the commit point)
live in ``indexes/_files/<name>/``. A folder of the first layout (both beside ``ids.parquet``) is
read where it is and moved by the next writer, or by ``Index.open`` when no writer holds it.
A damaged provenance, FAISS file or ids table is one error naming the file and ``--rebuild``,
which builds the index again from its featureset.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ImgfeatError, unknown_value
from imgfeat.core.storage import (WAIT_HINT, FileLock, atomic_path, check_wait, recorded_file, remove_stale_tmp,
                                  write_json_atomic, write_table_atomic)
from imgfeat.core.workspace import Workspace, check_name
from imgfeat.extract.featureset import committed_ids, featureset_info
from imgfeat.index.kinds import (KINDS, IndexParams, add_in_chunks, check_kind, import_faiss, make_index,
                                 resolve_params, train)
from imgfeat.index.vectors import first_paths, manifest_rows, read_vectors, scanned_datasets

log = logging.getLogger(__name__)

IDS_FILE = "ids.parquet"  # the only file in indexes/<name>/: pd.read_parquet(indexes/<name>) reads it
PROVENANCE_FILE = "_index.json"  # in indexes/_files/<name>/, the commit point: the index file and its rows
INDEX_PREFIX, INDEX_SUFFIX = "_index-", ".faiss"  # indexes/_files/<name>/_index-<run>.faiss
RETRAIN_GROWTH = 4  # an IVF index is retrained once it holds this many times the rows it was trained on


@dataclass(frozen=True)
class IndexConfig:
    """What `imgfeat index` builds: the featureset rows of some datasets (all rows when none), named."""

    featureset: str
    datasets: tuple[str, ...] = ()
    name: str | None = None
    kind: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_search: int = 128
    seed: int = 0
    wait: float | None = None
    rebuild: bool = False  # build again from the featureset, whatever the old files hold (a damaged index)

    def __post_init__(self) -> None:
        check_wait(self.wait, "index wait")
        check_name("featureset", self.featureset)
        for d in self.datasets:
            check_name("dataset", d)
        check_name("index", self.index_name)
        check_kind(self.kind)
        for key in ("nlist", "nprobe", "hnsw_m", "ef_search"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"index {key} must be a positive integer, got {value!r}")

    @property
    def index_name(self) -> str:
        """``--name``, else the featureset name (prefixed by the datasets when some are chosen)."""
        return self.name or "-".join((*self.datasets, self.featureset))


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

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj.update(datasets=list(self.datasets), params=self.params.to_json(), kind=self.kind)
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: str = "") -> "IndexInfo":
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
            raise ValueError(f"index_file {obj['index_file']!r} is not a file name of the form "
                             f"{INDEX_PREFIX}<run>{INDEX_SUFFIX}")
        obj.update(datasets=tuple(obj["datasets"]), params=IndexParams.from_json(obj["params"]), path=path)
        return cls(**obj)


_INDEX_FILE_RE = re.compile(re.escape(INDEX_PREFIX) + r"[A-Za-z0-9._-]{1,200}" + re.escape(INDEX_SUFFIX))
# (type(s), required) of each provenance key: a damaged or hand-edited file fails here, by key,
# rather than as a KeyError or TypeError wherever the value is first used.
_INT, _OPT_INT, _STR = (int,), (int, type(None)), (str,)
_INFO_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": (_STR, True), "featureset": (_STR, True), "featureset_fingerprint": ((str, type(None)), False),
    "dim": (_INT, True), "datasets": ((list,), True), "params": ((dict,), True), "rows": (_INT, True),
    "ids_digest": (_STR, True), "index_file": (_STR, True), "metric": (_STR, False), "created_at": (_STR, False),
    "updated_at": (_STR, False), "run_id": (_STR, False), "index_bytes": (_OPT_INT, False),
}
_PARAM_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "kind": (_STR, True), "nlist": (_OPT_INT, False), "nprobe": (_OPT_INT, False), "hnsw_m": (_OPT_INT, False),
    "ef_search": (_OPT_INT, False), "ef_construction": (_OPT_INT, False), "trained_on": (_INT, False),
    "rows_at_training": (_INT, False), "train_iterations": (_OPT_INT, False), "seed": (_INT, False),
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


@dataclass(frozen=True)
class IndexSummary:
    """What one `imgfeat index` did (``added`` 0 and ``written`` False: nothing was new)."""

    index: str
    featureset: str
    kind: str
    rows: int
    added: int
    rebuilt: bool
    written: bool
    missing_features: int
    index_dir: str
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ids_digest(ids: list[str]) -> str:
    """Fingerprint of the id order: the provenance's check that ids.parquet matches the index file."""
    return hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest()


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
    names = set()
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
    record = provenance_path(ws, info.name)
    try:
        path = recorded_file(ws.index_dir(info.name), IDS_FILE, record)
        with pq.ParquetFile(path) as pf:
            table = pf.read().slice(0, info.rows)
        ids = table[S.IMAGE_ID].to_pylist()
        table = table.select(S.INDEX_IDS_SCHEMA.names).cast(S.INDEX_IDS_SCHEMA)
    except ImgfeatError as exc:
        raise ImgfeatError(f"index {info.name}: {exc}; {rebuild_hint(info.name, info.featureset)}") from None
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:  # truncated, not Parquet, columns missing
        raise damaged(info.name, ws.index_dir(info.name) / IDS_FILE, exc, info.featureset) from None
    if table.num_rows != info.rows or ids_digest(ids) != info.ids_digest:
        raise ImgfeatError(f"index {info.name}: {path} does not match {record}; "
                           f"{rebuild_hint(info.name, info.featureset)}")
    return table


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


def read_faiss(ws: Workspace, info: IndexInfo):
    """The committed FAISS index (FAISS' own format: reading it runs no code of ours or pickles)."""
    faiss = import_faiss()

    path = checked_index_file(ws, info)
    try:
        index = faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as exc:  # FAISS' own check of a file it cannot parse
        raise damaged(info.name, path, exc, info.featureset) from None
    if index.ntotal != info.rows or index.d != info.dim:
        raise damaged(info.name, path, f"it holds {index.ntotal} rows of {index.d} dimensions, the provenance "
                      f"says {info.rows} of {info.dim}", info.featureset)
    return index


def migrate_layout(ws: Workspace, name: str) -> int:
    """Move the first layout's side files (``_index.json``, ``_index-*.faiss``) from ``indexes/<name>/``
    to ``indexes/_files/<name>/`` (call with the index's lock held); returns how many moved.

    Index files go first: a reader holding the old provenance finds them in either folder.
    """
    _refuse_links(ws, name)
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
    folder, lock = ws.index_dir(name), ws.locks_dir / f"index-{name}.lock"
    if not (folder / PROVENANCE_FILE).exists() and not any(folder.glob(f"{INDEX_PREFIX}*{INDEX_SUFFIX}")):
        return
    try:
        with FileLock(lock, f"index {name}"):
            migrate_layout(ws, name)
    except (ImgfeatError, OSError) as exc:
        log.debug("index %s: layout not migrated now (%s)", name, exc)


def build_index(ws: Workspace, cfg: IndexConfig, run_id: str) -> IndexSummary:
    """Create or extend ``indexes/<name>/``: only rows not in it yet are added; nothing new writes nothing."""
    t0 = time.perf_counter()
    fs_info = featureset_info(ws, cfg.featureset)  # exit 2 for an unknown featureset
    name = cfg.index_name
    with FileLock(ws.locks_dir / f"index-{name}.lock", f"index {name}", cfg.wait, hint=WAIT_HINT):
        _refuse_links(ws, name)
        for folder in (ws.index_dir(name), ws.index_files_dir(name)):
            remove_stale_tmp(folder)
        migrate_layout(ws, name)
        before = _previous(ws, cfg)
        prev = None if cfg.rebuild else before  # a rebuild reads nothing of the old files but its kind
        old = read_ids(ws, prev) if prev else S.INDEX_IDS_SCHEMA.empty_table()
        covered, missing = _covered_ids(ws, cfg)
        old_ids = old[S.IMAGE_ID].to_pylist()
        new = covered.difference(old_ids)
        total = len(old_ids) + len(new)
        if total == 0:
            raise ConfigError(f"featureset {cfg.featureset} has no feature rows"
                              + (f" for dataset(s) {', '.join(cfg.datasets)}" if cfg.datasets else "")
                              + "; run 'imgfeat extract' first")
        wanted = _wanted_params(cfg, before, total)
        rebuild = cfg.rebuild or (prev is not None and _needs_rebuild(prev.params, wanted, cfg, total))
        if prev is not None and not new and not rebuild:
            checked_index_file(ws, prev)
            log.info("index %s is current: %d rows, nothing new", name, total)
            return _summary(cfg, prev, 0, False, False, missing, t0)
        if prev is None or rebuild:
            index, params, table = _fresh(ws, cfg, wanted, old, new)
        else:
            index, params, table = _extended(ws, cfg, prev, old, new)
        info = _commit(ws, cfg, fs_info, before, index, params, table, run_id)
    log.info("index %s: %d rows (%d added%s), kind %s", name, info.rows, len(new),
             ", rebuilt" if rebuild else "", info.kind)
    return _summary(cfg, info, len(new), rebuild, True, missing, t0)


def _refuse_links(ws: Workspace, name: str) -> None:
    """A writer never follows a link out of the workspace: the index's folders must be folders."""
    files = ws.index_files_dir(name)
    for path in (ws.root / "indexes", ws.index_dir(name), files.parent, files):
        if path.is_symlink():
            raise ImgfeatError(f"index {name}: {path} is a symbolic link (to {path.readlink()}); an index is "
                               "written only into folders of the workspace: remove the link and run again")


def _previous(ws: Workspace, cfg: IndexConfig) -> IndexInfo | None:
    """The committed provenance, if any; with ``--rebuild`` a damaged one is no error (it is replaced)."""
    if not provenance_path(ws, cfg.index_name).is_file():
        return None
    try:
        prev = read_info(ws, cfg.index_name)
    except ImgfeatError as exc:
        if not cfg.rebuild:
            raise
        log.warning("index %s: its provenance is damaged; rebuilding it from featureset %s", cfg.index_name,
                    cfg.featureset)
        log.debug("%s", exc)
        return None
    if prev.featureset != cfg.featureset:
        raise ConfigError(f"index {prev.name} was built on featureset {prev.featureset}, not {cfg.featureset}; "
                          "give this one another --name")
    return prev


def _covered_ids(ws: Workspace, cfg: IndexConfig) -> tuple[set[str], int]:
    """(ids the index should hold, ids of the datasets that have no feature row yet)."""
    have = committed_ids(ws, cfg.featureset)
    if not cfg.datasets:
        return have, 0
    ids: set[str] = set()
    for d in cfg.datasets:
        ids.update(manifest_rows(ws, d)[S.IMAGE_ID].to_pylist())
    missing = len(ids - have)
    if missing:
        log.warning("%d images of %s have no features in %s yet: run 'imgfeat extract' first",
                    missing, ", ".join(cfg.datasets), cfg.featureset)
    return ids & have, missing


def _wanted_params(cfg: IndexConfig, prev: IndexInfo | None, total: int) -> IndexParams:
    """``auto`` keeps an existing approximate index's kind; a flat one turns approximate when it outgrows flat."""
    kind = prev.kind if cfg.kind == "auto" and prev is not None and prev.kind != "flat" else cfg.kind
    return resolve_params(kind, total, cfg.nlist, cfg.nprobe, cfg.hnsw_m, cfg.ef_search, cfg.seed)


def _needs_rebuild(prev: IndexParams, wanted: IndexParams, cfg: IndexConfig, total: int) -> bool:
    """A kind or parameter change, or an IVF index that outgrew the sample it was trained on."""
    if wanted.kind != prev.kind:
        return True
    if prev.kind == "ivf":
        outgrown = total > RETRAIN_GROWTH * prev.rows_at_training
        return outgrown or cfg.nlist not in (None, prev.nlist) or cfg.nprobe not in (None, prev.nprobe)
    if prev.kind == "hnsw":
        return (prev.hnsw_m, prev.ef_search) != (wanted.hnsw_m, wanted.ef_search)
    return False


def _fresh(ws: Workspace, cfg: IndexConfig, params: IndexParams, old: pa.Table, new: set[str]):
    """Every row, old ones first in their committed order (so the old ids file stays a prefix)."""
    old_ids = old[S.IMAGE_ID].to_pylist()
    ids, X = read_vectors(ws, cfg.featureset, new.union(old_ids))
    pos = {i: k for k, i in enumerate(ids)}
    gone = [i for i in old_ids if i not in pos]
    if gone:
        raise ImgfeatError(f"index {cfg.index_name}: {len(gone)} of its images (e.g. {gone[0]}) no longer have a "
                           f"feature row in {cfg.featureset}; build a new index under another --name")
    order = [pos[i] for i in old_ids] + [k for k, i in enumerate(ids) if i in new]
    if order != list(range(len(ids))):
        X = X[order]
    ids = [ids[k] for k in order]
    index = make_index(params, X.shape[1])
    params = train(index, params, X)
    add_in_chunks(index, X)
    return index, params, pa.concat_tables([old, _id_rows(ws, cfg, ids[len(old_ids):])])


def _extended(ws: Workspace, cfg: IndexConfig, prev: IndexInfo, old: pa.Table, new: set[str]):
    ids, X = read_vectors(ws, cfg.featureset, new)
    index = read_faiss(ws, prev)
    add_in_chunks(index, X)
    return index, prev.params, pa.concat_tables([old, _id_rows(ws, cfg, ids)])


def _id_rows(ws: Workspace, cfg: IndexConfig, ids: list[str]) -> pa.Table:
    """``image_id, dataset, path`` for new rows: the first manifest row of each id (null if none)."""
    where = first_paths(ws, cfg.datasets or scanned_datasets(ws)) if ids else {}
    found = [where.get(i, (None, None)) for i in ids]
    return pa.table({S.IMAGE_ID: pa.array(ids, pa.string()),
                     S.DATASET: pa.array([d for d, _ in found], pa.string()),
                     S.PATH: pa.array([p for _, p in found], pa.string())}, schema=S.INDEX_IDS_SCHEMA)


def _commit(ws: Workspace, cfg: IndexConfig, fs_info: dict, prev: IndexInfo | None, index,
            params: IndexParams, table: pa.Table, run_id: str) -> IndexInfo:
    """Index file (new name), ids.parquet (old rows stay its prefix), then the provenance: the commit.

    ``prev`` is the provenance before (its creation time is kept).
    """
    faiss = import_faiss()

    folder, files = ws.index_dir(cfg.index_name), ws.index_files_dir(cfg.index_name)
    index_file = f"{INDEX_PREFIX}{run_id}{INDEX_SUFFIX}"
    with atomic_path(files / index_file) as tmp:
        faiss.write_index(index, str(tmp))
    write_table_atomic(table, folder / IDS_FILE)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = IndexInfo(name=cfg.index_name, featureset=cfg.featureset,
                     featureset_fingerprint=fs_info.get("fingerprint"), dim=int(index.d),
                     datasets=tuple(cfg.datasets), params=params, rows=int(index.ntotal),
                     ids_digest=ids_digest(table[S.IMAGE_ID].to_pylist()), index_file=index_file,
                     created_at=prev.created_at if prev else now, updated_at=now, run_id=run_id,
                     index_bytes=(files / index_file).stat().st_size, path=str(folder))
    obj = info.to_json()
    obj.pop("path")
    write_json_atomic(obj, files / PROVENANCE_FILE)
    for stale in files.glob(f"{INDEX_PREFIX}*{INDEX_SUFFIX}"):
        if stale.name != index_file:
            stale.unlink(missing_ok=True)
    return info


def _summary(cfg: IndexConfig, info: IndexInfo, added: int, rebuilt: bool, written: bool, missing: int,
             t0: float) -> IndexSummary:
    return IndexSummary(index=info.name, featureset=info.featureset, kind=info.kind, rows=info.rows, added=added,
                        rebuilt=rebuilt, written=written, missing_features=missing, index_dir=info.path,
                        seconds=round(time.perf_counter() - t0, 3), params=info.params.to_json())
